"""Datasets, synthetic scenes and joint segmentation transforms."""

from densessl.constants import IMAGENET_MEAN, IMAGENET_STD
from densessl.data.datasets import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    ADE20KSegmentation,
    BadImageError,
    ImageFolderDataset,
    SegTransform,
    VOCSegmentation,
    read_image,
    read_mask,
    skipped_files,
)
from densessl.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CityscapesSegmentation,
)
from densessl.data.coco import (
    COCO_STUFF_CLASSES,
    COCOStuffSegmentation,
    coco_stuff_lut,
)
from densessl.data.synthetic import (
    SYNTHETIC_CLASSES,
    default_cache_dir,
    ensure_synthetic_voc,
    make_synthetic_voc,
    voc_colormap,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KSegmentation",
    "BadImageError",
    "CITYSCAPES_CLASSES",
    "COCOStuffSegmentation",
    "COCO_STUFF_CLASSES",
    "CityscapesSegmentation",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "SYNTHETIC_CLASSES",
    "SegTransform",
    "VOCSegmentation",
    "VOC_CLASSES",
    "coco_stuff_lut",
    "default_cache_dir",
    "ensure_synthetic_voc",
    "make_synthetic_voc",
    "read_image",
    "read_mask",
    "skipped_files",
    "voc_colormap",
]
