"""Tracking (issue 14): one Neptune run per training, the before/after figures and pictures in it;
Neptune's offline data and the MLflow store inside the run folder, nothing in the working directory.
One tiny run with eval_before_after, Neptune offline and MLflow (helpers/forked_runs.py)."""
import json
import os
import sqlite3
from pathlib import Path

import pytest

from helpers.forked_runs import launch
from helpers.tiny_runs import QUICK_TINY, ROOT

BEFORE_AFTER = ["eval_before_after=true", "overcluster.image_size=64", "overcluster.mask_size=64", "overcluster.ks=[7]",
                "overcluster.seeds=[0]", "overcluster.pca_dim=8", "overcluster.niter=5", "overcluster.nredo=1",
                "overcluster.max_images=2", "overcluster.num_vis=1"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, Path, int, str]:
    """(working directory, run folder, exit code, log) of the tiny run, launched from an empty folder."""
    tmp = tmp_path_factory.mktemp("tracking")
    cwd, run = tmp / "cwd", tmp / "run"
    cwd.mkdir()
    spec = {"args": [*QUICK_TINY, *BEFORE_AFTER, f"hydra.run.dir={run}", "logger=[csv,neptune,mlflow]",
                     "trainer.log_every_n_steps=1"],
            "env": {"NEPTUNE_MODE": "offline", "DENSESSL_CACHE": str(tmp / "cache")}, "unset": ["MLFLOW_TRACKING_URI"],
            "cwd": str(cwd), "log": str(tmp / "run.log")}
    [(code, out)] = launch([spec], tmp / "spec.json", {**os.environ, "OMP_NUM_THREADS": "1"})
    return cwd, run, code, out


def test_one_neptune_run_holds_training_and_before_after(tracked):
    cwd, run, code, out = tracked
    assert code == 0, out[-3000:]
    runs = [p for p in (run / "logs" / ".neptune" / "offline").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # finalize() used to stop it and the figures opened a second one
    ops = [json.loads(line)["obj"] for f in runs[0].glob("data-*.log") for line in f.read_text().splitlines()
           if line.strip()]
    paths = {"/".join(o["path"]) for o in ops}
    assert "train/loss" in paths and "parameters/seed" in paths
    assert {"overcluster_before/k7_miou_mean", "overcluster_after/k7_miou_mean"} <= paths
    assert {"pictures/overcluster_before", "pictures/overcluster_after"} <= paths


def test_mlflow_store_and_artifacts_are_in_the_run_folder(tracked):
    cwd, run, code, out = tracked
    assert code == 0, out[-3000:]
    with sqlite3.connect(run / "logs" / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"train/loss", "overcluster_after/k7_miou_mean"} <= keys
    assert list((run / "logs" / "mlflow-artifacts").rglob("overcluster_after.png"))
    assert not list(cwd.iterdir())  # no ./.neptune, ./mlflow.db, ./mlruns


def test_neptune_logger_keeps_its_run_open_after_fit_until_close(tmp_path):
    from densessl.loggers import NeptuneLogger

    logger = NeptuneLogger(mode="offline", data_directory=str(tmp_path / ".neptune"))
    logger.log_metrics({"train/loss": 1.0}, step=1)
    run = logger.experiment
    logger.finalize("success")  # Lightning, at the end of fit
    logger.log_metrics({"after/figure": 2.0}, step=1)
    assert logger.experiment is run
    logger.close()
    assert logger.save_dir == str((tmp_path / ".neptune").resolve())
    assert len(list((tmp_path / ".neptune" / "offline").iterdir())) == 1
    assert "NEPTUNE_DATA_DIRECTORY" not in os.environ  # set for the client's start only
