"""Test-only callback: after the given optimiser step the run writes its pid to a file and waits for a
stop signal from outside (a scheduler's), so that the test knows at which step the signal lands."""
import os
import time
from pathlib import Path

import lightning as L

from densessl.callbacks import PreemptionCheckpoint


class WaitForSignalAtStep(L.Callback):
    def __init__(self, step: int, ready: str, timeout_s: float = 300) -> None:
        self.step, self.ready, self.timeout_s = int(step), Path(ready), timeout_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.ready.write_text(str(os.getpid()))
        # PreemptionCheckpoint runs after this callback (Checkpoint subclasses go last) and stops there.
        stop = next(cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint))
        deadline = time.monotonic() + self.timeout_s
        while stop.signum is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no stop signal within {self.timeout_s} s of step {self.step}")
            time.sleep(0.05)
