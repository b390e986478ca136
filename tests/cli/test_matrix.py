"""Every objective with every training option (issue 17): an all-pairs matrix of tiny runs of the real
entry point experiments/train.py on the CPU.

Factors: objective (neco, neco_fg = method.loss_mask=fg, ibot, ibot_dc = method.decoupling=true, udi,
densecl) x precision (32, bf16 = trainer.precision=bf16-mixed) x DSE regularizer (off, on =
dse.regularizer.weight=0.001) x strategy (single process, ddp = trainer=ddp trainer.accelerator=cpu
trainer.devices=2, gloo) x callbacks (default, all = [default,dse,overcluster,linear,retrieval], with
callbacks.checkpoint.monitor=dse/value). The ddp cells add trainer.strategy=ddp_fork: the same DDPStrategy
with forked ranks instead of a re-launched script, which would re-import torch (~15 s a run here); the
re-launch itself is tested by tests/cli/test_ddp.py.
The cells come from helpers/pairwise.py (greedy all-pairs, a 2-process cell costing 2.5 pairs): every
pair of levels of every two factors is in some cell, except objective x strategy, which
tests/cli/test_ddp.py covers for every objective (keeping 2-process cells, ~10x slower, to two). Every cell
resumes: run 1 stops after epoch 0 (1 step, checkpoint epoch000-step1.ckpt), run 2 resumes the run folder
(resume=auto) to step 2. Checked per cell: exit 0 both times, finite train/loss, the checkpoints, the
resumed step count, the options' own outputs (bf16 in Lightning's banner, train/dse_reg, the callbacks'
figures, each run's epochs); on 2 processes, identical buffers, weights and DSE-monitor values on both
ranks and no Lightning sync_dist warning. All runs are forked from one process (helpers/forked_runs.py).

The cells (test_docstring_lists_the_generated_cells keeps this table the generated one):

    objective  precision  dse_reg  strategy  callbacks
    neco       32         off      single    default
    neco       bf16       on       single    all
    neco_fg    32         off      ddp       all
    neco_fg    bf16       on       ddp       default
    ibot       32         on       single    default
    ibot       bf16       off      single    all
    ibot_dc    32         off      single    default
    ibot_dc    bf16       on       single    all
    udi        32         off      single    default
    udi        bf16       on       single    all
    densecl    32         off      single    default
    densecl    bf16       on       single    all
"""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

import pytest
import torch

from helpers.forked_runs import launch
from helpers.pairwise import all_pairs, pairs_of, required_pairs
from helpers.tiny_runs import TINY_DATA

FACTORS = {"objective": ["neco", "neco_fg", "ibot", "ibot_dc", "udi", "densecl"], "precision": ["32", "bf16"],
           "dse_reg": ["off", "on"], "strategy": ["single", "ddp"], "callbacks": ["default", "all"]}
SKIP = {frozenset(("objective", "strategy"))}  # tests/cli/test_ddp.py: every objective on 2 processes
CELLS = all_pairs(FACTORS, SKIP, cost=lambda cell: 2.5 * (cell["strategy"] == "ddp"))

TINY_VIT = ["backbone.img_size=32", "++backbone.model_kwargs.depth=1", "++backbone.model_kwargs.embed_dim=64",
            "++backbone.model_kwargs.num_heads=2"]
MULTICROP = ["method.crops.global_size=32", "method.crops.local_size=16"]
DINO_HEAD = ["method.head.out_dim=64", "method.head.hidden_dim=32", "method.head.bottleneck_dim=16"]
NECO = ["+experiment=quickstart", *MULTICROP, "method.queue_size=16", "method.queue_push=4", "method.roi_size=2",
        "method.head.hidden_dim=32", "method.head.out_dim=16"]
IBOT = ["+experiment=ibot_quickstart", *MULTICROP, *DINO_HEAD]
OBJECTIVES = {
    "neco": NECO,
    "neco_fg": [*NECO, "method.loss_mask=fg"],
    "ibot": [*IBOT, "method.decoupling=false"],
    "ibot_dc": [*IBOT, "method.decoupling=true"],
    "udi": ["+experiment=udi_quickstart", *MULTICROP, *DINO_HEAD, "method.crops.n_local=2",
            "method.srs_window_global=2", "method.srs_window_local=1"],
    "densecl": ["+experiment=densecl_quickstart", "method.crops.size=32", "method.neck.hidden_dim=32",
                "method.neck.out_dim=16", "method.queue_size=16"],
}
OPTIONS = {
    ("precision", "bf16"): ["trainer.precision=bf16-mixed"],
    ("dse_reg", "on"): ["dse.regularizer.weight=0.001", "dse.regularizer.global_clusters=6"],
    ("strategy", "ddp"): ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_fork"],
    ("callbacks", "all"): ["callbacks=[default,dse,overcluster,linear,retrieval]",
                           "callbacks.checkpoint.monitor=dse/value", "callbacks.checkpoint.mode=max",
                           "callbacks.dse.num_images=4",
                           "callbacks.dse.image_size=32", "callbacks.dse.batch_size=4", "callbacks.dse.dse_batch=4",
                           "callbacks.dse.global_clusters=6", "callbacks.overcluster.niter=5",
                           "callbacks.linear.max_iter=5", "callbacks.linear.max_train_images=4",
                           "callbacks.retrieval.max_train_images=4", "callbacks.retrieval.k=5",
                           "overcluster.image_size=32", "overcluster.mask_size=32", "overcluster.ks=[7]",
                           "overcluster.pca_dim=8", "overcluster.max_images=4", "overcluster.num_vis=1",
                           "overcluster.seeds=[0]", "overcluster.niter=5"],
}
# One batch of 2 images per process and epoch: run 1 is epoch 0 (step 1), the resumed run 2 epoch 1 (step 2).
COMMON = [*TINY_DATA, *TINY_VIT, "logger=[csv]", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
          "trainer.limit_train_batches=1", "trainer.num_sanity_val_steps=0"]
FIGURES = ["dse/value", "val/overcluster/k7_miou_mean", "val/linear/linear_miou_full_res", "val/retrieval/hbird_miou"]
SYNC_WARNING = "sync_dist=True"  # Lightning: "It is recommended to use `self.log(..., sync_dist=True)` ..."


def cell_id(cell: dict) -> str:
    return "-".join(cell.values())


def cell_args(cell: dict, run: Path, dump: Path) -> list[str]:
    args = [*COMMON, *OBJECTIVES[cell["objective"]], f"hydra.run.dir={run}",
            f"data.max_images={4 if cell['strategy'] == 'ddp' else 2}",
            f"eval_before_after={cell['callbacks'] == 'all'}"]  # overclustering before and after as well
    for key, value in cell.items():
        args += OPTIONS.get((key, value), [])
    if cell["strategy"] == "ddp":
        args += ["+callbacks.dump._target_=dump_buffers.DumpBuffers", f"+callbacks.dump.dirpath={dump}"]
    return args


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    """Run every cell (run 1, then the resumed run 2) in one forked_runs process; the wall time is printed."""
    tmp = tmp_path_factory.mktemp("matrix")
    specs, folders = [], {}
    for cell in CELLS:
        name = cell_id(cell)
        folders[name] = tmp / name
        args = cell_args(cell, tmp / name / "run", tmp / name / "dump")
        specs += [{"args": [*args, "trainer.max_epochs=1"], "log": str(tmp / name / "run1.log")},
                  {"args": [*args, "trainer.max_epochs=2", "resume=auto"], "log": str(tmp / name / "run2.log")}]
    for folder in folders.values():
        folder.mkdir()
    env = {**os.environ, "DENSESSL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    outs = launch(specs, tmp / "runs.json", env, timeout=1200)
    print(f"\ncombination matrix: {len(CELLS)} cells, {len(specs)} runs in {time.perf_counter() - start:.0f} s")
    return {name: (folder, outs[2 * i: 2 * i + 2]) for i, (name, folder) in enumerate(folders.items())}


def _metrics(run: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted((run / "logs" / "csv").rglob("metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_cell_trains_checkpoints_and_resumes(matrix, cell):
    folder, [(code1, out1), (code2, out2)] = matrix[cell_id(cell)]
    run = folder / "run"
    assert code1 == 0, out1[-4000:]
    assert code2 == 0, out2[-4000:]
    ckpts = run / "checkpoints"
    assert f"resuming from {ckpts / 'last.ckpt'} (step 1)" in out2, out2[-3000:]
    assert {"epoch000-step1.ckpt", "epoch001-step2.ckpt", "last.ckpt"} <= {p.name for p in ckpts.iterdir()}
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 and last["epoch"] >= 1  # continued past the step-1 checkpoint
    assert (run / "backbone.pth").is_file()
    rows = _metrics(run)
    losses = _values(rows, "train/loss")
    assert len(losses) == 2 and all(map(math.isfinite, losses)), losses
    if cell["precision"] == "bf16":
        assert all("bfloat16 Automatic Mixed Precision" in out for out in (out1, out2))
    regs = _values(rows, "train/dse_reg")
    assert (len(regs) == 2 and all(map(math.isfinite, regs))) if cell["dse_reg"] == "on" else regs == []
    for key in FIGURES:  # once after each run's epoch; the mIoUs in (0, 1]
        figures = _values(rows, key)
        assert (len(figures) == 2 and all(map(math.isfinite, figures))) if cell["callbacks"] == "all" \
            else figures == [], (key, figures)
        assert all(0.0 < f <= 1.0 for f in figures) or key == "dse/value", (key, figures)
    if cell["callbacks"] == "all":  # eval_before_after: the before/after table and pictures, each run
        assert all("overclustering mIoU" in out and "after" in out for out in (out1, out2))
        assert (run / "pictures" / "overcluster_after.png").is_file()
    if cell["callbacks"] == "all":  # ModelCheckpoint(monitor="dse/value") found the monitored value
        [state] = [s for s in last["callbacks"].values() if s.get("monitor") == "dse/value"]
        assert math.isfinite(float(state["best_model_score"])), state
    assert last["SSLDataModule"]["world"] == (2 if cell["strategy"] == "ddp" else 1)  # see test_resume.py
    if cell["strategy"] == "ddp":
        assert SYNC_WARNING not in out1 + out2
        r0, r1 = (torch.load(folder / "dump" / f"rank{r}.pt") for r in (0, 1))
        for part in ("buffers", "params"):
            for k in r0[part]:
                torch.testing.assert_close(r0[part][k], r1[part][k], rtol=0, atol=0, msg=f"{part} {k} differs")
        # the DSE monitor: one value per evaluation, the same on both ranks (computed on rank 0, broadcast)
        assert r0["dse"] == r1["dse"] and len(r0["dse"]) == (1 if cell["callbacks"] == "all" else 0)
        assert r0["callback_metrics"] == r1["callback_metrics"]


def test_design_covers_every_pair():
    required = required_pairs(FACTORS, SKIP)
    covered = set().union(*(pairs_of(cell, SKIP) for cell in CELLS))
    assert covered == required
    assert sum(cell["strategy"] == "ddp" for cell in CELLS) == 2
    assert {cell["objective"] for cell in CELLS} == set(FACTORS["objective"])
    # tests/methods/test_precision.py relies on this cell for DenseCL under bf16-mixed with every evaluator
    assert dict(objective="densecl", precision="bf16", dse_reg="on", strategy="single", callbacks="all") in CELLS


def test_docstring_lists_the_generated_cells():
    lines = __doc__.split("The cells (")[1].strip().splitlines()[2:]
    table = [line.split() for line in lines if line.strip()]
    assert table[0] == list(FACTORS)
    assert table[1:] == [list(cell.values()) for cell in CELLS]
