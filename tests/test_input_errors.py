"""Bad inputs and config errors through the entry points: exit status 2, one message naming the file or
the config key and the fix, no traceback (subprocess, tiny CPU settings)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.data import ensure_synthetic_voc
from test_cli import ROOT, TINY_DATA, TINY_RUN, run_eval, run_train

QUICK = ["+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1", "eval_before_after=false"]
LINEAR = ["eval.options.image_size=64", "eval.options.epochs=1", "eval.options.batch_size=4"]
OVERCLUSTER = ["eval.options.ks=[7]", "eval.options.seeds=[0]", "eval.options.image_size=64", "eval.options.niter=5",
               "eval.options.nredo=1", "eval.options.pca_dim=8", "eval.options.mask_size=64"]


def tiny_voc(tmp_path: Path) -> Path:
    """The synthetic set the TINY_DATA runs read, generated here so that a test can damage a file first."""
    return ensure_synthetic_voc(tmp_path / "cache" / "synthetic_voc", n_train=12, n_val=6, size=64, seed=0)


def first_image(root: Path, split: str, folder: str = "JPEGImages", ext: str = "jpg") -> Path:
    name = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]
    return root / folder / f"{name}.{ext}"


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("error: "):]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message}"
    return message


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_truncated_jpeg_is_named_or_skipped(tmp_path, policy):
    bad = first_image(tiny_voc(tmp_path), "train")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a JPEG cut in half
    # max_images=2 = one batch, so the bad image is read; one loader worker process, as real runs have
    proc = run_train(tmp_path, *QUICK, "data.max_images=2", "data.num_workers=1", f"data.on_bad_image={policy}",
                     check=False)
    if policy == "error":
        assert_user_error(proc, f"cannot read image {bad}", "data.on_bad_image=skip")
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"skipped images : 1 that do not decode (data.on_bad_image=skip; each named in the log): {bad}" \
            in proc.stdout
        assert f"data.on_bad_image=skip: cannot read image {bad}" in proc.stdout + proc.stderr  # the log line


@pytest.mark.parametrize("script,options", [("linear", LINEAR), ("overcluster", OVERCLUSTER)])
def test_mask_id_outside_the_classes_names_the_mask(tmp_path, script, options):
    root = tiny_voc(tmp_path)
    for split in ("train", "val"):  # the linear probe reads the train split first, overclustering val
        path = first_image(root, split, "SegmentationClass", "png")
        mask = Image.open(path)
        labels = np.asarray(mask).copy()
        labels[:8, :8] = 30  # a 7-class set
        bad = Image.fromarray(labels, mode="P")
        bad.putpalette(mask.getpalette())
        bad.save(path)
    proc = run_eval(tmp_path, script, *options, check=False)
    assert_user_error(proc, f"mask {root / 'SegmentationClass'}", "class ids [30]", "num_classes=7",
                      f"data.root={root}", "data=")


@pytest.mark.parametrize("override,key", [("+trainer.max_stepz=5", "trainer.max_stepz"),
                                          ("+method.optim.lrr=0.1", "method.optim.lrr")])
def test_misspelt_plus_key_is_named(tmp_path, override, key):
    proc = run_train(tmp_path, *QUICK, override, check=False)
    assert_user_error(proc, f"{key} is not an option", f"did you mean {key[:-1]}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_ddp_without_gpu_suggests_cpu(tmp_path):
    proc = run_train(tmp_path, "trainer=ddp", *TINY_DATA, *TINY_RUN, check=False)
    assert_user_error(proc, "trainer.accelerator=gpu", "no usable CUDA GPU", "trainer.accelerator=cpu")
    assert not (tmp_path / "cache").exists()  # checked before any work


@pytest.mark.parametrize("override,key", [("method.crops.global_size=100", "method.crops.global_size=100"),
                                          ("overcluster.image_size=100", "overcluster.image_size=100")])
def test_sizes_that_are_not_a_multiple_of_the_patch_are_named(tmp_path, override, key):
    extra = ["eval_before_after=true"] if override.startswith("overcluster") else []
    proc = run_train(tmp_path, *QUICK, *extra, override, check=False)
    assert_user_error(proc, f"{key} is not a multiple of the patch size 8", "96 or 104")


def test_eval_image_size_not_a_multiple_of_the_patch_is_named(tmp_path):
    proc = run_eval(tmp_path, "overcluster", *OVERCLUSTER, "eval.options.image_size=100", check=False)
    assert_user_error(proc, "eval.options.image_size=100 is not a multiple of the patch size 16", "96 or 112")


def test_corrupt_weights_file_names_the_file_and_the_key(tmp_path):
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    proc = run_train(tmp_path, *QUICK, f"backbone.weights={weights}", check=False)
    assert_user_error(proc, f"cannot read backbone.weights={weights}", "corrupt")
    proc = run_eval(tmp_path, "overcluster", f"weights={weights}", check=False)
    assert_user_error(proc, f"cannot read weights={weights}")


def test_run_folder_without_checkpoints_names_weights(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("backbone:\n  name: vit_tiny\n  weights: none\n")
    proc = run_eval(tmp_path, "overcluster", f"weights={run}", check=False)
    message = assert_user_error(proc, f"weights={run}: the run folder has no backbone.pth", "checkpoints/last.ckpt")
    assert "backbone.weights" not in message


def test_coco_root_with_images_one_level_up_gets_the_move_hint(tmp_path):
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(coco / "train2017" / "000000000009.jpg")
    proc = run_train(tmp_path, "data=coco", f"data.root={coco}", *TINY_RUN, check=False)
    assert_user_error(proc, f"missing folder {coco / 'images' / 'train2017'}", "mv train2017 images/",
                      "data.root=/path/to/coco")


def test_neptune_without_token_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEPTUNE_")}
    env.update(NEPTUNE_PROJECT="team/project", DENSESSL_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *QUICK,
           "logger=[neptune]"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    message = assert_user_error(proc, "NEPTUNE_API_TOKEN", "NEPTUNE_MODE=offline")
    assert len(message.strip().splitlines()) == 1
