from densessl.callbacks.dense_eval import DenseEvalCallback
from densessl.callbacks.preemption import PreemptionCheckpoint

__all__ = ["DenseEvalCallback", "PreemptionCheckpoint"]
