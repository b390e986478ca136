"""Bad inputs and config errors through the entry points: exit status 2, one message naming the file or
the config key and the fix, no traceback (real runs of experiments/train.py and evaluation/*.py on tiny
CPU settings). Every case gets its own folder and inputs (``CASES``); all runs are forked from one
process (helpers/forked_runs.py, which saves a torch import per run) by the module fixture ``cli``."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data import ensure_synthetic_voc
from helpers.forked_runs import launch_cases
from helpers.tiny_runs import TINY_DATA, TINY_RUN, eval_args

QUICK = ["+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1", "eval_before_after=false"]
LINEAR = ["eval.options.image_size=64", "eval.options.epochs=1", "eval.options.batch_size=4"]
OVERCLUSTER = ["eval.options.ks=[7]", "eval.options.seeds=[0]", "eval.options.image_size=64", "eval.options.niter=5",
               "eval.options.nredo=1", "eval.options.pca_dim=8", "eval.options.mask_size=64"]


def tiny_voc(tmp_path: Path) -> Path:
    """The synthetic set the TINY_DATA runs read, generated here so that a case can damage a file first."""
    return ensure_synthetic_voc(tmp_path / "cache" / "synthetic_voc", n_train=12, n_val=6, size=64, seed=0)


def first_image(root: Path, split: str, folder: str = "JPEGImages", ext: str = "jpg") -> Path:
    name = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]
    return root / folder / f"{name}.{ext}"


# ---------------------------------------------------------------------------- the cases' inputs
def _truncated_jpeg(d: Path) -> None:
    bad = first_image(tiny_voc(d), "train")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a JPEG cut in half


def _bad_mask_ids(d: Path) -> None:
    root = tiny_voc(d)
    for split in ("train", "val"):  # the linear probe reads the train split first, overclustering val
        path = first_image(root, split, "SegmentationClass", "png")
        mask = Image.open(path)
        labels = np.asarray(mask).copy()
        labels[:8, :8] = 30  # a 7-class set
        bad = Image.fromarray(labels, mode="P")
        bad.putpalette(mask.getpalette())
        bad.save(path)


def _corrupt_weights(d: Path) -> None:
    (d / "backbone.pth").write_bytes(np.random.default_rng(0).bytes(4096))


def _run_folder_without_checkpoints(d: Path) -> None:
    (d / "run").mkdir()
    (d / "run" / "config.yaml").write_text("backbone:\n  name: vit_tiny\n  weights: none\n")


def _coco_one_level_up(d: Path) -> None:
    (d / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(d / "coco" / "train2017" / "000000000009.jpg")


def _train(*args: str) -> Callable[[Path], dict]:
    return lambda d: {"args": [f"hydra.run.dir={d / 'run'}", *args]}


def _eval(script: str, *args: str) -> Callable[[Path], dict]:
    return lambda d: {"script": f"evaluation/{script}.py", "args": eval_args(d, script, *args)}


# name -> (prepare the case's folder d, d -> the run's spec for helpers/forked_runs.py)
CASES: dict[str, tuple[Callable[[Path], None] | None, Callable[[Path], dict]]] = {
    **{f"truncated_jpeg_{policy}": (_truncated_jpeg, _train(  # 2 images = one batch, so the bad one is read;
        *QUICK, "data.max_images=2", "data.num_workers=1", f"data.on_bad_image={policy}"))  # one loader worker
       for policy in ("error", "skip")},
    "mask_ids_linear": (_bad_mask_ids, _eval("linear", *LINEAR)),
    "mask_ids_overcluster": (_bad_mask_ids, _eval("overcluster", *OVERCLUSTER)),
    "plus_key_trainer": (None, _train(*QUICK, "+trainer.max_stepz=5")),
    "plus_key_optim": (None, _train(*QUICK, "+method.optim.lrr=0.1")),
    "ddp_without_gpu": (None, _train("trainer=ddp", *TINY_DATA, *TINY_RUN)),
    "size_crops": (None, _train(*QUICK, "method.crops.global_size=100")),
    "size_overcluster": (None, _train(*QUICK, "eval_before_after=true", "overcluster.image_size=100")),
    "size_eval": (None, _eval("overcluster", *OVERCLUSTER, "eval.options.image_size=100")),
    "corrupt_weights_train": (_corrupt_weights, lambda d: _train(*QUICK, f"backbone.weights={d / 'backbone.pth'}")(d)),
    "corrupt_weights_eval": (_corrupt_weights, lambda d: _eval("overcluster", f"weights={d / 'backbone.pth'}")(d)),
    "run_folder_without_checkpoints": (_run_folder_without_checkpoints,
                                       lambda d: _eval("overcluster", f"weights={d / 'run'}")(d)),
    "coco_one_level_up": (_coco_one_level_up, lambda d: _train("data=coco", f"data.root={d / 'coco'}", *TINY_RUN)(d)),
    "neptune_without_token": (None, lambda d: {**_train(*QUICK, "logger=[neptune]")(d), "cwd": str(d),
                                               "env": {"NEPTUNE_PROJECT": "team/project"},
                                               "unset": [k for k in os.environ if k.startswith("NEPTUNE_")]}),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """(exit code, stdout + stderr, folder) of every case, run in order from one process."""
    return {name: (*runs[0], d) for name, (d, runs) in launch_cases(CASES, tmp_path_factory.mktemp("cli")).items()}


def assert_user_error(result: tuple[int, str, Path], *fragments: str) -> str:
    code, out, _ = result
    assert code == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    message = out[out.rindex("\nerror: ") + 1:]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message}"
    return message


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_truncated_jpeg_is_named_or_skipped(cli, policy):
    result = cli[f"truncated_jpeg_{policy}"]
    bad = first_image(result[2] / "cache" / "synthetic_voc", "train")
    if policy == "error":
        assert_user_error(result, f"cannot read image {bad}", "data.on_bad_image=skip")
    else:
        code, out, _ = result
        assert code == 0, out[-3000:]
        assert f"skipped images : 1 that do not decode (data.on_bad_image=skip; each named in the log): {bad}" in out
        assert f"data.on_bad_image=skip: cannot read image {bad}" in out  # the log line


@pytest.mark.parametrize("script", ["linear", "overcluster"])
def test_mask_id_outside_the_classes_names_the_mask(cli, script):
    result = cli[f"mask_ids_{script}"]
    root = result[2] / "cache" / "synthetic_voc"
    assert_user_error(result, f"mask {root / 'SegmentationClass'}", "class ids [30]", "num_classes=7",
                      f"data.root={root}", "data=")


@pytest.mark.parametrize("case,key", [("plus_key_trainer", "trainer.max_stepz"),
                                      ("plus_key_optim", "method.optim.lrr")])
def test_misspelt_plus_key_is_named(cli, case, key):
    assert_user_error(cli[case], f"{key} is not an option", f"did you mean {key[:-1]}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_ddp_without_gpu_suggests_cpu(cli):
    result = cli["ddp_without_gpu"]
    assert_user_error(result, "trainer.accelerator=gpu", "no usable CUDA GPU", "trainer.accelerator=cpu")
    assert not (result[2] / "cache").exists()  # checked before any work


@pytest.mark.parametrize("case,key", [("size_crops", "method.crops.global_size=100"),
                                      ("size_overcluster", "overcluster.image_size=100")])
def test_sizes_that_are_not_a_multiple_of_the_patch_are_named(cli, case, key):
    assert_user_error(cli[case], f"{key} is not a multiple of the patch size 8", "96 or 104")


def test_eval_image_size_not_a_multiple_of_the_patch_is_named(cli):
    assert_user_error(cli["size_eval"], "eval.options.image_size=100 is not a multiple of the patch size 16",
                      "96 or 112")


def test_corrupt_weights_file_names_the_file_and_the_key(cli):
    weights = cli["corrupt_weights_train"][2] / "backbone.pth"
    assert_user_error(cli["corrupt_weights_train"], f"cannot read backbone.weights={weights}", "corrupt")
    weights = cli["corrupt_weights_eval"][2] / "backbone.pth"
    assert_user_error(cli["corrupt_weights_eval"], f"cannot read weights={weights}")


def test_run_folder_without_checkpoints_names_weights(cli):
    result = cli["run_folder_without_checkpoints"]
    run = result[2] / "run"
    message = assert_user_error(result, f"weights={run}: the run folder has no backbone.pth", "checkpoints/last.ckpt")
    assert "backbone.weights" not in message


def test_coco_root_with_images_one_level_up_gets_the_move_hint(cli):
    result = cli["coco_one_level_up"]
    coco = result[2] / "coco"
    assert_user_error(result, f"missing folder {coco / 'images' / 'train2017'}", "mv train2017 images/",
                      "data.root=/path/to/coco")


def test_neptune_without_token_is_one_line(cli):
    message = assert_user_error(cli["neptune_without_token"], "NEPTUNE_API_TOKEN", "NEPTUNE_MODE=offline")
    assert len(message.strip().splitlines()) == 1
