from densessl.callbacks.dense_eval import DenseEvalCallback
from densessl.callbacks.dse_monitor import DSEMonitor
from densessl.callbacks.preemption import PreemptionCheckpoint

__all__ = ["DenseEvalCallback", "DSEMonitor", "PreemptionCheckpoint"]
