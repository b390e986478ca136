from densessl.loggers.neptune import NeptuneLogger

__all__ = ["NeptuneLogger"]
