"""Dense (patch-token) feature extraction for the frozen-backbone evaluators."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from densessl.evaluation.runtime import progress_bar

__all__ = ["DenseFeatures", "extract_dense_features"]


@dataclass
class DenseFeatures:
    """Patch tokens of a whole split and the matching segmentation masks.

    tokens: (n, h, w, D) float32, on the CPU.
    masks: (n, H', W') uint8, 255 = ignore.
    image_size: (H, W) of the backbone input; None means the masks are already at that size.
    """

    tokens: Tensor
    masks: Tensor
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 4 or self.tokens.dtype != torch.float32:
            raise ValueError(f"tokens must be float32 (n, h, w, D), got {self.tokens.dtype} {tuple(self.tokens.shape)}")
        if self.masks.ndim != 3 or self.masks.dtype != torch.uint8:
            raise ValueError(f"masks must be uint8 (n, H, W), got {self.masks.dtype} {tuple(self.masks.shape)}")
        if len(self.tokens) != len(self.masks):
            raise ValueError(f"{len(self.tokens)} token maps but {len(self.masks)} masks")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w)."""
        return tuple(self.tokens.shape[1:3])

    @property
    def num_images(self) -> int:
        return len(self.tokens)


def _num_images(loader: Iterable, max_images: int | None) -> int:
    try:
        total = len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        if max_images is None:
            raise ValueError("the loader has no sized .dataset: pass max_images to size the feature buffer") from None
        return max_images
    return total if max_images is None else min(total, max_images)


def _num_batches(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def extract_dense_features(
    backbone: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device = "cpu",
    amp: bool = False,
    max_images: int | None = None,
    progress: bool = False,
) -> DenseFeatures:
    """Run ``backbone.forward_patches`` over ``loader`` and keep all tokens and masks on the CPU.

    The loader yields ``(images (B, 3, H, W) normalised float, masks (B, H', W') int64)``; the backbone
    must already be on ``device``. It runs in eval mode under ``inference_mode`` (its previous mode is
    restored). Buffers are allocated once from the first batch and filled in place, so peak memory is
    one copy of the features (a list + cat would hold two). ``progress``: a tqdm bar of the batches
    (stderr, terminals only).
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    capacity = _num_images(loader, max_images)
    device = torch.device(device)
    tokens = masks = None
    image_size = None
    filled = 0
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=amp):
            batches = progress_bar(loader, enabled=progress, total=_num_batches(loader), desc="features", unit="batch")
            for images, batch_masks in batches:
                if filled >= capacity:
                    break
                if not images.is_floating_point():
                    raise ValueError(
                        f"images must be normalised float tensors, got {images.dtype}: apply the ImageNet "
                        "normalisation (densessl.data.IMAGENET_MEAN/STD) in the dataset transform"
                    )
                if batch_masks.numel() and (batch_masks.min() < 0 or batch_masks.max() > 255):
                    raise ValueError("mask values must lie in [0, 255] (class ids, 255 = ignore)")
                take = min(len(images), capacity - filled)
                out, (h, w) = backbone.forward_patches(images[:take].to(device, non_blocking=True))
                if tokens is None:
                    image_size = tuple(images.shape[-2:])
                    # Allocated outside inference mode so callers may later modify them in place.
                    with torch.inference_mode(False):
                        tokens = torch.empty(capacity, h, w, out.shape[-1], dtype=torch.float32)
                        masks = torch.empty(capacity, *batch_masks.shape[-2:], dtype=torch.uint8)
                tokens[filled : filled + take].copy_(out.reshape(take, h, w, -1))
                masks[filled : filled + take].copy_(batch_masks[:take])
                filled += take
    finally:
        backbone.train(was_training)
    if tokens is None:
        raise ValueError("the loader yielded no batches")
    # Fewer images than the dataset size (drop_last): views of the filled part, no copy.
    return DenseFeatures(tokens[:filled], masks[:filled], image_size)
