"""Write a checkpoint when the job is asked to stop (SIGTERM from a scheduler or a user)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM Lightning finishes the current batch and stops with ``SIGTERMException``; this
    writes ``last.ckpt`` at that point (after the batch's optimiser step), so ``resume=<run dir>`` or
    ``resume=auto`` continues from that step. SLURM's SIGUSR1 is handled by Lightning's
    SLURMEnvironment auto-requeue, which writes its own hpc checkpoint."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(str(self.path))
            print(f"received SIGTERM: checkpoint written to {self.path} at step {trainer.global_step}", flush=True)
