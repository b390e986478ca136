"""DSE in training: the monitor callback, the regularizer through config, the curve CLI and selection."""
import csv
import os
import subprocess
import sys

import torch

from helpers.tiny_runs import ROOT, TINY_DATA, TINY_RUN, run_train


def test_regularizer_gradient_reaches_backbone_and_keeps_global_rng():
    from densessl.methods import NeCo

    model = NeCo(backbone=dict(name="vit_tiny", model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=8)),
                 optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), queue_size=0,
                 dse_regularizer=dict(weight=0.001, local_clusters=3, global_clusters=6))
    tokens, _ = model.student_backbone.forward_patches(torch.randn(4, 3, 32, 32))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    reg = model.dse_term(tokens)
    assert torch.equal(torch.rand(3), expected), "the regularizer consumed the global RNG"
    reg.backward()
    grads = [p.grad for p in model.student_backbone.parameters() if p.grad is not None]
    assert torch.isfinite(reg) and grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_dse_monitor_curve_cli_and_selection(tmp_path):
    run_train(tmp_path, "+experiment=quickstart", *TINY_DATA, *TINY_RUN, "++backbone.model_kwargs.depth=1",
              "eval_before_after=false", "trainer.max_steps=-1", "trainer.max_epochs=3", "data.max_images=4",
              "callbacks=[default,dse]", "callbacks.dse.num_images=6", "callbacks.dse.image_size=32",
              "callbacks.dse.dse_batch=6", "callbacks.dse.global_clusters=6", "dse.regularizer.weight=0.001",
              "dse.regularizer.global_clusters=6")
    with open(tmp_path / "run" / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    dse_values = [float(r["dse/value"]) for r in rows if r.get("dse/value")]
    assert len(dse_values) == 3 and all(map(torch.isfinite, torch.tensor(dse_values)))
    assert any(r.get("train/dse_reg") for r in rows)  # the regularizer is logged separately
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "evaluation" / "dse.py"),  # no hydra.run.dir: <run>/eval/dse/<date>_<time>
           f"weights={tmp_path / 'run'}", "data=synthetic", *TINY_DATA, "eval.options.num_images=6",
           "eval.options.image_size=32", "eval.options.dse_batch=6", "eval.options.global_clusters=6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model-selection candidates" in proc.stdout
    [ev] = (tmp_path / "run" / "eval" / "dse").iterdir()
    curve = ev / "dse_curve.csv"
    assert (ev / "dse_curve.png").stat().st_size > 0
    log = (ev / "dse.log").read_text()  # Hydra's job log: one line per checkpoint, then the candidates
    assert log.count("inter=") == 3 and "model-selection candidates" in log
    with open(curve) as f:
        assert len(list(csv.DictReader(f))) == 3  # one row per epoch checkpoint
    sel = subprocess.run([sys.executable, str(ROOT / "evaluation" / "select_checkpoints.py"), str(curve)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert sel.returncode == 0 and "1. step" in sel.stdout, sel.stderr
