"""Constants shared across densessl's packages (data, transforms, evaluation), kept free of imports."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet, for input normalisation."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet, for input normalisation."""

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]
