"""Run a dense evaluator on the eval backbone every N epochs, log its figures and its pictures."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from densessl.callbacks.publish import publish_figures

log = logging.getLogger(__name__)


def instantiate_split(config: Any, split: str) -> Any:
    """``hydra.utils.instantiate(config, split=split)``: a dataset config (e.g. ``${data.val}``) built on
    another split, as the evaluation CLIs build the labelled train split. Use it from YAML with
    ``_recursive_: false`` so that ``config`` arrives as a config, not as an already built dataset."""
    import hydra

    return hydra.utils.instantiate(config, split=split)


class DenseEvalCallback(L.Callback):
    """Calls ``evaluator(pl_module.eval_backbone, dataset, **options)`` (or, with ``train_dataset``,
    ``evaluator(pl_module.eval_backbone, train_dataset, dataset, **options)``, e.g. the linear probe and
    Hummingbird retrieval) on rank 0 every ``every_n_epochs`` epochs and after the last one, logs
    ``result.as_dict()`` under ``prefix`` to every active logger and to ``trainer.callback_metrics``
    (``ModelCheckpoint(monitor="<prefix>/<figure>")`` can keep the best checkpoints), and logs the cost so
    users can budget it. Other ranks wait for rank 0's figures (a broadcast), so all ranks log the same.

    Pictures: when the result kept some (evaluator option ``num_vis`` > 0), its panel (image | ground
    truth | predictions, ``densessl.evaluation.pictures.result_panels``) is saved as
    ``<picture_dir>/<prefix with / as _>_epoch<E>.png`` (default picture_dir:
    ``<trainer.default_root_dir>/pictures``, the run folder in experiments/train.py) and sent to every
    logger that takes images under ``pictures/<prefix>``. ``pictures`` holds the saved paths.
    """

    def __init__(self, evaluator: Callable[..., Any], dataset: Any, every_n_epochs: int = 1,
                 prefix: str = "val", train_dataset: Any = None, picture_dir: str | None = None,
                 **options: Any) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.evaluator, self.dataset, self.train_dataset, self.options = evaluator, dataset, train_dataset, options
        self.every_n_epochs, self.prefix, self.picture_dir = every_n_epochs, prefix, picture_dir
        self.last: Any = None
        self.pictures: list[Path] = []

    @staticmethod
    def _is_last_epoch(trainer: L.Trainer, epoch: int) -> bool:
        max_steps = trainer.max_steps if trainer.max_steps is not None else -1
        return (epoch == trainer.max_epochs or bool(trainer.should_stop)
                or (max_steps > 0 and trainer.global_step >= max_steps))

    def evaluate(self, backbone: Any) -> Any:
        with torch.inference_mode(False):
            if self.train_dataset is None:
                return self.evaluator(backbone, self.dataset, **self.options)
            return self.evaluator(backbone, self.train_dataset, self.dataset, **self.options)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and not self._is_last_epoch(trainer, epoch):
            return
        metrics = None
        if trainer.is_global_zero:
            start = time.perf_counter()
            self.last = self.evaluate(pl_module.eval_backbone)
            cost = time.perf_counter() - start
            metrics = {f"{self.prefix}/{k}": float(v) for k, v in self.last.as_dict().items()}
            metrics[f"{self.prefix}/eval_seconds"] = cost
        metrics = trainer.strategy.broadcast(metrics, src=0)  # also the other ranks' wait for rank 0
        publish_figures(trainer, pl_module, metrics)
        if trainer.is_global_zero:
            picture = self._save_picture(trainer, epoch)
            name = getattr(self.evaluator, "__name__", "evaluator")
            log.info(f"[{name}] epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                     + f" ({cost:.1f} s)" + (f", picture {picture}" if picture else ""))

    def _save_picture(self, trainer: L.Trainer, epoch: int) -> Path | None:
        from densessl.evaluation.pictures import log_picture, result_panels

        folder = Path(self.picture_dir) if self.picture_dir else Path(trainer.default_root_dir) / "pictures"
        stem = self.prefix.replace("/", "_")
        path = result_panels(self.last, self.dataset, folder / f"{stem}_epoch{epoch}.png",
                             title=f"{self.prefix}, epoch {epoch}")
        if path is not None:
            log_picture(trainer.loggers, f"pictures/{self.prefix}", path, trainer.global_step)
            self.pictures.append(path)
        return path
