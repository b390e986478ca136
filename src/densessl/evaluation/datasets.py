"""Dataset wrappers and queries shared by the evaluators (linear probe, retrieval, protocols)."""
from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset, Subset

from densessl.data.datasets import SegTransform

__all__ = ["WithTransform", "dataset_num_classes", "first_images", "seg_loader"]


class WithTransform(Dataset):
    """``dataset``'s (image, mask) items passed through the joint ``transform(image, mask)``."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        image, mask = self.dataset[i]
        return self.transform(image, mask)


def dataset_num_classes(dataset: Any) -> int:
    """``num_classes`` of ``dataset``, or of the dataset under its wrappers (Subset, ...)."""
    base = dataset
    while not hasattr(base, "num_classes") and hasattr(base, "dataset"):  # Subset, wrappers
        base = base.dataset
    if not hasattr(base, "num_classes"):
        raise ValueError("the dataset has no num_classes attribute: pass num_classes=")
    return int(base.num_classes)


def first_images(dataset: Any, max_images: int | None) -> Any:
    """The first ``max_images`` items of ``dataset`` (all of it for None)."""
    if max_images is None:
        return dataset
    return Subset(dataset, range(min(max_images, len(dataset))))


def seg_loader(dataset: Any, image_size: int, batch_size: int, num_workers: int = 0,
               max_images: int | None = None) -> DataLoader:
    """(image resized to image_size and normalised, mask nearest-resized to image_size) batches."""
    return DataLoader(WithTransform(first_images(dataset, max_images), SegTransform(image_size)), batch_size=batch_size,
                      num_workers=num_workers, shuffle=False)
