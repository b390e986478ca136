"""LightningDataModule for SSL training on unlabeled images."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset


class UnlabeledImages(Dataset):
    """Any dataset whose items are images or (image, ...) tuples -> transform(image);
    ``with_labels``: (image, mask) items -> transform(image, mask)."""

    def __init__(self, dataset: Dataset, transform: Callable[..., Any], with_labels: bool = False) -> None:
        self.dataset, self.transform, self.with_labels = dataset, transform, with_labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if self.with_labels:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"this objective trains on masks, but data.train yields {type(item).__name__} "
                                 f"items; use a labelled dataset (data=synthetic, data=voc, ...)")
            return self.transform(*item)
        return self.transform(item[0] if isinstance(item, tuple) else item)


class SSLDataModule(L.LightningDataModule):
    """Training loader over ``dataset`` with the objective's view transform and collate function.

    ``max_images`` takes a fixed prefix of the dataset (quick runs and tests).
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], collate_fn: Callable | None,
                 batch_size: int, num_workers: int = 2, max_images: int | None = None, pin_memory: bool = False,
                 with_labels: bool = False) -> None:
        super().__init__()
        if max_images is not None:
            from torch.utils.data import Subset

            dataset = Subset(dataset, range(min(max_images, len(dataset))))  # type: ignore[arg-type]
        if len(dataset) < batch_size:  # type: ignore[arg-type]
            raise ValueError(f"the training set has {len(dataset)} images, fewer than data.batch_size={batch_size}")
        self.dataset = UnlabeledImages(dataset, transform, with_labels)
        self.collate_fn, self.batch_size = collate_fn, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)


def prepare_root(data_cfg: Any) -> None:
    """Generate the synthetic scenes on first use when the data config asks for them."""
    params = data_cfg.get("synthetic") if hasattr(data_cfg, "get") else None
    if params:
        from pathlib import Path

        from densessl.data.synthetic import ensure_synthetic_voc

        ensure_synthetic_voc(Path(str(data_cfg.root)), **dict(params))
