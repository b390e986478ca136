from densessl.loggers.csv import CSVLogger
from densessl.loggers.neptune import NeptuneLogger

__all__ = ["CSVLogger", "NeptuneLogger"]
