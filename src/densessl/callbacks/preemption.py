"""Stop on a signal with ``last.ckpt`` written at a step boundary; write every checkpoint atomically."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Stop requests: a scheduler or user (TERM), Ctrl-C (INT), SLURM's --signal / submitit's warning (USR1, USR2).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave the stop signals, which a scheduler often sends to
    every process of a job, to the main process; a worker they killed would fail the main process
    mid-step (and with no checkpoint) instead."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def requeue_slurm_job() -> str:
    """``scontrol requeue $SLURM_JOB_ID``; returns what happened, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under SLURM (no SLURM_JOB_ID): not requeued"
    if shutil.which("scontrol") is None:
        return f"scontrol not found: SLURM job {job} not requeued"
    code = subprocess.run(["scontrol", "requeue", job]).returncode
    return f"SLURM job {job} requeued" if code == 0 else f"scontrol requeue {job} failed ({code})"


class PreemptionCheckpoint(Checkpoint):
    """On SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 the current optimiser step finishes, ``last.ckpt`` is
    written, and the process exits with 128 + the signal number (143 TERM, 130 INT, 138 USR1,
    140 USR2); after USR1/USR2 under SLURM the job is first requeued with ``scontrol requeue``. A
    second Ctrl-C stops at once, without a checkpoint. During an epoch's last batch the stop waits for
    the epoch's end hooks (evaluation callbacks, the epoch checkpoint), which a resume would skip.

    The handlers replace Lightning's for the training loop: Lightning's SIGTERM handling ends the run
    with exit status 0 and no checkpoint, and its SLURM auto-requeue writes an ``hpc_ckpt`` from inside
    the signal handler, i.e. possibly mid-step (``train`` turns it off). The checkpoint is written where
    ModelCheckpoint writes its own (a Checkpoint subclass runs after the other callbacks, with the
    ModelCheckpoints): it holds the loop position right after the step, which a resume continues from
    exactly. Lightning restores the handlers it found at start (ours included) when the run ends.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.signum: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler just before the loops start, so ours go in after it;
        # a SIGTERM that reached Lightning's in between is taken over.
        self.signum = signal.SIGTERM if trainer.received_sigterm else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        # Every rank must stop at the same step (saving is collective): any rank's signal stops all;
        # a single-device strategy returns the local decision without communicating.
        if not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            return
        signum = signal.Signals(self.signum or signal.SIGTERM)
        trainer.save_checkpoint(str(self.path))
        if trainer.is_global_zero:
            print(f"received {signum.name}: checkpoint written to {self.path} at step {trainer.global_step}",
                  flush=True)
            if signum in REQUEUE_SIGNALS:
                print(requeue_slurm_job(), flush=True)
        raise SystemExit(128 + signum)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A signal after the last step (final checkpoint already written): still stop, non-zero.
        if self.signum is not None:
            signum, self.signum = signal.Signals(self.signum), None
            print(f"received {signum.name} after the last step: stopping before evaluation/export", flush=True)
            raise SystemExit(128 + signum)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to ``<file>.partial`` in the same folder, flushed to disk, then renames it
    over ``<file>`` (``os.replace``, atomic on POSIX): a kill during the write leaves the previous file
    whole. Lightning's own writer goes through an fsspec transaction whose temporary file is in the
    system temp folder; when that is another filesystem than the run's (usual on clusters) its final
    move is a copy, which a kill can truncate. Remote URLs keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
