"""Test-only callback: a signal to the run's process group (the run and its data-loader workers, as a
scheduler sends it) while the given optimiser step is computed: a preemption, a Ctrl-C, SLURM's
warning signal, or a SIGKILL."""
import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal = int(step), signal  # int: a step may come from ${oc.env:...}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            sig = getattr(signal, self.signal)
            # the group only when the run leads its own (never a test runner's group)
            os.killpg(0, sig) if os.getpgid(0) == os.getpid() else os.kill(os.getpid(), sig)
