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


def prediction_columns(result: Any) -> dict[str, Tensor]:
    """The picture columns an evaluation result carries: name -> (m, S, S) label maps of its first m val
    images. Overclustering (``matched_maps``): one "overcluster K=k" column per K; results with
    ``vis_predictions`` (linear, retrieval): one column named by their ``vis_name``. Empty when the
    evaluation kept no pictures (num_vis=0)."""
    if getattr(result, "vis_targets", None) is None:
        return {}
    columns = {f"overcluster K={k}": maps for k, maps in (getattr(result, "matched_maps", None) or {}).items()}
    if getattr(result, "vis_predictions", None) is not None:
        columns[getattr(result, "vis_name", type(result).__name__)] = result.vis_predictions
    return columns


def result_panels(results: Any, dataset: Any, path: str | Path, title: str = "") -> Path | None:
    """PNG panel of one evaluation result, or of several evaluated on the same val images (a list):
    image | ground truth | the prediction columns of every result in order (e.g. overcluster K=..,
    linear, retrieval). Rows are the first m images of ``dataset`` (m = the fewest kept by any result);
    the ground truth is the first result's. Maps of different resolutions (overclustering at mask_size,
    linear and retrieval at image_size) are drawn over the same square, so they line up. Returns None
    when no result carries pictures."""
    results = [r for r in (results if isinstance(results, (list, tuple)) else [results]) if prediction_columns(r)]
    if not results:
        return None
    targets = results[0].vis_targets
    m = min(len(r.vis_targets) for r in results)
    columns: dict[str, Tensor | np.ndarray] = {"ground truth": targets[:m]}
    for result in results:
        for name, maps in prediction_columns(result).items():
            columns.setdefault(name, maps[:m])  # a column shown twice (same evaluator) keeps the first
    return save_panels(path, first_images(dataset, m, targets.shape[-1]), columns, title)


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
