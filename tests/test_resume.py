"""Preemption + exact resume: 4 steps straight == 2 steps, SIGTERM, resume, 2 more steps."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_cli import ROOT, TINY_DATA

RUN = [*TINY_DATA, "data.max_images=4", "trainer.max_epochs=2", "logger=[csv]", "trainer.enable_progress_bar=false",
       "+experiment=quickstart", "++backbone.model_kwargs.depth=1", "eval_before_after=false", "method.queue_size=16"]


def _train(run_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DENSESSL_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "helpers"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={run_dir}", *RUN, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return state["state_dict"]


def test_sigterm_checkpoint_then_resume_matches_straight_run(tmp_path):
    cache = tmp_path / "cache"
    straight = _train(tmp_path / "a", cache)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _train(tmp_path / "b", cache, "+callbacks.kill._target_=sigterm_callback.SigtermAtStep",
                    "+callbacks.kill.step=2")
    assert "received SIGTERM: checkpoint written" in killed.stdout, killed.stdout[-2000:] + killed.stderr[-2000:]
    first = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    resumed = _train(tmp_path / "b", cache, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _weights(tmp_path / "a" / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    for k in a:  # student, teacher, heads and the NeCo queues
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    proc = _train(tmp_path / "c", tmp_path / "cache", f"resume={bad}")
    assert proc.returncode == 2
    assert "bad.ckpt" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_of_another_model_on_resume_is_a_clear_error(tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "a", cache, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    proc = _train(tmp_path / "b", cache, "method.head.out_dim=64", f"resume={tmp_path / 'a'}")
    assert proc.returncode == 2
    assert "does not match this model" in proc.stderr and "Traceback" not in proc.stderr
