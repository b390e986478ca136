"""Tiny CPU runs of the entry points on synthetic data, shared by the end-to-end test modules: the
repository root, the tiny data/run overrides, and run_train / eval_args (one subprocess per run)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = ["data.synthetic.n_train=12", "data.synthetic.n_val=6", "data.synthetic.size=64",
             "data.num_workers=0", "data.batch_size=2"]
TINY_RUN = ["trainer.max_epochs=1", "trainer.max_steps=2", "logger=[csv]", "trainer.enable_progress_bar=false"]
QUICK_TINY = ["+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1"]


def run_train(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def eval_args(tmp_path: Path, script: str, *overrides: str) -> list[str]:
    """Arguments of evaluation/<script>.py on the tiny synthetic set, output in tmp_path/eval_<script>."""
    return [f"hydra.run.dir={tmp_path / f'eval_{script}'}", "backbone=vit_tiny", "++backbone.model_kwargs.depth=1",
            "data=synthetic", *TINY_DATA, *overrides]
