"""Dataset wrappers and queries shared by the evaluators (linear probe, retrieval, protocols)."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["WithTransform", "dataset_num_classes"]


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
