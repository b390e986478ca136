"""Figures of an in-training evaluation, to the loggers and to ``trainer.callback_metrics``."""
from __future__ import annotations

import lightning as L


def publish_figures(trainer: L.Trainer, pl_module: L.LightningModule, values: dict[str, float]) -> None:
    """Log ``values`` (the same on every rank: computed on rank 0 and broadcast) to every logger, one row at
    ``trainer.global_step``, and to ``callback_metrics`` so that ``ModelCheckpoint(monitor=<key>)`` and
    early stopping can use them.

    ``pl_module.log(..., logger=False)``: Lightning would write an epoch-level value at its own step; the
    explicit row keeps one row per evaluation at the step it was made. ``sync_dist=True, reduce_fx="max"``
    is a no-op on equal values (max, unlike a mean, returns them bitwise) that keeps Lightning's
    epoch-level ``sync_dist`` warning away under DDP.
    """
    for k, v in values.items():
        pl_module.log(k, float(v), logger=False, sync_dist=True, reduce_fx="max")
    for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
        logger.log_metrics(values, step=trainer.global_step)
