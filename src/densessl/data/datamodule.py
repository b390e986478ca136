"""LightningDataModule for SSL training on unlabeled images, resumable mid-epoch."""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python, NumPy and torch CPU RNGs seeded with ``seed`` inside, restored after (CUDA untouched)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class UnlabeledImages(Dataset):
    """Any dataset whose items are images or (image, ...) tuples -> transform(image);
    ``with_labels``: (image, mask) items -> transform(image, mask).

    A key ``(index, seed)`` (what :class:`ResumableSampler` yields) runs the transform under
    :func:`seeded`, so an item's augmentation depends on that seed alone: not on the worker that
    loads it, on what was loaded before, or on a resume."""

    def __init__(self, dataset: Dataset, transform: Callable[..., Any], with_labels: bool = False) -> None:
        self.dataset, self.transform, self.with_labels = dataset, transform, with_labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self._load(key)
        with seeded(key[1]):
            return self._load(key[0])

    def _load(self, i: int) -> Any:
        item = self.dataset[i]
        if self.with_labels:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"this objective trains on masks, but data.train yields {type(item).__name__} "
                                 f"items; use a labelled dataset (data=synthetic, data=voc, ...)")
            return self.transform(*item)
        return self.transform(item[0] if isinstance(item, tuple) else item)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled ``(index, item seed)`` pairs of one epoch, a pure function of (seed, epoch); this rank
    takes every ``world``-th pair (the tail that does not divide evenly is dropped, as
    DistributedSampler does). ``skip`` leaves out the first pairs of epoch ``epoch`` once: the batches
    a resumed run has already trained on. The length stays the full epoch's, as Lightning counts the
    skipped batches itself."""

    def __init__(self, n: int, seed: int, epoch: int = 0, skip: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.epoch, self.skip, self.rank, self.world = n, seed, epoch, skip, rank, world

    def set_epoch(self, epoch: int) -> None:  # called by Lightning before each epoch
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        order = torch.randperm(self.n, generator=gen)
        seeds = torch.randint(0, 2**62, (self.n,), generator=gen)
        mine = range(self.rank, len(self) * self.world, self.world)[self.skip:]
        return iter([(int(order[p]), int(seeds[p])) for p in mine])


class SSLDataModule(L.LightningDataModule):
    """Training loader over ``dataset`` with the objective's view transform and collate function.

    ``max_images`` takes a fixed prefix of the dataset (quick runs and tests). The order and every
    item's augmentation follow from ``seed`` and the epoch (:class:`ResumableSampler`); checkpoints
    carry the loader's position, so a run resumed mid-epoch sees the batches it would have seen.
    The loader shards itself across ranks: train with ``Trainer(use_distributed_sampler=False)``.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], collate_fn: Callable | None,
                 batch_size: int, num_workers: int = 2, max_images: int | None = None, pin_memory: bool = False,
                 seed: int = 0, worker_init_fn: Callable[[int], None] | None = None, with_labels: bool = False) -> None:
        super().__init__()
        if max_images is not None:
            from torch.utils.data import Subset

            dataset = Subset(dataset, range(min(max_images, len(dataset))))  # type: ignore[arg-type]
        if len(dataset) < batch_size:  # type: ignore[arg-type]
            raise ValueError(f"the training set has {len(dataset)} images, fewer than data.batch_size={batch_size}")
        self.dataset = UnlabeledImages(dataset, transform, with_labels)
        self.collate_fn, self.batch_size, self.seed = collate_fn, batch_size, seed
        self.num_workers, self.pin_memory, self.worker_init_fn = num_workers, pin_memory, worker_init_fn
        self.sampler: ResumableSampler | None = None
        self.start = {"epoch": 0, "batches": 0}

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        self.sampler = ResumableSampler(len(self.dataset), self.seed, self.start["epoch"],
                                        self.start["batches"] * self.batch_size, rank, world)
        # A private generator for the workers' base seed: the default one would take a draw from the
        # global RNG at every epoch start, a draw that a resumed run does not make at the same point.
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, generator=gen,
                          worker_init_fn=self.worker_init_fn)

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from: the epoch and the batches the fit loop has run in it. Once
        an epoch is over (its last batch run, or Lightning's epoch counter past it, as after a
        max_steps stop) that is the next epoch, none run: Lightning resumes there too."""
        if self.sampler is None or self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.processed
        if loop.epoch_progress.current.processed > self.sampler.epoch or done >= self.trainer.num_training_batches:
            return {"epoch": self.sampler.epoch + 1, "batches": 0, "world": self.sampler.world}
        # "world": a mid-epoch position counts batches per rank (training.check_resume_checkpoint).
        return {"epoch": self.sampler.epoch, "batches": done, "world": self.sampler.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = {**self.start, **state}


def prepare_root(data_cfg: Any) -> None:
    """Generate the synthetic scenes on first use when the data config asks for them."""
    params = data_cfg.get("synthetic") if hasattr(data_cfg, "get") else None
    if params:
        from pathlib import Path

        from densessl.data.synthetic import ensure_synthetic_voc

        ensure_synthetic_voc(Path(str(data_cfg.root)), **dict(params))
