"""Linear segmentation probe on frozen patch tokens (docs/evaluation/linear.md).

Protocol of NeCo experiments/linear_segmentation/{linear_finetune,eval_linear}.py: frozen backbone
tokens at 448 px, a 1x1 conv head (D -> C) and bilinear upsampling to 100 x 100, cross-entropy with
ignore_index against masks nearest-downsampled to 100 x 100; SGD lr 0.01, momentum 0.9, weight decay
1e-4, StepLR x0.1 at epoch 20, batch 128; train augmentation RandomResizedCrop(448, scale 0.8-1) +
horizontal flip. Two figures are reported and named apart, because they differ by several points:
``miou_train_time_val_100px`` (validation during training, masks at 100 px) and ``miou_full_res``
(eval_linear.py: logits upsampled to the 448 x 448 masks). Both are plain confusion mIoU, no matching.

``solver="lbfgs"`` (cached features only) is densessl's converged probe: the same head and loss (pixel
cross-entropy on upsampled logits at ``train_mask_size``, L2 ``weight_decay``) minimised with full-batch
L-BFGS on z-scored tokens (the scaling is folded back into the head). The reference's SGD recipe is sized
for VOC trainaug (~2,000 steps of batch 128); on a few hundred images the same epochs are tens of steps,
and the head stays near "predict background" whatever the features: a probe that cannot tell features
apart. L-BFGS measures linear separability at convergence and needs no learning rate.

Schedule note: densessl's default is 25 epochs with the drop at 20; NeCo's shipped configs
(experiments/linear_segmentation/configs/pascal/*.yml) set max_epochs 20 and drop_at 20, i.e. no
drop: pass epochs=20 to reproduce those runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from densessl.data.datasets import SegTransform
from densessl.evaluation.datasets import WithTransform, dataset_num_classes, seg_loader
from densessl.evaluation.features import extract_dense_features
from densessl.evaluation.metrics import confusion_matrix, iou_from_confusion, miou
from densessl.evaluation.overcluster import resize_masks

__all__ = ["LinearResult", "LinearSegmentation", "linear_logits", "train_linear"]


def linear_logits(head: nn.Conv2d, tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """1x1-conv logits at ``size``: tokens (B, D, h, w) -> (B, C, *size).

    The reference upsamples the D-channel tokens to 100 x 100 and then applies the conv. We apply the
    conv first and upsample the C-channel logits: a 1x1 conv and bilinear interpolation are both
    linear and the interpolation weights of every output pixel sum to 1 (so the bias commutes too),
    hence the two orders give the same logits, at C/D of the cost (21 vs 384 channels at 100 x 100:
    4.1 vs 22.8 s/epoch on cached features). tests/evaluation/test_linear.py checks the equivalence.
    """
    logits = head(tokens)
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear")


class LinearSegmentation(L.LightningModule):
    """A 1x1 conv head on frozen tokens, trained with the reference schedule.

    backbone: a frozen module with ``forward_patches`` (batches are then normalised images
    (B, 3, H, W)), or None when batches carry cached tokens (B, h, w, D). Masks are (B, H, W) at any
    resolution, 255 = ignore; they are nearest-resized to ``train_mask_size`` / ``val_mask_size`` as
    the reference. Validation accumulates one confusion matrix per epoch and appends its mIoU to
    ``val_history`` (logged as ``miou_val``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        backbone: nn.Module | None = None,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        drop_at: int = 20,
        gamma: float = 0.1,
        ignore_index: int = 255,
        train_mask_size: int = 100,
        val_mask_size: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        if backbone is not None:
            backbone.requires_grad_(False)
        self.head = nn.Conv2d(embed_dim, num_classes, 1)
        self.criterion = nn.CrossEntropyLoss(ignore_index=ignore_index)
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.register_buffer("val_confusion", confusion, persistent=False)
        self.val_history: list[float] = []

    def train(self, mode: bool = True) -> LinearSegmentation:
        # The backbone stays in eval mode (dropout, stochastic depth off) as the reference's model.eval().
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def tokens(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) or cached tokens (B, h, w, D) -> tokens (B, D, h, w)."""
        if self.backbone is None:
            return x.float().permute(0, 3, 1, 2)
        with torch.no_grad():
            tokens, (h, w) = self.backbone.forward_patches(x)
        return tokens.float().reshape(len(x), h, w, -1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits (B, C, *size)."""
        return linear_logits(self.head, self.tokens(x), size)

    def predict(self, x: Tensor, masks: Tensor, mask_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(predicted classes (B, S, S) int64, targets (B, S, S) uint8) of one batch at ``mask_size``
        (None: the masks' own size)."""
        target = masks.to(torch.uint8) if mask_size is None else resize_masks(masks.to(torch.uint8), mask_size)
        return self(x, tuple(target.shape[-2:])).argmax(dim=1), target

    def confusion(self, x: Tensor, masks: Tensor, mask_size: int | None = None) -> Tensor:
        """(C, C) confusion (rows = predicted) of one batch, at ``mask_size`` (None: the masks' own size)."""
        pred, target = self.predict(x, masks, mask_size)
        c = self.hparams.num_classes
        return confusion_matrix(pred, target.long(), c, c, self.hparams.ignore_index)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, masks = batch
        target = resize_masks(masks.to(torch.uint8), self.hparams.train_mask_size).long()
        loss = self.criterion(self(x, tuple(target.shape[-2:])), target)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, masks = batch
        self.val_confusion += self.confusion(x, masks, self.hparams.val_mask_size)

    def on_validation_epoch_end(self) -> None:
        value = miou(self.val_confusion.cpu())
        self.val_confusion.zero_()
        if not self.trainer.sanity_checking:
            self.val_history.append(value)
        self.log("miou_val", value)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.head.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.drop_at, gamma=hp.gamma)]


@dataclass
class LinearResult:
    """Linear probe figures (fractions in [0, 1]).

    miou_train_time_val_100px: validation mIoU after the last epoch, masks at 100 px (training-time figure).
    miou_full_res: final evaluation, logits upsampled to the full mask resolution (image_size).
    iou_full_res: (C,) per-class IoU of the final evaluation. val_history: per-epoch 100 px mIoU.
    head: the trained 1x1 conv (CPU). timings: seconds per stage.
    vis_predictions / vis_targets: (m, S, S) uint8 predicted classes and ground truth (255 = ignore) of the
    first m = ``num_vis`` val images at the resolution of ``miou_full_res`` (S = image_size), or None.
    """

    vis_name: ClassVar[str] = "linear"  # column title in the PNG panels (densessl.evaluation.pictures)

    miou_train_time_val_100px: float
    miou_full_res: float
    iou_full_res: Tensor
    val_history: list[float]
    head: nn.Conv2d
    timings: dict[str, float] = field(default_factory=dict)
    vis_predictions: Tensor | None = None
    vis_targets: Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        return {
            "linear_miou_train_time_val_100px": self.miou_train_time_val_100px,
            "linear_miou_full_res": self.miou_full_res,
            **{f"linear_{name}": value for name, value in self.timings.items()},
        }


def _cached_dataset(backbone: nn.Module, dataset: Any, image_size: int, batch_size: int, num_workers: int,
                    device: torch.device, amp: bool, mask_size: int | None, progress: bool = False) -> TensorDataset:
    """(tokens (n, h, w, D), masks (n, S, S) uint8) of a whole split; masks kept at mask_size (None: image_size)."""
    loader = seg_loader(dataset, image_size, batch_size, num_workers)
    features = extract_dense_features(backbone, loader, device=device, amp=amp, progress=progress)
    masks = features.masks if mask_size is None else resize_masks(features.masks, mask_size)
    return TensorDataset(features.tokens, masks)


def _validate(module: LinearSegmentation, loader: DataLoader, device: torch.device) -> float:
    """mIoU of ``module`` over ``loader`` at its ``val_mask_size`` (the training-time validation figure)."""
    module.to(device).eval()
    c = module.hparams.num_classes
    conf = torch.zeros(c, c, dtype=torch.int64)
    with torch.inference_mode():
        for x, masks in loader:
            conf += module.confusion(x.to(device), masks.to(device), module.hparams.val_mask_size).cpu()
    return miou(conf)


def fit_lbfgs(head: nn.Conv2d, tokens: Tensor, masks: Tensor, weight_decay: float = 1e-4, ignore_index: int = 255,
              max_iter: int = 200, chunk: int = 256) -> None:
    """Fit ``head`` in place to convergence: full-batch L-BFGS on mean pixel cross-entropy of the
    bilinearly upsampled logits + weight_decay / 2 * |params|^2 of the head on z-scored tokens.

    tokens (n, h, w, D) cached features; masks (n, S, S) at the loss resolution, ``ignore_index`` left out.
    The tokens are z-scored with their own statistics for conditioning; the head is fitted on them and
    mapped back to raw tokens. Each iteration is one pass over the data in chunks of ``chunk`` images.
    """
    d = tokens.shape[-1]
    flat = tokens.reshape(-1, d).float()
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    size = tuple(masks.shape[-2:])
    counted = int((masks != ignore_index).sum())
    if counted == 0:
        raise ValueError("every training mask pixel is the ignore label: nothing to fit the linear head on")
    z = nn.Conv2d(d, head.out_channels, 1).to(tokens.device)
    optimizer = torch.optim.LBFGS(z.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=tokens.device)
        for i in range(0, len(tokens), chunk):
            x = ((tokens[i:i + chunk].float() - mean) / std).permute(0, 3, 1, 2)
            target = masks[i:i + chunk].long()
            loss = F.cross_entropy(linear_logits(z, x, size), target, ignore_index=ignore_index, reduction="sum")
            (loss / counted).backward()
            total += loss.detach() / counted
        reg = 0.5 * weight_decay * sum(p.pow(2).sum() for p in z.parameters())
        reg.backward()
        return total + reg.detach()

    optimizer.step(closure)
    with torch.no_grad():  # z-scored head -> raw-token head: W x' + b = (W / std) x + (b - W mean / std)
        w = z.weight[:, :, 0, 0] / std
        head.weight.copy_(w[:, :, None, None])
        head.bias.copy_(z.bias - w @ mean)


def train_linear(
    backbone: nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    *,
    num_classes: int | None = None,
    image_size: int = 448,
    epochs: int = 25,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    drop_at: int = 20,
    gamma: float = 0.1,
    augment: bool = True,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    cache_features: bool = False,
    train_mask_size: int = 100,
    val_mask_size: int = 100,
    ignore_index: int = 255,
    eval_batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    seed: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
    num_vis: int = 0,
    solver: str = "sgd",
    max_iter: int = 200,
    progress: bool = False,
) -> LinearResult:
    """Train a linear segmentation head on the frozen ``backbone`` and evaluate it (module docstring).

    Datasets yield ``(PIL image, PIL mask)`` pairs. augment=True (default, reference parity) applies
    RandomResizedCrop(image_size, crop_scale) + flip, so the backbone runs on every batch of every
    epoch. augment=False + cache_features=True extracts the tokens of both splits once (memory:
    n * h * w * D * 4 bytes, e.g. 16.6 GB for VOC trainaug with ViT-S/14 at 448) and trains the head
    alone, far faster. The train loader keeps the last partial batch (the reference drops it).
    ``trainer_kwargs`` override the Lightning Trainer defaults (no logger, no checkpoints, no
    progress bar). The run is reproducible for a given ``seed``; torch's global RNG state, the
    backbone's device, mode and requires_grad flags are restored afterwards. ``num_vis`` keeps the
    predictions and targets of the first val images of the final evaluation for pictures (no extra pass).
    ``solver``: "sgd" (the reference recipe above) or "lbfgs" (cached features only: ``max_iter`` full-batch
    L-BFGS iterations to convergence; ``epochs``, ``batch_size``, ``lr``, ``momentum`` and the schedule are unused).
    ``progress``: tqdm bars of the feature caching (cache_features=True; stderr, terminals only).
    """
    if solver not in ("sgd", "lbfgs"):
        raise ValueError(f"solver must be 'sgd' or 'lbfgs', got {solver!r}")
    if solver == "lbfgs" and not cache_features:
        raise ValueError("solver='lbfgs' fits the head on cached tokens: pass cache_features=True and augment=False")
    if cache_features and augment:
        raise ValueError(
            "cache_features=True needs augment=False: the random crop + flip changes the backbone input every "
            "epoch, so its tokens cannot be cached (pass augment=False for the fast cached protocol)"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    num_classes = num_classes or dataset_num_classes(train_dataset)
    original_device = next(backbone.parameters()).device
    device = torch.device(device) if device is not None else original_device
    flags = [p.requires_grad for p in backbone.parameters()]
    was_training = backbone.training
    timings: dict[str, float] = {}
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)  # head initialisation (first) and main-process augmentations
            module = LinearSegmentation(
                backbone.embed_dim, num_classes, backbone=None if cache_features else backbone, lr=lr,
                momentum=momentum, weight_decay=weight_decay, drop_at=drop_at, gamma=gamma,
                ignore_index=ignore_index, train_mask_size=train_mask_size, val_mask_size=val_mask_size,
            )
            start = time.perf_counter()
            if cache_features:
                backbone.to(device)
                train_data = _cached_dataset(backbone, train_dataset, image_size, eval_batch_size, num_workers,
                                             device, amp, train_mask_size, progress)
                val_data = _cached_dataset(backbone, val_dataset, image_size, eval_batch_size, num_workers,
                                           device, amp, None, progress)
                train_workers = 0  # tensors already in memory
            else:
                transform = SegTransform(image_size, train=augment, crop_scale=crop_scale)
                train_data = WithTransform(train_dataset, transform)
                val_data = WithTransform(val_dataset, SegTransform(image_size))
                train_workers = num_workers
            timings["cache_features_s"] = time.perf_counter() - start
            train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, num_workers=train_workers,
                                      generator=torch.Generator().manual_seed(seed))
            val_loader = DataLoader(val_data, batch_size=eval_batch_size, shuffle=False,
                                    num_workers=0 if cache_features else num_workers)
            cuda = device.type == "cuda"
            kwargs: dict[str, Any] = dict(
                max_epochs=epochs, accelerator="gpu" if cuda else "cpu", devices=[device.index or 0] if cuda else 1,
                precision=("16-mixed" if cuda else "bf16-mixed") if amp else "32-true", logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            start = time.perf_counter()
            if solver == "lbfgs":
                fit_lbfgs(module.head, *train_data.tensors, weight_decay, ignore_index, max_iter)
                module.val_history.append(_validate(module, val_loader, device))
            else:
                trainer = L.Trainer(**{**kwargs, **(trainer_kwargs or {})})
                trainer.fit(module, train_loader, val_loader)
                timings["fit_per_epoch_s"] = (time.perf_counter() - start) / max(1, trainer.current_epoch)
            timings["fit_s"] = time.perf_counter() - start

            start = time.perf_counter()
            module.to(device).eval()
            conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
            vis_pred: list[Tensor] = []
            vis_gt: list[Tensor] = []
            kept = 0
            with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=amp):
                for x, masks in val_loader:
                    pred, target = module.predict(x.to(device), masks.to(device))
                    conf += confusion_matrix(pred, target.long(), num_classes, num_classes, ignore_index).cpu()
                    if kept < num_vis:
                        vis_pred.append(pred[: num_vis - kept].to(torch.uint8).cpu())
                        vis_gt.append(target[: num_vis - kept].cpu())
                        kept += len(vis_pred[-1])
            timings["eval_full_res_s"] = time.perf_counter() - start
    finally:
        # Lightning's teardown moves the whole module (backbone included) to the CPU.
        backbone.to(original_device).train(was_training)
        for param, flag in zip(backbone.parameters(), flags):
            param.requires_grad_(flag)
    history = module.val_history
    return LinearResult(
        miou_train_time_val_100px=history[-1] if history else float("nan"),
        miou_full_res=miou(conf),
        iou_full_res=iou_from_confusion(conf).nan_to_num(0.0),
        val_history=list(history),
        head=module.head.cpu(),
        timings=timings,
        vis_predictions=torch.cat(vis_pred) if vis_pred else None,
        vis_targets=torch.cat(vis_gt) if vis_gt else None,
    )
