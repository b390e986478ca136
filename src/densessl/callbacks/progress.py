"""The progress bar without Lightning's ``v_num``."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` without ``v_num``: densessl's loggers have no version (the run folder is
    the run), so Lightning showed ``v_num=None`` (a logger whose version is None, e.g. Neptune offline)
    or a meaningless one. Lightning's documented way: override ``get_metrics`` in the progress bar."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
