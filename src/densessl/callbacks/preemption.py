"""Write a checkpoint when the job is asked to stop (SIGTERM from a scheduler or a user)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM Lightning finishes the current batch and exits; this saves ``last.ckpt`` first, so
    ``resume=<run dir>`` continues from that step. (SLURM's SIGUSR1 is handled by Lightning's
    SLURMEnvironment auto-requeue, which writes its own hpc checkpoint.)"""

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.received_sigterm:
            trainer.save_checkpoint(str(self.path))
            print(f"received SIGTERM: checkpoint written to {self.path} at step {trainer.global_step}", flush=True)
