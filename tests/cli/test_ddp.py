"""2-process gloo DDP runs on CPU through Lightning: ranks end with identical queues and weights.

Every objective, all runs forked from one process (helpers/forked_runs.py). NeCo runs as users launch
it (trainer.strategy=ddp: Lightning re-launches train.py for rank 1, with Hydra's run folder); the
others with trainer.strategy=ddp_fork, the same DDPStrategy and collectives with forked ranks, which
spares each a ~15 s re-import of torch. tests/cli/test_matrix.py adds DDP with bf16, the DSE regularizer,
the evaluation callbacks and resume."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers.forked_runs import launch
from helpers.tiny_runs import ROOT, TINY_DATA

CASES = {
    "neco": ["+experiment=quickstart", "method.queue_size=32", "trainer.strategy=ddp"],
    "neco_fg": ["+experiment=quickstart", "method.queue_size=32", "method.loss_mask=fg"],  # uneven pushes
    "densecl": ["+experiment=densecl_quickstart", "method.queue_size=32"],
    "ibot": ["+experiment=ibot_quickstart", "method.decoupling=true"],
    "udi": ["+experiment=udi_quickstart"],
}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    tmp = tmp_path_factory.mktemp("ddp")
    specs = []
    for name, extra in CASES.items():
        (tmp / name).mkdir()
        strategy = [] if any(a.startswith("trainer.strategy=") for a in extra) else ["trainer.strategy=ddp_fork"]
        specs.append({"args": [f"hydra.run.dir={tmp / name / 'run'}", *extra, *strategy, *TINY_DATA,
                               "data.max_images=8", "trainer.max_steps=2", "trainer.max_epochs=1",
                               "trainer.devices=2", "logger=[csv]", "trainer.enable_progress_bar=false",
                               "eval_before_after=false", "++backbone.model_kwargs.depth=1",
                               "+callbacks.dump._target_=dump_buffers.DumpBuffers",
                               f"+callbacks.dump.dirpath={tmp / name / 'dump'}"],
                      "cwd": str(ROOT), "log": str(tmp / name / "out.log")})
    env = {**os.environ, "DENSESSL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    outs = launch(specs, tmp / "runs.json", env, timeout=1200)
    return {name: (tmp / name, code, out) for name, (code, out) in zip(CASES, outs)}


@pytest.mark.parametrize("method", list(CASES))
def test_two_process_ddp_keeps_ranks_identical(ddp_runs, method):
    folder, code, out = ddp_runs[method]
    assert code == 0, out[-4000:]
    assert "Starting with 2 processes" in out
    dump = folder / "dump"
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    shared = [k for k in r0["buffers"] if "queue" in k or "centre" in k]
    assert shared, "no queue/centre buffers found"
    for k in r0["buffers"]:
        torch.testing.assert_close(r0["buffers"][k], r1["buffers"][k], rtol=0, atol=0, msg=f"buffer {k} differs")
    for k in r0["params"]:  # DDP all-reduces gradients, so weights (student and EMA teacher) agree
        torch.testing.assert_close(r0["params"][k], r1["params"][k], msg=f"param {k} differs")
    assert (folder / "run" / "checkpoints" / "last.ckpt").exists()
