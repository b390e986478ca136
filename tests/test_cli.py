"""End-to-end runs of experiments/train.py on tiny settings (subprocess, CPU, synthetic data)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["data.synthetic.n_train=12", "data.synthetic.n_val=6", "data.synthetic.size=64",
             "data.num_workers=0", "data.batch_size=2"]
TINY_RUN = ["trainer.max_epochs=1", "trainer.max_steps=2", "logger=[csv]", "trainer.enable_progress_bar=false"]


def run_train(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_quickstart_tiny_prints_before_after_and_writes_run(tmp_path):
    proc = run_train(tmp_path, "+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1",
                     "overcluster.ks=[7,10]", "overcluster.seeds=[0,1]", "overcluster.pca_dim=8",
                     "overcluster.niter=5")
    out = proc.stdout
    assert "overclustering mIoU" in out and "before" in out and "after" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("7 |", "10 |"))]
    assert len(rows) == 2
    run = tmp_path / "run"
    for name in ("checkpoints/last.ckpt", "config.yaml", "backbone.pth", "logs/csv/metrics.csv"):
        assert (run / name).exists(), name
    assert str(run / "checkpoints") in out and str(run / "config.yaml") in out
    # The exported backbone loads strictly into a fresh backbone of the same architecture.
    from densessl.models import Backbone

    state = torch.load(run / "backbone.pth")
    Backbone("vit_tiny", img_size=96, model_kwargs=dict(depth=1, patch_size=8)).model.load_state_dict(state, strict=True)


def test_neco_dinov2_experiment_runs_offline_on_synthetic_data(tmp_path):
    run_train(tmp_path, "+experiment=neco_dinov2", "backbone.weights=none", "data=synthetic", "trainer=cpu",
              *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1", "method.crops.global_size=56",
              "method.crops.local_size=28", "method.queue_size=64")
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    # the experiment's reference hyper-parameters survive the offline overrides
    assert "lr: 1.0e-05" in cfg and "head_lr: 0.0001" in cfg and "queue_push: 10" in cfg
    assert "name: dinov2_vits14" in cfg


def test_misspelt_key_fails_with_hydra_message(tmp_path):
    proc = run_train(tmp_path, "+experiment=quickstart", "method.queue_sise=3", check=False)
    assert proc.returncode != 0
    assert "queue_sise" in proc.stderr and "not in struct" in proc.stderr.lower().replace("'", "")


def test_missing_dataset_names_the_key(tmp_path):
    proc = run_train(tmp_path, "data=coco", f"data.root={tmp_path / 'nowhere'}", *TINY_RUN, check=False)
    assert proc.returncode == 2
    assert "data.root" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_hub_weights_fail_with_both_alternatives(tmp_path):
    env_backup = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        proc = run_train(tmp_path, "backbone=dino_vits16", "++backbone.model_kwargs.depth=1", *TINY_DATA, *TINY_RUN,
                         check=False)
    finally:
        if env_backup is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = env_backup
    assert proc.returncode == 2
    assert "backbone.weights=none" in proc.stderr and "backbone.weights=/path/to/checkpoint.pth" in proc.stderr


def eval_args(tmp_path: Path, script: str, *overrides: str) -> list[str]:
    """Arguments of evaluation/<script>.py on the tiny synthetic set, output in tmp_path/eval_<script>."""
    return [f"hydra.run.dir={tmp_path / f'eval_{script}'}", "backbone=vit_tiny", "++backbone.model_kwargs.depth=1",
            "data=synthetic", *TINY_DATA, *overrides]


def run_eval(tmp_path: Path, script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "evaluation" / f"{script}.py"), *eval_args(tmp_path, script, *overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.mark.parametrize("script,overrides,key", [
    ("overcluster", ["eval.options.ks=[7,9]", "eval.options.seeds=[0,1]", "eval.options.image_size=64",
                     "eval.options.mask_size=64", "eval.options.pca_dim=8", "eval.options.niter=5",
                     "eval.options.nredo=1", "eval.options.num_vis=2"], "k9_miou_mean"),
    ("linear", ["eval.options.image_size=64", "eval.options.epochs=2", "eval.options.batch_size=4",
                "eval.options.train_mask_size=32", "eval.options.val_mask_size=32"], "linear_miou_full_res"),
    ("retrieval", ["eval.options.image_size=64", "eval.options.memory_size=200", "eval.options.batch_size=4",
                   "eval.options.augmentation_epochs=1"], "hbird_miou"),
])
def test_evaluation_clis_write_figures(tmp_path, script, overrides, key):
    proc = run_eval(tmp_path, script, *overrides)
    out = tmp_path / f"eval_{script}"
    figures = json.loads((out / f"{script}.json").read_text())
    assert key in figures and 0.0 <= figures[key] <= 1.0
    assert (out / f"{script}.csv").exists() and "results:" in proc.stdout
    assert (out / f"{script}.png").stat().st_size > 0 and "pictures:" in proc.stdout  # image | truth | prediction


def test_evaluation_of_a_training_run_folder(tmp_path):
    run_train(tmp_path, "+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1",
              "eval_before_after=false")
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "evaluation" / "overcluster.py"), f"hydra.run.dir={tmp_path / 'ev'}",
           f"weights={tmp_path / 'run'}", "data=synthetic", *TINY_DATA, "eval.options.ks=[7]",
           "eval.options.seeds=[0]", "eval.options.image_size=96", "eval.options.mask_size=96",
           "eval.options.pca_dim=8", "eval.options.niter=5", "eval.options.nredo=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "k7_miou_mean" in json.loads((tmp_path / "ev" / "overcluster.json").read_text())


def test_multirun_writes_one_folder_per_run_and_a_summary(tmp_path):
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1",
           "eval_before_after=false", "seed=0,1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(runs) == 2
    lines = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()
    assert len(lines) == 3 and "final_train_loss" in lines[0] and "seed=1" in lines[2]
    assert "sweep summary" in proc.stdout


def _users_dataset(root: Path) -> dict[str, bytes]:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "JPEGImages" / "2007_000032.jpg").write_bytes(b"a user's image")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_synthetic_data_never_replaces_a_users_dataset(tmp_path):
    """The natural mistake: the quickstart (data=synthetic) pointed at a real dataset without data=voc."""
    user = tmp_path / "VOC2012"
    before = _users_dataset(user)
    proc = run_train(tmp_path, "+experiment=quickstart", f"data.root={user}", *TINY_RUN, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"data.root={user}" in proc.stderr and "data=voc" in proc.stderr and "Nothing was changed" in proc.stderr
    proc = run_eval(tmp_path, "overcluster", f"data.root={user}", check=False)
    assert proc.returncode == 2 and "data=voc" in proc.stderr and "Traceback" not in proc.stderr
    assert {str(p): p.read_bytes() for p in user.rglob("*") if p.is_file()} == before


def test_a_new_run_never_writes_into_another_runs_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("the earlier run's config\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"earlier weights")
    proc = run_train(tmp_path, "+experiment=quickstart", *TINY_DATA, *TINY_RUN, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"resume={run}" in proc.stderr and "nothing was overwritten" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # not even Hydra's .hydra/
    assert (run / "config.yaml").read_text() == "the earlier run's config\n"
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"earlier weights"
