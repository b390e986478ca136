"""Run a dense evaluator on the eval backbone every N epochs and log its figures."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from densessl.distributed import is_distributed


class DenseEvalCallback(L.Callback):
    """Calls ``evaluator(pl_module.eval_backbone, dataset, **options)`` on rank 0 every
    ``every_n_epochs`` epochs (and after the last one), logs ``result.as_dict()`` under ``prefix`` to
    every active logger, and prints the cost so users can budget it. Other ranks wait at a barrier.
    """

    def __init__(self, evaluator: Callable[..., Any], dataset: Any, every_n_epochs: int = 1,
                 prefix: str = "val", **options: Any) -> None:
        self.evaluator, self.dataset, self.options = evaluator, dataset, options
        self.every_n_epochs, self.prefix = every_n_epochs, prefix
        self.last: Any = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        if trainer.is_global_zero:
            start = time.perf_counter()
            with torch.inference_mode(False):
                self.last = self.evaluator(pl_module.eval_backbone, self.dataset, **self.options)
            cost = time.perf_counter() - start
            metrics = {f"{self.prefix}/{k}": float(v) for k, v in self.last.as_dict().items()}
            metrics[f"{self.prefix}/eval_seconds"] = cost
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            name = getattr(self.evaluator, "__name__", "evaluator")
            print(f"[{name}] epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                  + f" ({cost:.1f} s)", flush=True)
        if is_distributed():
            torch.distributed.barrier()
