"""Metric logging of a training run (issue 14): no on_after_batch_transfer warning, no v_num in the
progress bar, the config logged once with dotted keys, in-training evaluation figures usable as a
ModelCheckpoint monitor. One tiny run (helpers/forked_runs.py) serves the end-to-end checks."""
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from densessl.callbacks import ProgressBar
from densessl.training import flatten_config
from helpers.forked_runs import launch
from helpers.tiny_runs import QUICK_TINY, ROOT

MONITOR = "val/overcluster/k7_miou_mean"  # <callbacks.overcluster.prefix>/<figure>
OVERCLUSTER = ["callbacks=[default,overcluster]", "callbacks.overcluster.niter=5", "overcluster.image_size=64",
               "overcluster.mask_size=64", "overcluster.ks=[7]", "overcluster.pca_dim=8", "overcluster.max_images=2",
               "overcluster.num_vis=0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """(run folder, stdout + stderr) of a quickstart run with the overclustering callback as the monitor."""
    tmp = tmp_path_factory.mktemp("logging")
    args = [*QUICK_TINY, "eval_before_after=false", f"hydra.run.dir={tmp / 'run'}", "logger=[csv,tensorboard]",
            "trainer.enable_progress_bar=true", *OVERCLUSTER, f"callbacks.checkpoint.monitor={MONITOR}",
            "callbacks.checkpoint.mode=max"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DENSESSL_CACHE": str(tmp / "cache"), "HYDRA_FULL_ERROR": "1"}
    [(code, out)] = launch([{"args": args, "cwd": str(ROOT), "log": str(tmp / "run.log")}], tmp / "runs.json", env)
    assert code == 0, out[-5000:]
    return tmp / "run", out


def test_no_batch_transfer_warning_and_no_v_num(tiny_run):
    _, out = tiny_run
    assert "on_after_batch_transfer" not in out
    assert "Epoch 0" in out and "v_num" not in out  # the progress bar ran, without a version


def test_hyperparameters_logged_once_with_dotted_keys(tiny_run):
    run, _ = tiny_run
    text = (run / "logs" / "csv" / "hparams.yaml").read_text()
    hparams = yaml.safe_load(text)
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "-"))]
    assert len(keys) == len(set(keys)) == len(hparams)  # each key once, all top-level
    assert hparams["method.optim.lr"] == 5.0e-4 and hparams["seed"] == 0
    assert not any(isinstance(v, dict) for v in hparams.values())
    assert "optim.lr" not in hparams and "optim" not in hparams  # the method's own arguments: not again


def test_eval_figure_is_a_checkpoint_monitor(tiny_run):
    run, out = tiny_run
    assert "[evaluate_overclustering] epoch 1: val/overcluster/k7_miou_mean=" in out  # the console line as printed
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    [state] = [s for s in last["callbacks"].values() if s.get("monitor") == MONITOR]
    assert math.isfinite(float(state["best_model_score"])) and Path(state["best_model_path"]).is_file()


def test_progress_bar_drops_v_num():
    class Logger:
        version = None  # e.g. Neptune offline: Lightning showed v_num=None

    class Trainer:
        loggers = [Logger(), Logger()]
        progress_bar_metrics = {"train/loss": 1.0}

    assert ProgressBar().get_metrics(Trainer(), None) == {"train/loss": 1.0}


def test_flatten_config():
    assert flatten_config({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": None}) == \
        {"a.b": 1, "a.c.d": [1, 2], "e": {}, "f": None}
