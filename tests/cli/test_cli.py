"""End-to-end runs of experiments/train.py and evaluation/*.py on tiny settings (CPU, synthetic data).

The runs of this module are prepared per case (``CASES``) and forked from one process by the module
fixture ``cli`` (helpers/forked_runs.py: real runs of the scripts, one torch import for all of them)."""
import json
from pathlib import Path

import pytest
import torch

from helpers.forked_runs import launch_cases
from helpers.tiny_runs import QUICK_TINY, TINY_DATA, TINY_RUN, eval_args


def _users_dataset(root: Path) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "JPEGImages" / "2007_000032.jpg").write_bytes(b"a user's image")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")


def _users_files(root: Path) -> dict[str, bytes]:
    """What _users_dataset wrote."""
    return {str(root / "JPEGImages" / "2007_000032.jpg"): b"a user's image",
            str(root / "ImageSets" / "Segmentation" / "val.txt"): b"2007_000032\n"}


EVAL_OPTIONS = {
    "overcluster": (["eval.options.ks=[7,9]", "eval.options.seeds=[0,1]", "eval.options.image_size=64",
                     "eval.options.mask_size=64", "eval.options.pca_dim=8", "eval.options.niter=5",
                     "eval.options.nredo=1", "eval.options.num_vis=2"], "k9_miou_mean"),
    "linear": (["eval.options.image_size=64", "eval.options.epochs=2", "eval.options.batch_size=4",
                "eval.options.train_mask_size=32", "eval.options.val_mask_size=32"], "linear_miou_full_res"),
    "retrieval": (["eval.options.image_size=64", "eval.options.memory_size=200", "eval.options.batch_size=4",
                   "eval.options.augmentation_epochs=1"], "hbird_miou"),
}


def _train(*args: str, env: dict | None = None) -> dict:
    return {"args": list(args), "env": env or {}}


def _run_dir(d: Path) -> str:
    return f"hydra.run.dir={d / 'run'}"


def _a_previous_run(d: Path) -> None:
    run = d / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("the earlier run's config\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"earlier weights")


# name -> (prepare the case's folder d or None, d -> [specs of its runs, in order])
CASES: dict[str, tuple] = {
    "quickstart": (None, lambda d: [_train(_run_dir(d), *QUICK_TINY, "overcluster.ks=[7,10]", "overcluster.seeds=[0,1]",
                                           "overcluster.pca_dim=8", "overcluster.niter=5")]),
    "neco_dinov2": (None, lambda d: [_train(_run_dir(d), "+experiment=neco_dinov2", "backbone.weights=none",
                                            "data=synthetic", "trainer=cpu", *TINY_DATA, *TINY_RUN,
                                            "++backbone.model_kwargs.depth=1", "method.crops.global_size=56",
                                            "method.crops.local_size=28", "method.queue_size=64")]),
    "misspelt_key": (None, lambda d: [_train(_run_dir(d), "+experiment=quickstart", "method.queue_sise=3")]),
    "missing_dataset": (None, lambda d: [_train(_run_dir(d), "data=coco", f"data.root={d / 'nowhere'}", *TINY_RUN)]),
    "offline_hub": (None, lambda d: [_train(_run_dir(d), "backbone=dino_vits16", "++backbone.model_kwargs.depth=1",
                                            *TINY_DATA, *TINY_RUN, env={"HF_HUB_OFFLINE": "1"})]),
    **{f"eval_{script}": (None, lambda d, script=script: [
        {"script": f"evaluation/{script}.py", "args": eval_args(d, script, *EVAL_OPTIONS[script][0])}])
       for script in EVAL_OPTIONS},
    "run_folder_eval": (None, lambda d: [
        _train(_run_dir(d), *QUICK_TINY, "eval_before_after=false"),
        {"script": "evaluation/overcluster.py",  # no hydra.run.dir: the figures go into the run folder
         "args": [f"weights={d / 'run'}", "data=synthetic", *TINY_DATA,
                  "eval.options.ks=[7]", "eval.options.seeds=[0]", "eval.options.image_size=96",
                  "eval.options.mask_size=96", "eval.options.pca_dim=8", "eval.options.niter=5",
                  "eval.options.nredo=1"]}]),
    "multirun": (None, lambda d: [_train("-m", f"hydra.sweep.dir={d / 'sweep'}", *QUICK_TINY, "eval_before_after=false",
                                         "seed=0,1")]),
    "users_dataset": (lambda d: _users_dataset(d / "VOC2012"), lambda d: [
        _train("+experiment=quickstart", f"data.root={d / 'VOC2012'}", *TINY_RUN, _run_dir(d)),
        {"script": "evaluation/overcluster.py", "args": eval_args(d, "overcluster", f"data.root={d / 'VOC2012'}")}]),
    "other_runs_folder": (_a_previous_run,
                          lambda d: [_train(_run_dir(d), "+experiment=quickstart", *TINY_DATA, *TINY_RUN)]),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    """(folder, [(exit code, stdout + stderr) of each run]) of every case."""
    return launch_cases(CASES, tmp_path_factory.mktemp("cli"))


def _ok(result: tuple[Path, list[tuple[int, str]]], i: int = 0) -> str:
    code, out = result[1][i]
    assert code == 0, out[-5000:]
    return out


def test_quickstart_tiny_prints_before_after_and_writes_run(cli):
    out = _ok(cli["quickstart"])
    assert "overclustering mIoU" in out and "before" in out and "after" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("7 |", "10 |"))]
    assert len(rows) == 2
    run = cli["quickstart"][0] / "run"
    for name in ("checkpoints/last.ckpt", "config.yaml", "backbone.pth", "logs/csv/metrics.csv"):
        assert (run / name).exists(), name
    assert str(run / "checkpoints") in out and str(run / "config.yaml") in out
    # The exported backbone loads strictly into a fresh backbone of the same architecture.
    from densessl.models import Backbone

    state = torch.load(run / "backbone.pth")
    Backbone("vit_tiny", img_size=96, model_kwargs=dict(depth=1, patch_size=8)).model.load_state_dict(state, strict=True)


def test_neco_dinov2_experiment_runs_offline_on_synthetic_data(cli):
    _ok(cli["neco_dinov2"])
    cfg = (cli["neco_dinov2"][0] / "run" / "config.yaml").read_text()
    # the experiment's reference hyper-parameters survive the offline overrides
    assert "lr: 1.0e-05" in cfg and "head_lr: 0.0001" in cfg and "queue_push: 10" in cfg
    assert "name: dinov2_vits14" in cfg


def test_misspelt_key_fails_with_hydra_message(cli):
    [(code, out)] = cli["misspelt_key"][1]
    assert code != 0
    assert "queue_sise" in out and "not in struct" in out.lower().replace("'", "")


def test_missing_dataset_names_the_key(cli):
    [(code, out)] = cli["missing_dataset"][1]
    assert code == 2
    assert "data.root" in out and "Traceback" not in out


def test_offline_hub_weights_fail_with_both_alternatives(cli):
    [(code, out)] = cli["offline_hub"][1]
    assert code == 2
    assert "backbone.weights=none" in out and "backbone.weights=/path/to/checkpoint.pth" in out


@pytest.mark.parametrize("script", list(EVAL_OPTIONS))
def test_evaluation_clis_write_figures(cli, script):
    out = _ok(cli[f"eval_{script}"])
    folder = cli[f"eval_{script}"][0] / f"eval_{script}"
    key = EVAL_OPTIONS[script][1]
    figures = json.loads((folder / f"{script}.json").read_text())
    assert key in figures and 0.0 <= figures[key] <= 1.0
    assert (folder / f"{script}.csv").exists() and "results:" in out
    assert (folder / f"{script}.png").stat().st_size > 0 and "pictures:" in out  # image | truth | prediction
    assert f"on {'cuda' if torch.cuda.is_available() else 'cpu'}" in out  # device=auto
    # Hydra's job log keeps everything the console showed, with timestamps and logger names.
    log = (folder / f"{script}.log").read_text()
    assert "results:" in log and "pictures:" in log and "][INFO] - " in log


def test_evaluation_of_a_training_run_folder(cli):
    _ok(cli["run_folder_eval"], 0)
    _ok(cli["run_folder_eval"], 1)
    [folder] = (cli["run_folder_eval"][0] / "run" / "eval" / "overcluster").iterdir()  # <date>_<time>
    assert "k7_miou_mean" in json.loads((folder / "overcluster.json").read_text())
    assert "results:" in (folder / "overcluster.log").read_text()


def test_multirun_writes_one_folder_per_run_and_a_summary(cli):
    out = _ok(cli["multirun"])
    sweep = cli["multirun"][0] / "sweep"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(runs) == 2
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert len(lines) == 3 and "final_train_loss" in lines[0] and "seed=1" in lines[2]
    assert "sweep summary" in out


def test_synthetic_data_never_replaces_a_users_dataset(cli):
    """The natural mistake: the quickstart (data=synthetic) pointed at a real dataset without data=voc."""
    d, [(code, out), (code_eval, out_eval)] = cli["users_dataset"]
    user = d / "VOC2012"
    assert code == 2 and "Traceback" not in out
    assert f"data.root={user}" in out and "data=voc" in out and "Nothing was changed" in out
    assert code_eval == 2 and "data=voc" in out_eval and "Traceback" not in out_eval
    assert {str(p): p.read_bytes() for p in user.rglob("*") if p.is_file()} == _users_files(user)


def test_a_new_run_never_writes_into_another_runs_folder(cli):
    d, [(code, out)] = cli["other_runs_folder"]
    run = d / "run"
    assert code == 2 and "Traceback" not in out
    assert f"resume={run}" in out and "nothing was overwritten" in out
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # not even Hydra's .hydra/
    assert (run / "config.yaml").read_text() == "the earlier run's config\n"
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"earlier weights"
