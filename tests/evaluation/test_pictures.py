"""PNG panels of evaluation results (densessl.evaluation.pictures) on hand-made label maps."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data import voc_colormap
from densessl.evaluation.linear import LinearResult
from densessl.evaluation.overcluster import OverclusterResult
from densessl.evaluation.pictures import prediction_columns, result_panels
from densessl.evaluation.retrieval import RetrievalResult

CELL = 176  # save_panels: 2.2 inch per cell at 80 dpi
ROOT = Path(__file__).resolve().parents[2]


def images(n: int) -> list[tuple[Image.Image, Image.Image]]:
    return [(Image.new("RGB", (40, 40), (255, 255, 255)), Image.new("L", (40, 40))) for _ in range(n)]


def maps(m: int, size: int, value: int) -> torch.Tensor:
    return torch.full((m, size, size), value, dtype=torch.uint8)


def overcluster_result(m: int, ks=(7, 20)) -> OverclusterResult:
    # Overclustering maps at its mask size (16); ground truth class 1, K=7 -> class 2, K=20 -> class 3.
    return OverclusterResult(7, (0,), {k: [0.5] for k in ks}, {k: maps(m, 16, 2 + i) for i, k in enumerate(ks)},
                             maps(m, 16, 1))


def linear_result(m: int) -> LinearResult:
    # At the linear probe's image size (24): predictions class 4.
    return LinearResult(0.5, 0.5, torch.zeros(7), [0.5], torch.nn.Conv2d(1, 7, 1),
                        vis_predictions=maps(m, 24, 4), vis_targets=maps(m, 24, 1))


def empty_linear() -> LinearResult:  # num_vis=0
    return LinearResult(0.5, 0.5, torch.zeros(7), [0.5], torch.nn.Conv2d(1, 7, 1))


def retrieval_result(m: int) -> RetrievalResult:
    vis_targets = maps(m, 24, 1)
    vis_targets[:, :4] = 255
    return RetrievalResult(0.5, 0.5, torch.zeros(7), torch.zeros(7, 7, dtype=torch.int64), 10, 10, m,
                           vis_predictions=maps(m, 24, 5), vis_targets=vis_targets)


def cell_centre(png: np.ndarray, row: int, col: int) -> tuple[int, ...]:
    # Titles and tight_layout shift the axes by a few pixels; the centre stays well inside each map.
    return tuple(png[row * CELL + CELL // 2 + 4, col * CELL + CELL // 2])


def test_prediction_columns_of_each_result_type():
    assert list(prediction_columns(overcluster_result(2))) == ["overcluster K=7", "overcluster K=20"]
    assert list(prediction_columns(linear_result(2))) == ["linear"]
    assert list(prediction_columns(retrieval_result(2))) == ["retrieval"]
    # num_vis=0: nothing kept, no columns, no file.
    assert prediction_columns(empty_linear()) == {} and prediction_columns(OverclusterResult(7, (0,), {7: [0.5]})) == {}


def test_single_result_panel_size_and_columns(tmp_path):
    path = result_panels(linear_result(3), images(5), tmp_path / "linear.png")
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[:2] == (3 * CELL, 3 * CELL)  # 3 rows; image | ground truth | linear
    colours = voc_colormap()
    for row in range(3):
        assert cell_centre(png, row, 0) == (255, 255, 255)
        assert cell_centre(png, row, 1) == tuple(colours[1]) and cell_centre(png, row, 2) == tuple(colours[4])
    assert result_panels(OverclusterResult(7, (0,), {7: [0.5]}), images(5), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_merged_panel_of_three_results_on_the_same_images(tmp_path):
    # overcluster kept 3 images, linear 2, retrieval 4: the panel has the 2 images all of them kept.
    results = [overcluster_result(3), linear_result(2), retrieval_result(4), empty_linear()]
    path = result_panels(results, images(5), tmp_path / "sub" / "merged.png", title="after training")
    png = np.asarray(Image.open(path).convert("RGB"))
    # image | ground truth | overcluster K=7 | overcluster K=20 | linear | retrieval
    assert png.shape[:2] == (2 * CELL, 6 * CELL)
    colours = voc_colormap()
    for row in range(2):
        got = [cell_centre(png, row, col) for col in range(1, 6)]
        assert got == [tuple(colours[c]) for c in (1, 2, 3, 4, 5)]
    # The same evaluator twice (e.g. the overclustering callback and the after-training evaluation): one column.
    path = result_panels([overcluster_result(2, ks=(7,)), overcluster_result(2, ks=(7,))], images(2),
                         tmp_path / "dup.png")
    assert np.asarray(Image.open(path)).shape[:2] == (2 * CELL, 3 * CELL)


@pytest.mark.parametrize("name,options", [
    ("linear", ["eval.options.epochs=1", "eval.options.augment=false", "eval.options.cache_features=true",
                "eval.options.train_mask_size=16", "eval.options.val_mask_size=16"]),
    ("retrieval", ["eval.options.augmentation_epochs=1", "eval.options.k=5", "eval.options.memory_size=null"]),
])
def test_evaluation_cli_writes_the_panel_of_every_evaluator(tmp_path, monkeypatch, name, options):
    from hydra import compose, initialize_config_dir

    from densessl.evaluation.cli import run_evaluation

    monkeypatch.setenv("DENSESSL_CACHE", str(tmp_path / "cache"))
    overrides = ["backbone=vit_tiny", "++backbone.model_kwargs.depth=1", "data=synthetic", "data.synthetic.n_train=4",
                 "data.synthetic.n_val=3", "data.synthetic.size=64", "eval.options.image_size=32",
                 "eval.options.batch_size=4", "eval.options.num_vis=2", *options]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(f"evaluate_{name}", overrides=overrides)
    result = run_evaluation(cfg, tmp_path / "out")
    assert result.vis_predictions.shape == result.vis_targets.shape == (2, 32, 32)
    png = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
    assert png.shape[:2] == (2 * CELL, 3 * CELL)  # image | ground truth | linear or retrieval
