"""Photometric augmentation on the batch's device with kornia (GPU when training on GPU)."""
from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from densessl.constants import IMAGENET_MEAN, IMAGENET_STD


class ColorAugment(nn.Module):
    """uint8 (B, 3, H, W) -> float normalised (B, 3, H, W), each image augmented independently.

    ColorJitter(b, c, s, h) with p=``jitter_p``, grayscale p, Gaussian blur sigma~U(0.1, 2) with p,
    optional solarisation, then ImageNet normalisation. Defaults follow NeCo's reference
    (jitter 0.8/0.8/0.8/0.2 with p=0.8, grayscale 0.2, blur 0.5, no solarise).

    ``channel_shuffle_p`` (a random RGB permutation) and ``invert_p`` (255 - x) are off by default, as in
    every reference: they are for data whose colours are a nuisance by construction, like the synthetic
    scenes, where every object is painted with random colours of one palette. There, a view pair that
    keeps its colours lets an objective match views by colour alone, and training makes the tokens *more*
    colour-coded (README, "Does training improve dense features?").
    """

    def __init__(self, brightness: float = 0.8, contrast: float = 0.8, saturation: float = 0.8, hue: float = 0.2,
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: tuple[float, float] = (0.1, 2.0), solarize_p: float = 0.0,
                 channel_shuffle_p: float = 0.0, invert_p: float = 0.0) -> None:
        super().__init__()
        self.blur_p, self.blur_sigma = blur_p, tuple(blur_sigma)
        ops: list[nn.Module] = []
        if jitter_p > 0:
            ops.append(K.ColorJitter(brightness, contrast, saturation, hue, p=jitter_p))
        if grayscale_p > 0:
            ops.append(K.RandomGrayscale(p=grayscale_p))
        if channel_shuffle_p > 0:
            ops.append(K.RandomChannelShuffle(p=channel_shuffle_p))
        if invert_p > 0:
            ops.append(K.RandomInvert(p=invert_p))
        self.ops = nn.Sequential(*ops)
        self.solarize = K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p) if solarize_p > 0 else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def blur(self, x: Tensor) -> Tensor:
        if self.blur_p <= 0:
            return x
        # Kernel covers +-3 sigma_max at this resolution's scale, as PIL's radius-sigma blur does.
        k = 2 * int(3 * self.blur_sigma[1]) + 1
        return K.RandomGaussianBlur((k, k), self.blur_sigma, p=self.blur_p)(x)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().div_(255) if images.dtype == torch.uint8 else images
        x = self.blur(self.ops(x))
        if self.solarize is not None:
            x = self.solarize(x)
        return (x - self.mean) / self.std


def normalize_uint8(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float, no augmentation (evaluation, teacher-only views)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std
