"""iBOT + de-coupling: loss maths, centres, schedules, masks, de-coupling invariants, masked forward,
non-finite guard and both COCO presets end to end (docs/objectives/ibot.md)."""
from __future__ import annotations

import csv
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densessl.losses.dino import Centre, distill_ce, teacher_probs
from densessl.losses.ibot import IBOTLoss, masked_patch_loss
from densessl.methods import IBOT, NonFiniteLossError
from densessl.methods.ibot import MaskToken, collate_ibot, forward_masked
from densessl.models import Backbone
from densessl.transforms.decouple import build_decoupled_views, mix_partner_embeddings
from densessl.transforms.masks import MaskSampler, block_mask, rcc_mask

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = dict(name="vit_tiny", img_size=32, model_kwargs=dict(depth=1, patch_size=8, embed_dim=32, num_heads=2))


def _entropy(logits: torch.Tensor, temp: float) -> torch.Tensor:
    p = F.softmax(logits / temp, -1)
    return -(p * p.log()).sum(-1)


# ---------------------------------------------------------------------------------------------- loss
def test_identical_outputs_give_entropy_and_zero_gradient() -> None:
    torch.manual_seed(0)
    b, n, k, temp = 3, 5, 7, 0.1
    t_cls = [torch.randn(b, k) for _ in range(2)]
    t_patch = [torch.randn(b, n, k) for _ in range(2)]
    # Cross-view [CLS] pairs: the student of view v matches the teacher of the other view.
    s_cls = [t_cls[1].clone().requires_grad_(), t_cls[0].clone().requires_grad_()]
    s_patch = [t.clone().requires_grad_() for t in t_patch]
    masks = [torch.rand(b, n) < 0.5 for _ in range(2)]
    masks[0][0] = True  # at least one masked patch per view
    loss_fn = IBOTLoss(k, k, student_temp=temp)
    out = loss_fn(s_cls, s_patch, t_cls, t_patch, masks, teacher_temp=temp, teacher_patch_temp=temp)
    cls_expected = (_entropy(t_cls[0], temp).mean() + _entropy(t_cls[1], temp).mean()) / 2
    patch_expected = sum(((_entropy(t, temp) * m).sum(1) / m.sum(1).clamp(min=1)).mean()
                         for t, m in zip(t_patch, masks)) / 2
    assert torch.allclose(out["cls"], cls_expected, atol=1e-5)
    assert torch.allclose(out["patch"], patch_expected, atol=1e-5)
    out["loss"].backward()
    for t in s_cls + s_patch:
        assert t.grad.abs().max() < 1e-6  # dL/ds = (P_s - P_t) / tau = 0


def test_distillation_is_nonnegative_asymmetric_and_zero_when_confident() -> None:
    torch.manual_seed(1)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    kl_ab = distill_ce(a, teacher_probs(b, torch.zeros(1, 6), 0.1), 0.1) - _entropy(b, 0.1)
    kl_ba = distill_ce(b, teacher_probs(a, torch.zeros(1, 6), 0.1), 0.1) - _entropy(a, 0.1)
    assert (kl_ab > 0).all() and not torch.allclose(kl_ab, kl_ba)
    onehot = torch.eye(6)[:4] * 100  # confident identical outputs
    assert distill_ce(onehot, teacher_probs(onehot, torch.zeros(1, 6), 0.1), 0.1).max() < 1e-6


def test_unmasked_positions_do_not_change_the_masked_loss() -> None:
    torch.manual_seed(2)
    s, t, zero = torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.zeros(1, 5)
    mask = torch.tensor([[False, False, False, False], [False, True, False, False]])
    rows = masked_patch_loss(s, t, mask, zero, 0.07, 0.1)
    assert rows[0] == 0  # empty mask: exactly 0
    assert torch.allclose(rows[1], -(F.softmax(t[1, 1] / 0.07, -1) * F.log_softmax(s[1, 1] / 0.1, -1)).sum())
    s2 = s.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), 5) * 10
    assert torch.equal(masked_patch_loss(s2, t, mask, zero, 0.07, 0.1), rows)
    # the empty row still counts in the batch mean: L_mim = rows[1] / 2
    loss = IBOTLoss(5, 5)([torch.randn(2, 5)] * 2, [s, s], [torch.randn(2, 5)] * 2, [t, t], [mask, mask], 0.1, 0.07)
    assert torch.allclose(loss["patch"], rows[1] / 2)


def test_centre_update_is_exact_and_the_loss_uses_the_previous_centre() -> None:
    torch.manual_seed(3)
    z_cls, z_patch = torch.randn(4, 6), torch.randn(4, 3, 6)
    loss_fn = IBOTLoss(6, 6)
    centre0 = torch.randn(1, 6)
    loss_fn.centre.centre.copy_(centre0)
    s_cls = [torch.randn(2, 6), torch.randn(2, 6)]
    masks = [torch.zeros(2, 3, dtype=torch.bool)] * 2
    out = loss_fn(s_cls, list(z_patch.chunk(2)), list(z_cls.chunk(2)), list(z_patch.chunk(2)), masks, 0.04, 0.07)
    q = [teacher_probs(t, centre0, 0.04) for t in z_cls.chunk(2)]
    expected = (distill_ce(s_cls[1], q[0], 0.1).mean() + distill_ce(s_cls[0], q[1], 0.1).mean()) / 2
    assert torch.allclose(out["cls"], expected)
    assert torch.allclose(loss_fn.centre.centre, 0.9 * centre0 + 0.1 * z_cls.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(loss_fn.patch_centre.centre, 0.1 * z_patch.mean(1).mean(0, keepdim=True), atol=1e-6)
    centre, z = Centre(6), torch.randn(5, 6)
    for _ in range(7):
        centre.update(z)
    assert torch.allclose(centre.centre, (1 - 0.9 ** 7) * z.mean(0, keepdim=True), atol=1e-6)


def test_decoupled_rows_only_enter_the_decoupling_term() -> None:
    torch.manual_seed(4)
    b, n, k = 6, 4, 5  # rows 4 and 5 are de-coupled
    replaced = [torch.zeros(b, n, dtype=torch.bool) for _ in range(2)]
    for r in replaced:
        r[4, :2], r[5, 2:] = True, True
    masks = [torch.zeros(b, n, dtype=torch.bool) for _ in range(2)]
    for m in masks:
        m[:4, 1] = True
    s_cls, t_cls = [torch.randn(b, k) for _ in range(2)], [torch.randn(b, k) for _ in range(2)]
    s_patch, t_patch = [torch.randn(b, n, k) for _ in range(2)], [torch.randn(b, n, k) for _ in range(2)]
    args = (masks, 0.04, 0.07)
    out = IBOTLoss(k, k)(s_cls, s_patch, t_cls, t_patch, *args, replaced=replaced)
    vanilla = IBOTLoss(k, k)([s[:4] for s in s_cls], [s[:4] for s in s_patch], [t[:4] for t in t_cls],
                             [t[:4] for t in t_patch], [m[:4] for m in masks], 0.04, 0.07)
    assert torch.allclose(out["cls"], vanilla["cls"]) and torch.allclose(out["patch"], vanilla["patch"])
    dc = sum(masked_patch_loss(s[4:], t[4:], ~r[4:], torch.zeros(1, k), 0.07, 0.1).mean()
             for s, t, r in zip(s_patch, t_patch, replaced)) / 2
    assert torch.allclose(out["dc"], dc)
    assert torch.allclose(out["loss"], vanilla["loss"] + 0.3 * dc)
    # no de-coupled row at all: the term is 0 and the loss is vanilla iBOT
    none = IBOTLoss(k, k)(s_cls, s_patch, t_cls, t_patch, *args, replaced=[torch.zeros_like(r) for r in replaced])
    plain = IBOTLoss(k, k)(s_cls, s_patch, t_cls, t_patch, *args)
    assert none["dc"] == 0 and torch.equal(none["loss"], plain["loss"])


# ------------------------------------------------------------------------------------------ schedule
def test_teacher_temperature_schedule_matches_linspace() -> None:
    method = IBOT(TINY_VIT, {"lr": 1e-3}, head={"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8},
                  warmup_teacher_temp_epochs=30, teacher_temp=0.07, teacher_patch_temp=0.06)
    ref = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(10, 0.07)])
    ref_p = np.concatenate([np.linspace(0.04, 0.06, 30), np.full(10, 0.06)])
    got = np.array([method.teacher_temperatures(e) for e in range(40)])
    assert np.allclose(got[:, 0], ref) and np.allclose(got[:, 1], ref_p)
    assert got[0, 0] == 0.04 and got[29, 0] == 0.07


def test_pred_start_epoch_empties_masks_and_delays_the_patch_temperature() -> None:
    method = IBOT(TINY_VIT, {"lr": 1e-3}, head={"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8},
                  warmup_teacher_temp_epochs=30, teacher_patch_temp=0.06, pred_start_epoch=5)
    got = np.array([method.teacher_temperatures(e) for e in range(45)])
    ref_p = np.concatenate([np.full(5, 0.04), np.linspace(0.04, 0.06, 30), np.full(10, 0.06)])  # reference
    assert np.allclose(got[:, 1], ref_p) and got[29, 0] == 0.07  # the [CLS] schedule is unchanged
    masks = [torch.ones(2, 4, 4, dtype=torch.bool)] * 2
    batch = {"crops": [torch.zeros(2, 3, 32, 32, dtype=torch.uint8)] * 2, "masks": masks}
    assert not any(m.any() for m in method.prepare_views(dict(batch))["masks"])  # epoch 0 < 5
    method.pred_start_epoch = 0
    assert all(m.all() for m in method.prepare_views(dict(batch))["masks"])


def test_reference_lr_and_momentum_schedule_endpoints() -> None:
    from densessl.models import cosine_momentum
    from densessl.schedules import cosine_schedule

    epochs, iters, warmup, peak = 800, 231, 10, 1e-3 * 512 / 256  # COCO 118k / 512 per step
    total = epochs * iters
    assert cosine_schedule(0, total, peak, 1e-6, warmup * iters) == 0.0
    assert cosine_schedule(warmup * iters, total, peak, 1e-6, warmup * iters) == peak
    assert math.isclose(cosine_schedule(total, total, peak, 1e-6, warmup * iters), 1e-6)
    momentum = [cosine_momentum(k, total, 0.996) for k in range(0, total + 1, 997)]
    assert momentum[0] == 0.996 and all(b >= a for a, b in zip(momentum, momentum[1:]))
    assert cosine_momentum(total, total, 0.996) == 1.0


# -------------------------------------------------------------------------------------------- masks
def test_block_mask_statistics() -> None:
    rng = random.Random(0)
    counts = np.array([int(block_mask(14, 14, 0.3, rng=rng).sum()) for _ in range(300)])
    assert counts.max() <= int(0.3 * 196) and counts.min() >= 40 and 56.0 < counts.mean() < 58.5
    sampler = MaskSampler("block", [0.0, 0.3], [0.0, 0.2])
    frac = np.array([float(sampler(14, 14, rng).float().mean()) for _ in range(600)])
    assert abs((frac == 0).mean() - 0.51) < 0.06 and abs(frac.mean() - 0.14) < 0.015


def test_rcc_box_in_the_last_half_cell_of_a_small_grid_keeps_one_cell() -> None:
    """A box starting at 0.8 of a 2x2 grid rounds its start to 2, past its clamped end 1: it must still be
    one cell (this divided by zero in a 32 px / patch 16 run)."""
    from densessl.transforms.masks import rcc_mask

    mask = rcc_mask(2, 2, 0.5, boxes=[(0.8, 0.8, 1.0, 1.0)], rng=random.Random(0))
    assert mask.shape == (2, 2) and mask.sum() <= 1  # one cell at most (a cut may start a patch early)


def test_rcc_mask_statistics() -> None:
    rng = random.Random(0)
    for rho, expected in ((0.2, 0.219), (0.4, 0.422), (0.6, 0.597)):
        frac = np.array([float(rcc_mask(14, 14, rho, rng=rng).float().mean()) for _ in range(300)])
        assert abs(frac.mean() - expected) < 0.01 and 0.02 < frac.std() < 0.06
    assert not rcc_mask(14, 14, 0.0, rng=rng).any()
    sampler = MaskSampler("rcc", [0.0, 0.4], [0.0, 0.2])
    frac = np.array([float(sampler(14, 14, rng).float().mean()) for _ in range(400)])
    nonempty = frac[frac > 0]
    assert abs((frac == 0).mean() - 0.5) < 0.07 and abs(nonempty.mean() - 0.42) < 0.02
    assert nonempty.min() > 0.1 and frac.max() < 0.75


def test_mask_sampler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="block"):
        MaskSampler("random")
    with pytest.raises(ValueError, match="pred_ratio_var"):
        MaskSampler("rcc", [0.0, 0.1], [0.0, 0.2])


# --------------------------------------------------------------------------------------- de-coupling
def _views(n_img: int, n_nonempty: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randint(0, 255, (n_img, 3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(2)]
    masks = [torch.zeros(n_img, 4, 4, dtype=torch.bool) for _ in range(2)]
    for i in range(n_nonempty):  # alternate views; each non-empty mask covers a random proper subset
        m = torch.rand(4, 4, generator=g) < 0.4
        m[0, 0], m[3, 3] = True, False
        masks[i % 2][i // 2] = m
    return crops, masks


def test_decoupled_views_invariants() -> None:
    n_img = 16
    crops, masks = _views(n_img, 11)
    pool = torch.cat([m[m.flatten(1).any(1)] for m in masks])  # view 1's non-empty masks, then view 2's
    n = min(2 * int(n_img * 0.25), 11) // 4
    assert n == 2
    out = build_decoupled_views(crops, masks, 0.25)
    assert out.n == n
    for v in range(2):
        assert out.crops[v].shape[0] == out.masks[v].shape[0] == out.replaced[v].shape[0] == n_img + 2 * n
        assert torch.equal(out.crops[v][:n_img], crops[v])
        assert torch.equal(out.crops[v][n_img:], crops[v][n_img - 2 * n:])  # duplicates of the last 2n rows
        assert torch.equal(out.masks[v][:n_img], masks[v]) and not out.masks[v][n_img:].any()  # no mask tokens
        assert not out.replaced[v][:n_img].any()
        extra = out.replaced[v][n_img:].flatten(1)
        assert extra.any(1).all() and (~extra).any(1).all()  # replaced and kept sets both non-empty
        base = pool[2 * n * v: 2 * n * (v + 1)]
        assert torch.equal(out.replaced[v][n_img:n_img + n], base[:n])
        assert torch.equal(out.replaced[v][n_img + n:], ~base[n:])


def test_decoupling_is_skipped_with_fewer_than_four_masks() -> None:
    crops, masks = _views(16, 3)
    out = build_decoupled_views(crops, masks, 0.25)
    assert out.n == 0 and out.crops[0].shape[0] == 16 and not out.replaced[0].any()


def test_partner_is_the_flipped_batch_without_gradient() -> None:
    x = torch.randn(6, 4, 3, requires_grad=True)
    replaced = torch.zeros(6, 4, dtype=torch.bool)
    replaced[4, :2] = True
    out = mix_partner_embeddings(x, replaced)
    assert torch.equal(out[4, :2], x[1, :2]) and torch.equal(out[4, 2:], x[4, 2:])
    assert torch.equal(out[:4], x[:4]) and torch.equal(out[5], x[5])
    out.sum().backward()
    expected = torch.ones(6, 4, 3)
    expected[4, :2] = 0  # replaced positions: no gradient to anyone (the background is detached)
    assert torch.equal(x.grad, expected)


# ------------------------------------------------------------------------------------ masked forward
def test_forward_masked_matches_timm_and_applies_replacement_then_mask_token() -> None:
    torch.manual_seed(5)
    backbone = Backbone(**TINY_VIT).eval()
    for size in (32, 48):  # nominal and interpolated position embeddings
        images = torch.randn(4, 3, size, size)
        ref = backbone.forward_features(images)
        out = forward_masked(backbone, images)
        assert torch.allclose(out["cls"], ref["cls"], atol=1e-5)
        assert torch.allclose(out["patches"], ref["patches"], atol=1e-5)
    images = torch.randn(4, 3, 32, 32)
    token = MaskToken(32)
    token.token.data.fill_(3.0)
    mask, replaced = torch.zeros(4, 16, dtype=torch.bool), torch.zeros(4, 16, dtype=torch.bool)
    mask[0, :5] = True
    replaced[3, 8:] = True
    seen = {}
    handle = backbone.model.norm_pre.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    forward_masked(backbone, images, mask, token, replaced)
    handle.remove()
    emb = backbone.model.patch_embed(images).reshape(4, 16, 32)
    expected = emb.clone()
    expected[3, 8:] = emb[0, 8:]  # row B-1-i
    expected[0, :5] = 3.0
    got = seen["x"][:, 1:] - backbone.model.pos_embed[:, 1:]
    assert torch.allclose(got, expected, atol=1e-5)
    no_mask = forward_masked(backbone, images, torch.zeros_like(mask), token)["patches"]
    assert torch.allclose(no_mask, forward_masked(backbone, images)["patches"])


# --------------------------------------------------------------------------------- method and guard
def _batch(method: IBOT, n: int) -> dict:
    transform = method.train_transform()
    rng = np.random.default_rng(0)
    return collate_ibot([transform(Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)))
                         for _ in range(n)])


def _tiny_method(**kwargs) -> IBOT:
    return IBOT(TINY_VIT, {"lr": 1e-3}, head={"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8},
                crops={"global_size": 32, "local_size": 16, "n_local": 2}, **kwargs)


def test_method_step_with_decoupling_and_local_crops() -> None:
    torch.manual_seed(6)
    random.seed(6)
    method = _tiny_method(decoupling=True, masking={"shape": "rcc", "ratio": 0.4})
    batch = method.prepare_views(_batch(method, 8))
    assert [c.shape[0] for c in batch["crops"]] == [10, 10, 8, 8]  # n = 2 * floor(8 / 4) // 4 = 1
    terms = method.compute_loss(batch)
    assert terms["dense"].shape == (8, 16, 32) and terms["dc"] > 0
    terms["loss"].backward()
    assert method.mask_token.token.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher_backbone.parameters())


def test_non_finite_loss_raises(tmp_path: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(7)
    method = _tiny_method()
    transform = method.train_transform()
    samples = [transform(Image.new("RGB", (40, 40), (i * 20, 50, 90))) for i in range(4)]
    with torch.no_grad():
        method.student_backbone.model.norm.weight.fill_(float("nan"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        trainer.fit(method, DataLoader(samples, batch_size=2, collate_fn=collate_ibot))


# ------------------------------------------------------------------------------------------ end to end
def test_coco_presets_end_to_end(tmp_path: Path) -> None:
    # One process (imports dominate): ibot_dc_coco (which composes ibot_coco) swept over the switch.
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "-m", "+experiment=ibot_dc_coco",
           "method.decoupling=false,true", "backbone.weights=none", "data=synthetic", "trainer=cpu",
           "trainer.precision=32-true", "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
           "data.batch_size=8", "data.num_workers=0", "data.max_images=16", "data.synthetic.n_train=16",
           "data.synthetic.n_val=4", "eval_before_after=false", "logger=[csv]", f"hydra.sweep.dir={tmp_path / 'runs'}",
           "backbone.img_size=32", "+backbone.model_kwargs.depth=1", "+backbone.model_kwargs.embed_dim=32",
           "+backbone.model_kwargs.num_heads=2", "method.crops.global_size=32", "method.crops.local_size=16",
           "method.head.out_dim=32", "method.head.hidden_dim=32", "method.head.bottleneck_dim=16"]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, has_dc in ((0, False), (1, True)):
        run = tmp_path / "runs" / f"{job}_ibot_dc"
        rows = list(csv.DictReader(next(run.rglob("metrics.csv")).open()))
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        assert ("train/dc" in rows[0]) == has_dc
        assert (run / "backbone.pth").is_file()
