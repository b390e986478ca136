"""DenseEvalCallback (linear / retrieval / overclustering during training): metrics, pictures, config."""
import csv
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from densessl.callbacks import DenseEvalCallback
from helpers.tiny_runs import TINY_DATA, TINY_RUN, run_train

CELL = 176  # pixels per panel cell (densessl.evaluation.pictures.save_panels)


@dataclass
class StubResult:
    value: float
    vis_targets: torch.Tensor
    vis_predictions: torch.Tensor
    vis_name = "stub"

    def as_dict(self) -> dict[str, float]:
        return {"score": self.value}


@dataclass
class StubEvaluator:
    """Records its calls; the figure is the call number, pictures of 2 images (class 1 / class 2 maps)."""

    calls: list = field(default_factory=list)
    __name__ = "stub"

    def __call__(self, backbone, *datasets, **options):
        self.calls.append((backbone, datasets, options))
        return StubResult(float(len(self.calls)), torch.ones(2, 8, 8, dtype=torch.uint8),
                          torch.full((2, 8, 8), 2, dtype=torch.uint8))


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.eval_backbone = nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.eval_backbone(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, callback: DenseEvalCallback, max_epochs: int) -> TinyModule:
    module = TinyModule()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=CSVLogger(tmp_path / "logs", name="csv"),
                        callbacks=[callback], default_root_dir=str(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))  # 2 steps per epoch
    return module


def read_csv(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def images(n: int) -> list:
    return [(Image.new("RGB", (16, 16)), Image.new("L", (16, 16))) for _ in range(n)]


def test_callback_every_n_epochs_logs_metrics_and_pictures(tmp_path):
    evaluator = StubEvaluator()
    val, train = images(3), images(5)
    callback = DenseEvalCallback(evaluator, val, every_n_epochs=2, prefix="val/stub", train_dataset=train,
                                 num_vis=2, image_size=32)
    module = fit(tmp_path, callback, max_epochs=3)
    # Epoch 2 (every_n_epochs) and epoch 3 (the last); train split first, as evaluate_linear/retrieval take them.
    assert len(evaluator.calls) == 2
    backbone, datasets, options = evaluator.calls[0]
    assert backbone is module.eval_backbone and datasets[0] is train and datasets[1] is val
    assert options == {"num_vis": 2, "image_size": 32}
    rows = [r for r in read_csv(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv") if r.get("val/stub/score")]
    assert [(int(r["step"]), float(r["val/stub/score"])) for r in rows] == [(4, 1.0), (6, 2.0)]
    assert all(float(r["val/stub/eval_seconds"]) >= 0 for r in rows)
    pictures = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert pictures == ["val_stub_epoch2.png", "val_stub_epoch3.png"]
    png = np.asarray(Image.open(tmp_path / "pictures" / "val_stub_epoch3.png"))
    assert png.shape[:2] == (2 * CELL, 3 * CELL)  # 2 images; image | ground truth | stub


def test_callback_without_train_split_or_pictures(tmp_path):
    evaluator = StubEvaluator()
    val = images(2)
    callback = DenseEvalCallback(evaluator, val, prefix="val/x", picture_dir=str(tmp_path / "elsewhere"))
    fit(tmp_path, callback, max_epochs=1)
    (_, datasets, options), = evaluator.calls
    assert datasets == (val,) and options == {}
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["val_x_epoch1.png"]
    evaluator.calls.clear()
    # A result without pictures writes none.
    callback = DenseEvalCallback(lambda backbone, ds: StubResult(0.5, None, None), val, prefix="val/none")
    fit(tmp_path / "b", callback, max_epochs=1)
    assert not (tmp_path / "b" / "pictures").exists() and callback.last.value == 0.5


def test_training_with_linear_and_retrieval_callbacks(tmp_path):
    run_train(tmp_path, "+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1",
              "callbacks=[default,linear,retrieval]", "overcluster.ks=[7,10]", "overcluster.seeds=[0]",
              "overcluster.pca_dim=8", "overcluster.niter=5", "overcluster.image_size=64", "overcluster.mask_size=32",
              "overcluster.num_vis=2", "callbacks.linear.max_iter=10", "callbacks.linear.max_train_images=8",
              "callbacks.retrieval.max_train_images=8", "callbacks.retrieval.k=5")
    run = tmp_path / "run"
    pictures = run / "pictures"
    assert sorted(p.name for p in pictures.iterdir()) == [
        "overcluster_after.png", "overcluster_before.png", "val_linear_epoch1.png", "val_retrieval_epoch1.png"]
    # 2 images; image | ground truth | linear, and the after panel: ... | K=7 | K=10 | linear | retrieval.
    assert np.asarray(Image.open(pictures / "val_linear_epoch1.png")).shape[:2] == (2 * CELL, 3 * CELL)
    assert np.asarray(Image.open(pictures / "overcluster_before.png")).shape[:2] == (2 * CELL, 4 * CELL)
    assert np.asarray(Image.open(pictures / "overcluster_after.png")).shape[:2] == (2 * CELL, 6 * CELL)
    rows = read_csv(run / "logs" / "csv" / "metrics.csv")
    linear = [float(r["val/linear/linear_miou_full_res"]) for r in rows if r.get("val/linear/linear_miou_full_res")]
    hbird = [float(r["val/retrieval/hbird_miou"]) for r in rows if r.get("val/retrieval/hbird_miou")]
    assert len(linear) == 1 and 0.0 < linear[0] <= 1.0
    assert len(hbird) == 1 and 0.0 < hbird[0] <= 1.0
    config = (run / "config.yaml").read_text()
    assert "prefix: val/linear" in config and "split: train" in config
