from densessl.callbacks.dense_eval import DenseEvalCallback
from densessl.callbacks.dse_monitor import DSEMonitor
from densessl.callbacks.preemption import AtomicCheckpointIO, PreemptionCheckpoint

__all__ = ["AtomicCheckpointIO", "DenseEvalCallback", "DSEMonitor", "PreemptionCheckpoint"]
