"""DSE of the eval backbone on a fixed held-out sample during training (no labels needed)."""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from densessl.callbacks.publish import publish_figures

log = logging.getLogger(__name__)


class DSEMonitor(L.Callback):
    """Every ``every_n_epochs`` epochs (or ``every_n_steps`` steps), compute DSE and its terms on the
    same ``num_images`` images of ``dataset`` and log them as ``dse/value``, ``dse/inter``, ... to every
    logger, one row at ``trainer.global_step`` per evaluation. The values also go to the trainer's
    ``callback_metrics`` (:func:`~densessl.callbacks.publish.publish_figures`), so
    ``ModelCheckpoint(monitor="dse/value", mode="max", save_top_k=k)`` keeps the top-k checkpoints by DSE.

    Under DDP the DSE is computed once, on rank 0, and broadcast: every rank holds the same figures, so
    ModelCheckpoint decides the same on every rank and the logs have one value per evaluation. Only
    ``dse/seconds`` differs between ranks (rank 0's cost vs. the others' wait); the logged max is rank 0's.

    ``options``: the fields of :class:`~densessl.metrics.DSEOptions` and evaluate_dse's num_images, image_size,
    batch_size, dse_batch (``callbacks.dse``), read at construction, so a misspelt key fails at start-up.
    """

    def __init__(self, dataset: Any, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 **options: Any) -> None:
        from densessl.evaluation.protocols import parse_dse_protocol

        self.dataset = dataset
        self.dse_options, self.sampling = parse_dse_protocol(options, "callbacks.dse")
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.history: list[dict[str, float]] = []

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from densessl.evaluation.protocols import evaluate_dse

        values = None
        start = time.perf_counter()
        if trainer.is_global_zero:
            with torch.inference_mode(False):
                result = evaluate_dse(pl_module.eval_backbone, self.dataset, self.dse_options, **self.sampling)
            values = result.as_dict("dse/")
        values = trainer.strategy.broadcast(values, src=0)
        cost = time.perf_counter() - start
        values["dse/seconds"] = cost
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **values})
        publish_figures(trainer, pl_module, values)
        if trainer.is_global_zero:
            log.info(f"[DSE] step {trainer.global_step}: value={values['dse/value']:.4f} inter={values['dse/inter']:.4f} "
                  f"intra_img={values['dse/intra_img']:.4f} intra_batch={values['dse/intra_batch']:.4f} "
                  f"dim={values['dse/dim']:.4f} ({cost:.1f} s)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)
