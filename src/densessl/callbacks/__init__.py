from densessl.callbacks.dense_eval import DenseEvalCallback
from densessl.callbacks.dse_monitor import DSEMonitor
from densessl.callbacks.preemption import AtomicCheckpointIO, PreemptionCheckpoint
from densessl.callbacks.progress import ProgressBar
from densessl.callbacks.publish import publish_figures

__all__ = ["AtomicCheckpointIO", "DenseEvalCallback", "DSEMonitor", "PreemptionCheckpoint", "ProgressBar",
           "publish_figures"]
