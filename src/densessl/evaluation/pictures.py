"""PNG panels of validation images next to their ground truth and predicted segmentations."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from densessl.data import voc_colormap


def colorize(labels: Tensor | np.ndarray) -> np.ndarray:
    """(H, W) class ids (255 = ignore) -> (H, W, 3) uint8 with the VOC colour map."""
    return voc_colormap()[np.asarray(labels, dtype=np.uint8)]


def save_panels(path: str | Path, images: list[np.ndarray], columns: dict[str, Tensor | np.ndarray],
                title: str = "") -> Path:
    """One row per image: the image, then one colour-coded map per entry of ``columns`` ((m, S, S)
    label maps, e.g. "ground truth", "overcluster K=100", "linear", "retrieval")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["image", *columns]
    fig, axes = plt.subplots(len(images), len(names), figsize=(2.2 * len(names), 2.2 * len(images)), squeeze=False)
    for r, image in enumerate(images):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(image if name == "image" else colorize(columns[name][r]), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def first_images(dataset: Any, count: int, size: int) -> list[np.ndarray]:
    """The first ``count`` images of a (PIL image, mask) dataset resized to size x size, HWC uint8."""
    return [np.asarray(dataset[i][0].convert("RGB").resize((size, size), Image.BILINEAR)) for i in range(count)]


def overcluster_panels(result: Any, dataset: Any, path: str | Path, title: str = "") -> Path | None:
    """Panels of the matched overclustering maps kept by ``overcluster(..., num_vis=m)``."""
    if result.vis_targets is None or not result.matched_maps:
        return None
    m, size = result.vis_targets.shape[0], result.vis_targets.shape[-1]
    columns = {"ground truth": result.vis_targets, **{f"overcluster K={k}": v for k, v in result.matched_maps.items()}}
    return save_panels(path, first_images(dataset, m, size), columns, title)


def log_picture(loggers: list[Any], key: str, path: Path, step: int) -> None:
    """Send a saved PNG to every logger that takes images (TensorBoard, Neptune, W&B, MLflow)."""
    image = np.asarray(Image.open(path).convert("RGB"))
    for logger in loggers:
        if hasattr(logger, "log_image") and type(logger).__name__ == "NeptuneLogger":
            logger.log_image(key, str(path), step=step)
        elif hasattr(logger.experiment, "add_image"):  # TensorBoard
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # W&B
            logger.log_image(key=key, images=[image], step=step)
        elif hasattr(logger.experiment, "log_artifact") and hasattr(logger, "run_id"):  # MLflow
            logger.experiment.log_artifact(logger.run_id, str(path))
