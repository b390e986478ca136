"""Supervised dense baseline: the upper bound of the results table, not a self-supervised objective.

The backbone and a 1x1 linear head (D -> C, bilinear upsampling of the logits, as the linear probe) are
trained together with pixel cross-entropy on the training split's segmentation masks. Views are one
joint RandomResizedCrop + flip of image and mask per sample (``SegTransform(train=True)``); colour
augmentation runs on the batch's device like every objective's, so the baseline sees the same photometric
invariances the self-supervised rows are trained for. It reads labels, so it needs a labelled training
dataset (``data.train`` yielding (image, mask), e.g. ``data=synthetic`` or ``data=voc``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densessl.data.datasets import SegTransform
from densessl.methods.base import SSLMethod


def collate_segmentation(samples: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """(uint8 image (3, S, S), mask (S, S)) pairs -> dict(crops=[(B, 3, S, S) uint8], masks=(B, S, S) int64)."""
    return {"crops": [torch.stack([s[0] for s in samples])], "masks": torch.stack([s[1] for s in samples]).long()}


class Supervised(SSLMethod):
    """Backbone + 1x1 head trained on masks (module docstring).

    Args (beyond :class:`SSLMethod`):
        num_classes: classes of the training masks (7 for ``data=synthetic``, 21 for VOC).
        crops: ``size`` and ``scale`` of the joint random resized crop.
        ignore_index: mask value left out of the loss (255, as VOC).
    """

    uses_labels = True

    def __init__(self, backbone: dict[str, Any], optim: dict[str, Any], num_classes: int,
                 crops: dict[str, Any] | None = None, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(backbone, optim, teacher=None, eval_on="student", crops=crops, **kwargs)
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.head = nn.Conv2d(self.student_backbone.embed_dim, self.num_classes, 1)

    def param_groups(self) -> list[tuple[str, nn.Module, float]]:
        return super().param_groups() + [("head", self.head, self.optim_cfg.head_lr)]

    def train_transform(self) -> Callable[[Any, Any], Any]:
        cfg = {"size": 224, "scale": (0.25, 1.0), **self.crops_cfg}
        return SegTransform(cfg["size"], normalize=False, train=True, crop_scale=tuple(cfg["scale"]))

    collate_fn = staticmethod(collate_segmentation)

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images, masks = batch["crops"][0], batch["masks"]
        tokens, (h, w) = self.student_backbone.forward_patches(images)  # (B, N, D)
        logits = self.head(tokens.reshape(len(images), h, w, -1).permute(0, 3, 1, 2))
        logits = F.interpolate(logits, size=tuple(masks.shape[-2:]), mode="bilinear")
        return {"loss": F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index), "dense": tokens}
