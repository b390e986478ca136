"""Evaluators wired to backbones and datasets: the one place the CLI, the training callbacks and
the before/after report call, so every entry point runs the same protocol."""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

from torch.utils.data import DataLoader, Dataset

from densessl.constants import IMAGENET_MEAN, IMAGENET_STD
from densessl.evaluation.datasets import first_images, seg_loader
from densessl.evaluation.features import extract_dense_features
from densessl.evaluation.linear import LinearResult, train_linear
from densessl.evaluation.overcluster import OverclusterOptions, OverclusterResult, overcluster
from densessl.evaluation.retrieval import RetrievalResult, hummingbird
from densessl.metrics import DSEOptions, DSEResult, dse_over_batches
from densessl.options import check_keys, with_overrides


logger = logging.getLogger(__name__)


def evaluate_overclustering(backbone: Any, dataset: Any, options: OverclusterOptions | None = None, *,
                            num_workers: int = 0, device: str | None = None, progress: bool = False,
                            **overrides: Any) -> OverclusterResult:
    """Frozen patch tokens of ``backbone`` on ``dataset`` (options.image_size x options.image_size input) ->
    the overclustering protocol of NeCo/Leopart (``densessl.evaluation.overcluster``). ``options``:
    :class:`OverclusterOptions` (default: the offline protocol); ``overrides`` replace single fields."""
    options = with_overrides(OverclusterOptions, options, overrides)
    base = dataset.dataset if hasattr(dataset, "dataset") else dataset
    num_classes = int(getattr(base, "num_classes"))
    device = device or next(backbone.parameters()).device
    loader = seg_loader(dataset, options.image_size, options.batch_size, num_workers, options.max_images)
    features = extract_dense_features(backbone, loader, device=device, progress=progress)
    return overcluster(features, num_classes, options, progress=progress)


def evaluate_linear(backbone: Any, train_dataset: Any, val_dataset: Any, *, max_train_images: int | None = None,
                    max_val_images: int | None = None, **options: Any) -> LinearResult:
    """Linear segmentation probe of the frozen ``backbone`` (``densessl.evaluation.linear.train_linear``;
    datasets yield (PIL image, PIL mask); ``options`` are train_linear's, e.g. image_size, epochs,
    augment, cache_features, device)."""
    return train_linear(backbone, first_images(train_dataset, max_train_images),
                        first_images(val_dataset, max_val_images), **options)


def evaluate_retrieval(backbone: Any, train_dataset: Any, val_dataset: Any, *, max_train_images: int | None = None,
                       max_val_images: int | None = None, **options: Any) -> RetrievalResult:
    """Hummingbird dense NN retrieval of the frozen ``backbone`` (``densessl.evaluation.retrieval.hummingbird``;
    ``options`` are hummingbird's, e.g. image_size, memory_size, augmentation_epochs, k, gpu)."""
    return hummingbird(backbone, first_images(train_dataset, max_train_images),
                       first_images(val_dataset, max_val_images), **options)


def load_backbone(backbone_cfg: dict[str, Any], weights: str | None = None) -> Any:
    """Build the backbone to evaluate. ``weights`` may be None (use ``backbone_cfg['weights']``),
    'hub', 'none', a checkpoint file, or a densessl training run folder: then the run's own backbone
    config and its exported ``backbone.pth`` (else ``checkpoints/last.ckpt``) are used."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from densessl.models import Backbone

    cfg = dict(backbone_cfg)
    if weights:
        run = Path(weights).expanduser()
        if run.is_dir():
            if not (run / "config.yaml").is_file():
                raise FileNotFoundError(f"{run} is a folder but not a densessl run (no config.yaml); pass a "
                                        f"checkpoint file or a run folder written by experiments/train.py")
            cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").backbone, resolve=True)
            found = [p for p in (run / "backbone.pth", run / "checkpoints" / "last.ckpt") if p.is_file()]
            if not found:
                others = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
                raise FileNotFoundError(
                    f"weights={run}: the run folder has no backbone.pth (written when training ends) and no "
                    f"checkpoints/last.ckpt (written after the first epoch)"
                    f"{'; pass one of its checkpoints: weights=' + str(run / 'checkpoints' / others[-1]) if others else ''}"
                    f". Evaluate a run that wrote a checkpoint, or pass weights=/path/to/checkpoint.pth.")
            weights = str(found[0])
        cfg["weights"], cfg["weights_key"] = weights, "weights"
    cfg["drop_path_rate"] = 0.0
    return Backbone(**cfg).eval()


def write_results(out_dir: Any, name: str, figures: dict[str, float], table: str) -> None:
    """figures -> out_dir/{name}.json and .csv; the table goes to the log (INFO: the console and Hydra's
    log file)."""
    import csv
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2))
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "value"])
        writer.writerows(sorted(figures.items()))
    logger.info("%s", table)
    logger.info("\nresults: %s and %s", out / f"{name}.json", out / f"{name}.csv")


class _ImagesForDSE(Dataset):
    """Items of ``dataset`` at ``indices`` -> (transformed image, 1x1 placeholder mask), the shape
    ``extract_dense_features`` takes; DSE needs no labels."""

    def __init__(self, dataset: Any, indices: list[int], transform: Any) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        import torch

        item = self.dataset[self.indices[i]]
        image = item[0] if isinstance(item, tuple) else item
        return self.transform(image.convert("RGB")), torch.zeros(1, 1, dtype=torch.int64)


def dse_features(backbone: Any, dataset: Any, *, num_images: int, image_size: int, batch_size: int, seed: int,
                 device: Any = None, progress: bool = False) -> Any:
    """Frozen patch tokens (n, N, D) of ``num_images`` images drawn with ``seed`` from ``dataset``
    (images or (image, mask) items), resized (bicubic, shorter side image_size * 8/7) and centre-cropped
    to image_size and ImageNet-normalised, as the DSE reference (Resize 256, CenterCrop 224)."""
    import torch
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(round(image_size * 8 / 7), interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images].tolist()
    loader = DataLoader(_ImagesForDSE(dataset, order, tf), batch_size=batch_size, shuffle=False)
    tokens = extract_dense_features(backbone, loader, device=device or next(backbone.parameters()).device,
                                    progress=progress).tokens
    return tokens.flatten(1, 2)  # (n, h, w, D) -> (n, N, D)


def evaluate_dse(backbone: Any, dataset: Any, options: DSEOptions | None = None, *, num_images: int = 2048,
                 image_size: int = 224, batch_size: int = 64, dse_batch: int = 1024, device: Any = None,
                 progress: bool = False) -> DSEResult:
    """DSE (``densessl.metrics.dse``, ``options`` default the README's) of ``backbone`` on a fixed sample of
    ``dataset`` drawn with ``options.seed``: terms per batch of ``dse_batch`` images, averaged over batches
    with equal weight (reference get_DSE.py)."""
    options = options or DSEOptions()
    feats = dse_features(backbone, dataset, num_images=num_images, image_size=image_size, batch_size=batch_size,
                         seed=options.seed, device=device, progress=progress)
    return dse_over_batches(feats.split(dse_batch), options)


# The keys of a DSE protocol config block (eval.options, callbacks.dse) that are evaluate_dse's own.
DSE_SAMPLING_KEYS = ("num_images", "image_size", "batch_size", "dse_batch")


def parse_dse_protocol(values: dict[str, Any], prefix: str) -> tuple[DSEOptions, dict[str, Any]]:
    """A flat config block of the DSE protocol -> (its DSEOptions fields as DSEOptions, its
    DSE_SAMPLING_KEYS as evaluate_dse keywords); any other key is a ValueError naming ``<prefix>.<key>``."""
    names = [f.name for f in fields(DSEOptions)]
    check_keys(values, [*DSE_SAMPLING_KEYS, *names], prefix)
    sampling = {k: v for k, v in values.items() if k in DSE_SAMPLING_KEYS}
    return DSEOptions(**{k: v for k, v in values.items() if k in names}), sampling
