from densessl.callbacks.dense_eval import DenseEvalCallback

__all__ = ["DenseEvalCallback"]
