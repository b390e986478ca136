"""Test-only callback: the process sends itself SIGTERM after a given optimiser step (a preemption)."""
import os
import signal

import lightning as L


class SigtermAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.received_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
