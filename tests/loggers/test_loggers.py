"""Neptune (own logger, offline mode) and MLflow (local file store) record what training logs."""
import json
from pathlib import Path

import pytest

from densessl.loggers import NeptuneLogger


def _neptune_ops(root: Path) -> list[dict]:
    logs = sorted((root / ".neptune" / "offline").glob("*/data-*.log"))
    assert logs, "neptune wrote no offline run"
    return [json.loads(line)["obj"] for f in logs for line in f.read_text().splitlines() if line.strip()]


def test_neptune_offline_records_params_metrics_steps_and_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = NeptuneLogger(mode="offline", name="unit", tags=["t"])
    logger.log_hyperparams({"method": {"name": "neco", "lr": 1e-5}, "seed": 3})
    logger.log_metrics({"train/loss": 2.5, "val/dse": 0.25}, step=7)
    logger.log_metrics({"train/loss": 1.5}, step=8)
    logger.log_text("config/resolved", "seed: 3\n", extension="yaml")
    logger.finalize("success")
    ops = _neptune_ops(tmp_path)
    paths = {"/".join(o["path"]): o for o in ops}
    assert paths["parameters/method/name"]["value"] == "neco"
    assert paths["parameters/seed"]["value"] == 3
    loss = [o for o in ops if o["path"] == ["train", "loss"] and o["type"] == "LogFloats"]
    values = [(v["value"], v["step"]) for o in loss for v in o["values"]]
    assert values == [(2.5, 7.0), (1.5, 8.0)]
    assert any(o["path"] == ["config", "resolved"] for o in ops)


def test_neptune_needs_a_project_and_a_token_online(monkeypatch):
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="NEPTUNE_PROJECT"):
        NeptuneLogger(mode="async")
    with pytest.raises(ValueError, match=r"needs NEPTUNE_API_TOKEN \(or logger.neptune.api_token=...\); .*"
                                         r"NEPTUNE_MODE=offline") as err:
        NeptuneLogger(project="team/project", mode="async")
    assert "NEPTUNE_PROJECT" not in str(err.value) and "\n" not in str(err.value)
    NeptuneLogger(project="team/project", mode="debug")  # no token needed


def test_mlflow_local_store_reads_back(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow 3 retired the file store
    logger = MLFlowLogger(experiment_name="densessl", tracking_uri=uri)
    logger.log_hyperparams({"seed": 3})
    logger.log_metrics({"train/loss": 0.5}, step=2)
    logger.finalize("success")
    run = mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(logger.run_id)
    assert run.data.params["seed"] == "3" and run.data.metrics["train/loss"] == 0.5


def test_training_logs_to_csv_and_offline_neptune(tmp_path):
    import os
    import subprocess
    import sys

    from helpers.tiny_runs import ROOT, TINY_DATA, TINY_RUN

    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache"), "NEPTUNE_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}",
           "+experiment=quickstart", *TINY_DATA, *TINY_RUN, "logger=[csv,neptune]", "++backbone.model_kwargs.depth=1",
           "eval_before_after=false", "trainer.log_every_n_steps=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = _neptune_ops(tmp_path / "run" / "logs")  # offline runs land in <run folder>/logs/.neptune
    assert any(o["path"][:2] == ["parameters", "method.name"] for o in ops)  # the resolved config, dotted keys
    assert any(o["path"] == ["train", "loss"] for o in ops)


def test_csv_logger_continues_metrics_csv_and_keeps_other_writers_columns(tmp_path):
    """A resumed run appends to metrics.csv (Lightning's CSVLogger deletes it); a writer that did not see
    another process's columns still writes aligned rows under the file's grown header."""
    import csv

    from densessl.loggers import CSVLogger

    def read() -> list[dict[str, str]]:
        with open(tmp_path / "csv" / "metrics.csv") as f:
            return list(csv.DictReader(f))

    first = CSVLogger(str(tmp_path), name="csv", version="")
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.save()
    stale = CSVLogger(str(tmp_path), name="csv", version="")  # e.g. a launcher process, created now
    stale.experiment  # knows the keys train/loss, step
    resumed = CSVLogger(str(tmp_path), name="csv", version="")
    resumed.log_metrics({"train/loss": 1.5, "dse/value": 0.7}, step=2)
    resumed.save()  # header grows: dse/value
    stale.log_metrics({"train/loss": 9.0}, step=0)
    stale.save()  # no new key of its own, but the file's header has one more column
    stale.log_metrics({"after/miou": 0.3}, step=3)
    stale.save()  # a new key of its own
    rows = read()
    assert [r["step"] for r in rows] == ["1", "2", "0", "3"]
    assert [r["train/loss"] for r in rows] == ["2.0", "1.5", "9.0", ""]
    assert rows[1]["dse/value"] == "0.7" and rows[3]["after/miou"] == "0.3" and rows[3]["dse/value"] == ""
