import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densessl.losses.udi import UDILoss, crop_weighted, multimodal_target, teacher_temperature_schedule
from densessl.methods.udi import UDI
from densessl.models import Backbone, DINOHead
from densessl.models.udi_vit import UDIViT
from densessl.transforms import ColorAugment
from densessl.transforms.sampling import (UDIMultiCrop, cell_centres, gather_tokens, project_points, random_hflip,
                                          sample_tokens, shift_towards, stratified_cells)

ROOT = Path(__file__).resolve().parents[2]


def _tiny_udi(**kwargs):
    base = dict(backbone=dict(name="vit_tiny", weights="none", img_size=64, model_kwargs=dict(depth=1)),
                optim=dict(lr=1e-3), head=dict(out_dim=32, hidden_dim=32, bottleneck_dim=16),
                crops=dict(global_size=64, local_size=32, n_local=2), srs_window_global=2, srs_window_local=1)
    return UDI(**{**base, **kwargs})


# ---------------------------------------------------------------------- stratified random sampling
@pytest.mark.parametrize("grid,window,strata", [((14, 14), 3, 16), ((6, 6), 2, 9)])
def test_one_sample_per_stratum_inside_a_corner_block(grid, window, strata):
    gen = torch.Generator().manual_seed(0)
    cells = stratified_cells(400, grid, window, gen)
    assert cells.shape == (400, strata)
    rows, cols = cells // grid[1], cells % grid[1]
    k = grid[0] // window
    leftover = grid[0] - k * window
    # Cell s lies in window s (row-major) of a k*window block anchored at one of the four corners.
    strata_r, strata_c = torch.arange(strata) // k, torch.arange(strata) % k
    corners = set()
    for r, c in zip(rows, cols):
        fits = [(oy, ox) for oy in {0, leftover} for ox in {0, leftover}
                if torch.equal((r - oy).div(window, rounding_mode="floor"), strata_r)
                and torch.equal((c - ox).div(window, rounding_mode="floor"), strata_c)
                and (r >= oy).all() and (c >= ox).all()]
        assert fits
        corners.update(fits)
    assert len(corners) == (4 if leftover else 1)
    if not leftover:  # one uniform draw per window: every in-window position equally often
        counts = torch.bincount(((rows % window) * window + cols % window).flatten(), minlength=window**2)
        expected = cells.numel() / window**2
        assert ((counts - expected).abs() < 0.15 * expected).all()
    with pytest.raises(ValueError, match="window"):
        stratified_cells(1, (2, 2), 3)


def test_projection_drops_out_of_view_points_and_maps_through_image_coordinates():
    cells = torch.tensor([[0, 3, 12, 15]])  # corners of a 4x4 grid
    pts = cell_centres(cells, (4, 4))
    torch.testing.assert_close(pts, torch.tensor([[[0.125, 0.125], [0.875, 0.125], [0.125, 0.875], [0.875, 0.875]]]))
    src = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    tgt = torch.tensor([[0.25, 0.0, 0.75, 0.5]])
    out, valid = project_points(pts, src, tgt)
    # Image x of the points: 0.0625 and 0.4375; only the latter is inside [0.25, 0.75].
    assert valid.tolist() == [[False, True, False, True]]
    torch.testing.assert_close(out[0, 1], torch.tensor([(0.4375 - 0.25) / 0.5, 0.125]))
    # Identical crops: every sample valid and unmoved (patch-centre convention).
    out, valid = project_points(pts, src, src)
    assert valid.all() and torch.allclose(out, pts)


def test_flip_is_recorded_in_the_boxes():
    crops = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).reshape(2, 3, 2, 4)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    flipped, fboxes = random_hflip(crops, boxes, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, crops.flip(-1))
    torch.testing.assert_close(fboxes[0], torch.tensor([0.5, 0.2, 0.1, 0.6]))
    # A point a tenth into the flipped crop sits nine tenths into the original one.
    out, valid = project_points(torch.tensor([[[0.1, 0.5]]]), fboxes[:1], boxes[:1])
    torch.testing.assert_close(out, torch.tensor([[[0.9, 0.5]]]))
    same, same_boxes = random_hflip(crops, boxes, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, crops) and torch.equal(same_boxes, boxes)


def test_bilinear_sampling_matches_the_teacher_map():
    # Tokens = (x, y) of their centres: a linear field that bilinear sampling reproduces exactly.
    grid = (5, 7)
    cells = torch.arange(35)[None]
    tokens = cell_centres(cells, grid)  # (1, 35, 2)
    pts = torch.tensor([[[0.3, 0.4], [0.5, 0.5], [0.8, 0.25]]])
    torch.testing.assert_close(sample_tokens(tokens, grid, pts), pts)
    # At cell centres bilinear reads equal the student's one-hot rows.
    some = torch.tensor([[0, 8, 34]])
    torch.testing.assert_close(sample_tokens(tokens, grid, cell_centres(some, grid)), gather_tokens(tokens, some))


def test_shift_rule_and_multicrop_geometry():
    # Gap closed (lo -> 100), overlap 0 <= 25 -> a further half of the shorter side (25) toward the ref.
    assert shift_towards(150, 200, 0, 100, 300) == (75, 125)
    assert shift_towards(0.0, 50.0, 100.0, 200.0, 300) == (75.0, 125.0)  # from the left: 50, then +25
    assert shift_towards(50, 130, 0, 100, 300) == (50, 130)  # overlap 50 > 80 / 2: unchanged
    assert shift_towards(70, 170, 0, 100, 300) == (20, 120)  # overlap 30 <= 50: a further 50 toward the ref
    mc = UDIMultiCrop(global_size=32, local_size=16, n_local=4)
    import random

    rng = random.Random(0)
    for _ in range(200):
        boxes = mc.sample_boxes(500, 375, rng)
        x, x2 = boxes[0], boxes[1]
        union = (min(x[0], x2[0]), min(x[1], x2[1]), max(x[2], x2[2]), max(x[3], x2[3]))
        for b, ref in [(x2, x)] + [(lb, union) for lb in boxes[2:]]:
            assert 0 <= b[0] < b[2] <= 500 and 0 <= b[1] < b[3] <= 375
            assert min(b[2], ref[2]) > max(b[0], ref[0]) and min(b[3], ref[3]) > max(b[1], ref[1])
    with pytest.raises(ValueError, match="n_global=2"):
        UDIMultiCrop(n_global=3)


# ---------------------------------------------------------------------- objective
def test_multimodal_target_is_the_hand_mix():
    g = torch.Generator().manual_seed(0)
    patch = torch.randn(3, 4, 5, generator=g)  # (B, S, K)
    valid = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    cls = torch.randn(3, 5, generator=g)
    psum, count = (patch * valid[..., None]).sum(1), valid.sum(1).float()
    for b in range(3):
        idx = valid[b].nonzero().flatten()
        hand = 0.5 * patch[b, idx].sum(0) / (len(idx) + 1e-5) + 0.5 * cls[b]
        torch.testing.assert_close(multimodal_target(psum, count, cls, 0.5)[b], hand)
    torch.testing.assert_close(multimodal_target(psum, count, cls, 0.0), cls)
    mean = patch[2].mean(0)
    torch.testing.assert_close(multimodal_target(psum, count, cls, 1.0)[2], mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(multimodal_target(psum, count, cls, 0.3)[1], 0.7 * cls[1])  # V empty


def _ce(t_logits, centre, tt, s_logits, ts):
    p = np.exp((t_logits - centre) / tt - ((t_logits - centre) / tt).max())
    p /= p.sum()
    logq = s_logits / ts - np.log(np.exp(s_logits / ts).sum())
    return -(p * logq).sum()


def test_loss_terms_match_hand_computation():
    g = torch.Generator().manual_seed(1)
    n_l, b, s, k, alpha, tt, ts = 1, 2, 3, 4, 0.5, 0.05, 0.1
    v = 2 + n_l
    s_cls, s_plus = torch.randn(v, b, k, generator=g), torch.randn(v, b, k, generator=g)
    s_patch, t_patch = torch.randn(2, b, s, k, generator=g), torch.randn(2, b, s, k, generator=g)
    t_cls = torch.randn(2, b, k, generator=g)
    valid = torch.tensor([[[1, 0, 1], [1, 1, 1]], [[0, 0, 1], [0, 0, 0]]], dtype=torch.bool)
    plus_sum_l, plus_count_l = torch.randn(n_l, 2, b, k, generator=g), torch.tensor([[[2.0, 0.0], [1.0, 3.0]]])
    loss = UDILoss(k, alpha, ts)
    loss.centre_cls.centre.fill_(0.3)  # a non-zero centre must be subtracted from cls targets only
    c0 = loss.centre_cls.centre.clone()[0].numpy()
    out = loss(s_cls, s_plus, s_patch, t_cls, t_patch, valid, plus_sum_l, plus_count_l, tt)

    S, T, P, TP = s_cls.numpy(), t_cls.numpy(), s_plus.numpy(), t_patch.numpy()
    cls_g = np.mean([_ce(T[1 - vv, i], c0, tt, S[vv, i], ts) for vv in (0, 1) for i in range(b)])
    cls_l = np.mean([_ce(T[gg, i], c0, tt, S[2, i], ts) for gg in (0, 1) for i in range(b)])
    zero = np.zeros(k)
    u_g, u_l = {}, {}
    for vv in (0, 1):
        for i in range(b):
            m = valid[vv, i].numpy()
            u_g[vv, i] = alpha * TP[vv, i][m].sum(0) / (m.sum() + 1e-5) + (1 - alpha) * T[1 - vv, i]
    for gg in (0, 1):
        for i in range(b):
            u_l[gg, i] = (alpha * plus_sum_l[0, gg, i].numpy() / (plus_count_l[0, gg, i].item() + 1e-5)
                          + (1 - alpha) * T[gg, i])
    plus_g = np.mean([_ce(u_g[vv, i], zero, tt, P[vv, i], ts) for vv in (0, 1) for i in range(b)])
    plus_l = np.mean([_ce(u_l[gg, i], zero, tt, P[2, i], ts) for gg in (0, 1) for i in range(b)])
    # patch: one mean over the valid samples of both directions (the reference pools them)
    patch = [_ce(TP[vv, i, j], zero, tt, s_patch[vv, i, j].numpy(), ts)
             for vv in (0, 1) for i in range(b) for j in range(s) if valid[vv, i, j]]
    hand = {"loss_cls": (2 * cls_g + 2 * n_l * cls_l) / (2 + 2 * n_l),
            "loss_cls_plus": (2 * plus_g + 2 * n_l * plus_l) / (2 + 2 * n_l), "loss_patch": np.mean(patch)}
    hand["loss"] = (hand["loss_cls"] + hand["loss_cls_plus"] + hand["loss_patch"]) / 3
    for name, value in hand.items():
        assert out[name].item() == pytest.approx(value, rel=1e-5), name

    # Centres: c <- 0.9 c + 0.1 * batch mean of raw teacher logits; invalid patch rows add nothing.
    np.testing.assert_allclose(loss.centre_cls.centre[0].numpy(), 0.9 * c0 + 0.1 * T.reshape(-1, k).mean(0), rtol=1e-5)
    all_u = np.stack(list(u_g.values()) + list(u_l.values()))
    np.testing.assert_allclose(loss.centre_plus.centre[0].numpy(), 0.1 * all_u.mean(0), rtol=1e-4, atol=1e-6)
    patch_rows = TP[valid.numpy()]
    patch_mean = (patch_rows.sum(0) + plus_sum_l.sum((0, 1, 2)).numpy()) / (len(patch_rows) + plus_count_l.sum().item())
    np.testing.assert_allclose(loss.centre_patch.centre[0].numpy(), 0.1 * patch_mean, rtol=1e-4, atol=1e-6)


def test_patch_loss_pools_both_directions_with_unequal_valid_counts():
    # 44 valid samples in direction 0, 40 in direction 1: the per-direction average would differ.
    g = torch.Generator().manual_seed(3)
    b, s, k, tt, ts = 4, 16, 8, 0.04, 0.1
    s_patch, t_patch = torch.randn(2, b, s, k, generator=g), torch.randn(2, b, s, k, generator=g)
    valid = torch.zeros(2, b, s, dtype=torch.bool)
    valid[0].view(-1)[torch.randperm(b * s, generator=g)[:44]] = True
    valid[1].view(-1)[torch.randperm(b * s, generator=g)[:40]] = True
    s_patch[1] += 2.0 * torch.randn(k, generator=g)  # directions with clearly different mean losses
    s_cls, s_plus, t_cls = (torch.randn(2, b, k, generator=g) for _ in range(3))
    loss = UDILoss(k, 0.5, ts)
    out = loss(s_cls, s_plus, s_patch, t_cls, t_patch, valid, torch.zeros(0, 2, b, k), torch.zeros(0, 2, b), tt)
    zero = np.zeros(k)
    per_sample = {vv: [_ce(t_patch[vv, i, j].numpy(), zero, tt, s_patch[vv, i, j].numpy(), ts)
                       for i in range(b) for j in range(s) if valid[vv, i, j]] for vv in (0, 1)}
    assert (len(per_sample[0]), len(per_sample[1])) == (44, 40)
    pooled = (sum(per_sample[0]) + sum(per_sample[1])) / 84
    per_direction = (np.mean(per_sample[0]) + np.mean(per_sample[1])) / 2
    assert abs(pooled - per_direction) > 1e-3  # the case tells the two poolings apart
    assert out["loss_patch"].item() == pytest.approx(pooled, rel=1e-5)


def test_crop_weighting_and_schedules():
    assert crop_weighted(torch.tensor(1.0), torch.tensor(4.0), 2, 10).item() == pytest.approx((2 + 80) / 22)
    assert crop_weighted(torch.tensor(1.0), None, 2, 0).item() == 1.0
    temps = [teacher_temperature_schedule(e, 30, 0.04, 0.07) for e in range(100)]
    np.testing.assert_allclose(temps[:30], np.linspace(0.04, 0.07, 30))
    assert temps[30:] == [0.07] * 70


# ---------------------------------------------------------------------- model
def test_udi_vit_two_class_tokens_and_srs_rows_are_independent():
    torch.manual_seed(0)
    vit = UDIViT(Backbone("vit_tiny", img_size=32, model_kwargs=dict(depth=1)))
    out = vit.forward_features(torch.randn(2, 3, 32, 32))
    assert out["cls"].shape == out["cls_plus"].shape == (2, 192) and out["patches"].shape == (2, 4, 192)
    assert not torch.allclose(out["cls"], out["cls_plus"])
    patches, grid = vit.forward_patches(torch.zeros(1, 3, 32, 32))
    with torch.no_grad():
        vit.cls_plus_token.add_(1.0)
    assert grid == (2, 2) and not torch.allclose(vit.forward_patches(torch.zeros(1, 3, 32, 32))[0], patches)
    # SRS: each sample's output depends on its own query only (plus every key and value).
    x = vit.srs.prepare(out["last"])
    q = gather_tokens(x, torch.tensor([[0, 3, 1], [2, 2, 0]]))
    full = vit.srs(x, q)
    torch.testing.assert_close(vit.srs(x, q[:, 1:2]), full[:, 1:2])
    assert torch.allclose(full[0, 0], vit.srs(x, gather_tokens(x, torch.tensor([[0], [0]])))[0, 0], atol=1e-6)
    assert vit.export_state_dict().keys() == vit.model.state_dict().keys()
    with pytest.raises(ValueError, match="class token"):
        UDIViT(Backbone("resnet50"))


def test_summed_bottleneck_gives_summed_logits():
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=6, norm_last_layer=False)
    x = torch.randn(5, 8)
    torch.testing.assert_close(head.last_layer(head.bottleneck(x).sum(0)), head(x).sum(0), atol=1e-5, rtol=1e-5)


def test_vit_s_wrapper_parameter_count():
    # Reference (ISL-CV/udi): ViT-S student wrapper (backbone, cls+, SRS) plus the one shared head at K=1024 ~ 28.0M.
    with torch.device("meta"):  # shapes only: no memory, no init time
        vit = UDIViT(Backbone("vit_small_p16"))
        head = DINOHead(vit.embed_dim, out_dim=1024, norm_last_layer=False)
    n = sum(p.numel() for p in vit.parameters()) + sum(p.numel() for p in head.parameters())
    assert 27.95e6 < n < 28.05e6
    assert vit.srs.num_heads == 6


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _tiny_udi()


def test_same_strata_in_both_directions_and_for_every_local(tiny):
    cells = torch.tensor([[0, 5, 15], [3, 6, 9]])  # (B, S_g) on a 4x4 grid
    local_cells = torch.tensor([[1], [2]])  # (B, S_l) on a 2x2 grid
    x = torch.tensor([0.0, 0.0, 0.6, 0.6])
    x2 = torch.tensor([0.2, 0.1, 0.8, 0.7])
    loc = torch.tensor([0.1, 0.1, 0.4, 0.4])
    boxes = torch.stack([x, x2, loc, loc]).expand(2, -1, -1)
    points, valid = tiny.teacher_points(cells, (4, 4), local_cells, (2, 2), boxes)
    assert points.shape == (4, 3 + 2, 2) and valid.shape == (2, 2, 5)
    # Teacher view g's first S_g points are the cells of student view 1 - g, in image coordinates.
    centres = cell_centres(cells, (4, 4))
    for g in (0, 1):
        src, tgt = boxes[0, 1 - g], boxes[0, g]
        image = tgt[:2] + points.reshape(2, 2, 5, 2)[g, :, :3] * (tgt[2:] - tgt[:2])
        torch.testing.assert_close(image, src[:2] + centres * (src[2:] - src[:2]))
    # Identical locals -> identical projected points; the same local cells in both teacher views.
    pts = points.reshape(2, 2, 5, 2)
    torch.testing.assert_close(pts[:, :, 3], pts[:, :, 4])
    loc_image = loc[:2] + cell_centres(local_cells, (2, 2)) * (loc[2:] - loc[:2])
    torch.testing.assert_close(x2[:2] + pts[1, :, 3:4] * (x2[2:] - x2[:2]), loc_image)
    # Cell 0 of image 0 in X sits at image (0.075, 0.075): left of X', so dropped there.
    assert not valid[1, 0, 0] and valid[0, 0, 0]
    assert torch.equal(valid, ((points > 0) & (points < 1)).all(-1).reshape(2, 2, 5))


def test_step_teacher_copy_grad_clip_and_last_layer_freeze(tiny):
    m = tiny
    assert torch.equal(m.teacher_backbone.cls_plus_token, m.student_backbone.cls_plus_token)
    names = {n for n, _ in m.teacher_backbone.named_parameters()}
    assert "cls_plus_token" in names and any(n.startswith("srs.") for n in names)
    b = 3
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0], [0.1, 0.1, 0.5, 0.5], [0.9, 0.0, 1.0, 0.1]])
    batch = {"crops": [torch.randn(b, 3, 64, 64), torch.randn(b, 3, 64, 64), torch.randn(b, 3, 32, 32),
                       torch.randn(b, 3, 32, 32)], "boxes": boxes.expand(b, -1, -1).clone()}
    out = m.compute_loss(batch)
    assert out["dense"].shape == (b, 16, 192) and torch.isfinite(out["loss"])
    # The globals overlap; the second local does not overlap X' at all, so some local samples drop.
    assert 0 < out["srs_valid_global"] <= 1 and out["srs_valid_local"] < 1
    assert m.criterion.centre_patch.centre.abs().sum() > 0
    (out["loss"] * 1e4).backward()
    m.on_before_optimizer_step(None)  # epoch 0: prototypes frozen, every tensor's norm clipped to 3
    assert all(p.grad is None for p in m.student_head.last_layer.parameters())
    norms = [p.grad.norm() for p in m.parameters() if p.grad is not None]
    assert max(norms) <= 3.0 + 1e-4 and any(n > 2.9 for n in norms)
    assert m.student_backbone.cls_plus_token.grad is not None


def test_flip_colour_and_srs_stream_resumes_from_a_checkpoint():
    m = _tiny_udi()
    torch.rand(3, generator=m.stream())
    checkpoint = {}
    m.on_save_checkpoint(checkpoint)
    resumed = _tiny_udi()
    resumed.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(5, generator=resumed.stream()), torch.rand(5, generator=m.stream()))


def test_colour_branches_per_image():
    m = _tiny_udi(color=dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
                  color_alt=dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0), color_alt_p=0.5)
    x = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    plain, solar = m.color(x), m.color_alt(x)
    out = m._colour(x, torch.Generator().manual_seed(0))
    is_plain = [torch.allclose(o, p) for o, p in zip(out, plain)]
    is_solar = [torch.allclose(o, s) for o, s in zip(out, solar)]
    assert all(a or c for a, c in zip(is_plain, is_solar)) and any(is_plain) and any(is_solar)
    assert isinstance(m.color, ColorAugment)


# ---------------------------------------------------------------------- CLI
def test_train_cli_two_steps(tmp_path):
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "+experiment=udi_quickstart",
           "backbone.weights=none", "trainer.max_steps=2", "trainer.max_epochs=1", "data.batch_size=2",
           "data.num_workers=0", "data.max_images=4", "data.synthetic.n_train=4", "data.synthetic.n_val=2",
           "eval_before_after=false", "logger=[csv]", f"hydra.run.dir={run}", "backbone.model_kwargs.depth=1",
           "method.head.out_dim=64", "method.head.hidden_dim=32", "method.head.bottleneck_dim=16",
           "method.crops.n_local=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(run / "logs" / "csv" / "metrics.csv")))
    losses = [float(r["train/loss_cls_plus"]) for r in rows if r.get("train/loss_cls_plus")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert (run / "backbone.pth").is_file()
    Backbone("vit_tiny", weights=str(run / "checkpoints" / "last.ckpt"), img_size=96,
             model_kwargs=dict(depth=1, patch_size=8))
