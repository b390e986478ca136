"""DenseCL: correspondence, loss values, FIFO queues (incl. DDP), lambda warm-up, presets end to end."""
import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from densessl.losses.densecl import dense_correspondence, densecl_loss, info_nce
from densessl.methods import DenseCL
from densessl.methods.densecl import DenseCLNeck, TwoViews, collate_views, grouped_forward, shuffled_forward
from densessl.models import ema_update
from densessl.models.queue import FeatureQueue

ROOT = Path(__file__).resolve().parents[2]
TINY_RESNET = dict(name="resnet50", model_kwargs=dict(layers=[1, 1, 1, 1]))  # R50 stem/C5 width, 1 block a stage
TINY_VIT = dict(name="vit_tiny", model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=8))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def make_method(backbone=TINY_VIT, **kwargs) -> DenseCL:
    kwargs = {"neck": dict(hidden_dim=64, out_dim=16), "queue_size": 32, **kwargs}
    return DenseCL(backbone=backbone, optim=dict(name="sgd", lr=0.03), **kwargs)


# ---------------------------------------------------------------------- correspondence and loss
def test_correspondence_is_argmax_over_key_positions():
    f = torch.randn(2, 9, 5)
    assert torch.equal(dense_correspondence(f, f), torch.arange(9).expand(2, 9))
    # lightly's unit cases: not mutual, and the least negative wins
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert dense_correspondence(x, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])).tolist() == [[1, 0]]
    assert dense_correspondence(x, torch.tensor([[[0.0, -1.0], [-1.0, 0.0]]])).tolist() == [[1, 0]]
    # cosine, not dot product: a long key vector does not win by its norm
    assert dense_correspondence(torch.tensor([[[1.0, 0.1]]]), torch.tensor([[[10.0, 10.0], [1.0, 0.0]]])).tolist() == [[1]]


def test_densecl_loss_equals_hand_computed_infonce():
    tau, lam = 0.5, 0.25
    q_dense = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, N=2, d=2)
    k_dense = torch.tensor([[[0.8, 0.6], [0.6, 0.8]]])
    q_feats = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # correspondence [1, 0]
    k_feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    queue_dense = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    queue_global = torch.tensor([[0.6, 0.8]])
    out = densecl_loss(q, k, q_dense, k_dense, q_feats, k_feats, queue_global, queue_dense, tau, lam)
    # location 0 -> key 1: positive 0.6, negatives 1, -1; location 1 -> key 0: positive 0.6, negatives 0, 0
    l0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(2.0) + math.exp(-2.0)))
    l1 = -math.log(math.exp(1.2) / (math.exp(1.2) + 2.0))
    lg = -math.log(1.0 / (1.0 + math.exp(1.2)))
    assert out["loss_dense"].item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert out["loss_global"].item() == pytest.approx(lg, rel=1e-6)
    assert out["loss"].item() == pytest.approx((1 - lam) * lg + lam * (l0 + l1) / 2, rel=1e-6)


def test_info_nce_is_the_reference_cross_entropy_and_matches_analytic_values():
    g = torch.Generator().manual_seed(0)
    q, p = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    negs = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    logits = torch.cat([(q * p).sum(1, keepdim=True), q @ negs.T], 1) / 0.2
    ref = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))  # ContrastiveHead
    assert info_nce(q, p, negs, 0.2).item() == pytest.approx(ref.item(), rel=1e-5)
    # the fused backward is exact for every input
    args = [t.double().requires_grad_() for t in (q, p, negs)]
    assert torch.autograd.gradcheck(lambda a, b, c: info_nce(a, b, c, 0.2), args)
    # analytic: positive logit 1, negatives orthogonal -> log(1 + K e^{-1/tau}) = 6.093 for K=65536
    K = 65536
    ortho = info_nce(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]).expand(K, 2), 0.2)
    assert ortho.item() == pytest.approx(math.log(1 + K * math.exp(-5)), abs=1e-4)
    # random unit queue (d=128): log(1 + K e^{-1/tau} e^{1/(2 d tau^2)}) = 6.19
    q = F.normalize(torch.randn(32, 128, generator=g), dim=1)
    rand = info_nce(q, q, FeatureQueue(K, 128, seed=1).queue, 0.2)
    assert rand.item() == pytest.approx(math.log(1 + K * math.exp(-5 + 1 / (2 * 128 * 0.04))), abs=0.02)


def test_identical_views_give_identity_correspondence_and_unit_positives():
    torch.manual_seed(0)
    m = make_method(TINY_RESNET, bn_groups=1)  # whole-batch BN in train mode: same batch -> same statistics in both encoders
    x = torch.randn(2, 3, 96, 96)
    before = {"g": m.queue_global.queue.clone(), "d": m.queue_dense.queue.clone()}
    terms = m.compute_loss({"crops": [x, x]})
    q_feats, _ = m.student_backbone.forward_patches(x)
    k_feats, k, k_dense, k_pooled = m._encode_keys(x)
    assert torch.equal(dense_correspondence(q_feats, k_feats), torch.arange(9).expand(2, 9))
    q, q_dense, _ = m.student_neck(q_feats)
    assert torch.allclose((q_dense * k_dense).sum(-1), torch.ones(2, 9), atol=1e-5)
    # L = log(1 + sum_n e^{(r.n - 1)/tau}) with the queue as it was BEFORE this step's push
    expect_d = torch.log1p(torch.exp((q_dense.reshape(-1, 16) @ before["d"].T - 1) / 0.2).sum(1)).mean()
    expect_g = torch.log1p(torch.exp((q @ before["g"].T - 1) / 0.2).sum(1)).mean()
    assert terms["loss_dense"].item() == pytest.approx(expect_d.item(), rel=1e-4)
    assert terms["loss_global"].item() == pytest.approx(expect_g.item(), rel=1e-4)
    # after the loss: this step's k and pooled dense keys (not per-pixel) enter the queues
    assert int(m.queue_global.ptr) == 2 and int(m.queue_dense.ptr) == 2
    assert torch.allclose(m.queue_global.queue[:2], k, atol=1e-6)
    assert torch.allclose(m.queue_dense.queue[:2], k_pooled, atol=1e-6)
    assert torch.equal(m.queue_dense.queue[2:], before["d"][2:])


def test_neck_shapes_norms_and_pooled_dense_key():
    neck = DenseCLNeck(8, hidden_dim=16, out_dim=4)
    tokens = torch.randn(3, 5, 8)
    g, dense, pooled = neck(tokens)
    assert g.shape == (3, 4) and dense.shape == (3, 5, 4) and pooled.shape == (3, 4)
    for t in (g, dense, pooled):
        assert torch.allclose(t.norm(dim=-1), torch.ones(t.shape[:-1]), atol=1e-5)
    # the dense-queue entry pools the raw dense output, then normalises (reference avgpool2)
    assert torch.allclose(pooled, F.normalize(neck.dense(tokens).mean(1), dim=-1), atol=1e-6)
    assert torch.all(neck.mlp[0].bias == 0) and torch.all(neck.mlp[2].bias == 0)


# ---------------------------------------------------------------------- queue
def test_queue_fifo_wraps_around_for_a_batch_that_does_not_divide_it():
    q = FeatureQueue(8, 2, init="zeros")
    keys = torch.arange(10, dtype=torch.float).repeat_interleave(2).view(10, 2)  # key i = (i, i)
    q.push(keys[:3])
    assert int(q.ptr) == 3 and int(q.filled) == 3 and torch.equal(q.queue[:3], keys[:3])
    q.push(keys[3:6])
    q.push(keys[6:9])  # rows 6, 7, 0
    assert int(q.ptr) == 1 and int(q.filled) == 8
    assert torch.equal(q.queue.roll(-int(q.ptr), 0), keys[1:9])  # the newest 8 keys, arrival order
    big = FeatureQueue(4, 2, init="zeros")
    big.push(keys[:6])  # more keys than rows: the newest 4 stay
    assert int(big.ptr) == 2 and torch.equal(big.queue.roll(-2, 0), keys[2:6])


def test_queue_cycle_with_dividing_batch_and_random_unit_init():
    q = FeatureQueue(6, 3, seed=5)
    assert torch.allclose(q.queue.norm(dim=1), torch.ones(6)) and torch.equal(q.queue, FeatureQueue(6, 3, seed=5).queue)
    keys = torch.randn(9, 3)
    for i in range(3):
        q.push(keys[2 * i:2 * i + 2])
    assert int(q.ptr) == 0 and torch.equal(q.queue, keys[:6])  # K / B steps: exactly the last K keys
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        q.push(torch.randn(2, 4))


def test_queue_state_dict_round_trip():
    q = FeatureQueue(5, 2, seed=0)
    q.push(torch.ones(3, 2))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = FeatureQueue(5, 2, seed=1)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.queue, q.queue) and int(fresh.ptr) == 3 and int(fresh.filled) == 3
    m = make_method()
    assert {"queue_global.queue", "queue_global.ptr", "queue_dense.queue", "queue_dense.filled"} <= set(m.state_dict())


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    queue = FeatureQueue(8, 1, init="zeros")
    queue.push(torch.full((3, 1), float(rank)))
    x = torch.arange(4.0)[:, None] + 10 * rank
    seen = []

    def fn(batch):
        seen.append(batch)
        return batch * 2, batch - batch.mean(0)

    # a different generator on each rank: the broadcast must make the permutations agree
    doubled, _ = shuffled_forward(fn, x, torch.Generator().manual_seed(rank))
    torch.save(dict(queue=queue.queue, ptr=queue.ptr, x=x, doubled=doubled, seen=seen[0]), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_queue_and_shuffle_bn_under_ddp(tmp_path):
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    # every rank holds rank 0's keys then rank 1's
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == 6
    assert r0["queue"][:6, 0].tolist() == [0, 0, 0, 1, 1, 1]
    # outputs come back in each rank's own order; the key encoder saw a shuffled global batch
    for r in (r0, r1):
        assert torch.equal(r["doubled"], 2 * r["x"])
    assert sorted(torch.cat([r0["seen"], r1["seen"]]).flatten().tolist()) == [0, 1, 2, 3, 10, 11, 12, 13]
    assert not torch.equal(r0["seen"].sort(0).values, r0["x"])


def test_shuffle_bn_on_one_device_uses_virtual_ranks():
    x = torch.randn(8, 3)
    seen = []

    def fn(batch):  # BatchNorm's train-mode statistics: what each virtual rank normalises with
        seen.append(batch)
        return (batch - batch.mean(0),)

    (centred,) = shuffled_forward(fn, x, torch.Generator().manual_seed(0), groups=4)
    assert [len(b) for b in seen] == [2, 2, 2, 2]
    shuffled = torch.cat(seen)
    assert sorted(shuffled[:, 0].tolist()) == sorted(x[:, 0].tolist()) and not torch.equal(shuffled, x)
    # each row comes back in its own place, centred on the mean of the group it was shuffled into
    for group in seen:
        for row in group:
            i = int((x == row).all(1).nonzero())
            assert torch.allclose(centred[i], row - group.mean(0))
    (plain,) = grouped_forward(fn, x, 4)  # queries: consecutive slices, no shuffle
    assert torch.allclose(plain[:2], x[:2] - x[:2].mean(0)) and torch.allclose(plain[6:], x[6:] - x[6:].mean(0))
    (whole,) = shuffled_forward(fn, x, torch.Generator().manual_seed(0))  # groups=1: the whole batch
    assert torch.allclose(whole, x - x.mean(0))


def test_bn_groups_split_a_cnn_batch_and_are_checked():
    cnn = {"name": "resnet18_os8", "weights": "none"}
    m = make_method(backbone=cnn, bn_groups=2)
    assert m.bn_groups == 2 and make_method().bn_groups == 1  # a ViT has no BN: nothing to split
    calls = []
    for net in (m.student_backbone, m.teacher_backbone):
        net.model.conv1.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    x1, x2 = torch.randn(2, 4, 3, 32, 32)
    m.compute_loss({"crops": [x1, x2]})
    assert calls == [2, 2, 2, 2]  # two query slices, then two key slices
    with pytest.raises(ValueError, match="bn_groups=2 needs a batch of at least 4"):
        m.compute_loss({"crops": [x1[:3], x2[:3]]})
    with pytest.raises(ValueError, match="bn_groups=0"):
        make_method(backbone=cnn, bn_groups=0)


# ---------------------------------------------------------------------- schedule, warm-up, EMA
def test_lambda_warmup_gives_moco_v2_loss_then_the_mix():
    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 2, 3, 32, 32)
    warm = make_method(lambda_warmup_steps=3)
    assert [warm.lambda_at(s) for s in (0, 2, 3, 100)] == [0.0, 0.0, 0.5, 0.5]
    terms = warm.compute_loss({"crops": [x1, x2]})  # global_step 0 < 3
    assert terms["loss_lambda"] == 0.0 and terms["loss"].item() == pytest.approx(terms["loss_global"].item())
    terms["loss"].backward()
    assert warm.student_neck.dense[2].weight.grad.abs().max() == 0  # dense branch in the graph, zero grad
    plain = make_method()
    terms = plain.compute_loss({"crops": [x1, x2]})
    mix = 0.5 * terms["loss_global"] + 0.5 * terms["loss_dense"]
    assert terms["loss"].item() == pytest.approx(mix.item())
    with pytest.raises(ValueError, match="loss_lambda"):
        make_method(loss_lambda=1.5)
    with pytest.raises(ValueError, match="2 views"):
        plain.compute_loss({"crops": [x1, x2, x1]})


def test_constant_momentum_ema_of_backbone_and_neck():
    m = make_method()
    assert m.momentum_at(0) == m.momentum_at(10**6) == 0.999
    assert m.eval_backbone is m.student_backbone  # downstream uses the query encoder
    k0 = m.teacher_neck.dense[0].weight.clone()
    with torch.no_grad():
        for p in m.student_neck.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema_update(m.momentum_pairs(), m.momentum_at(0))
    q = m.student_neck.dense[0].weight
    assert torch.allclose(m.teacher_neck.dense[0].weight, q + 0.999**3 * (k0 - q), atol=1e-6)
    assert not any(p.requires_grad for p in m.teacher_neck.parameters())


def test_two_views_crop_and_flip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    views = TwoViews(size=16, scale=(1.0, 1.0), flip_p=1.0)(img)  # full image (square), always flipped
    expect = torch.from_numpy(np.asarray(img.resize((16, 16), Image.BILINEAR))[:, ::-1].copy()).permute(2, 0, 1)
    assert len(views["crops"]) == 2 and (views["crops"][0].int() - expect.int()).abs().max() <= 1
    batch = collate_views([views, views, views])
    assert [tuple(c.shape) for c in batch["crops"]] == [(3, 3, 16, 16)] * 2 and batch["crops"][0].dtype == torch.uint8


# ---------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset, shrink", [("densecl_quickstart", "backbone.model_kwargs.depth=1"),
                                            ("densecl_cnn_quickstart", "+backbone.model_kwargs.layers=[1,1,1,1]")])
def test_quickstart_preset_composes_and_steps(preset, shrink):
    from hydra import compose, initialize_config_dir

    from densessl.training import build_method

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={preset}", shrink])
    assert cfg.eval_before_after and cfg.data.name == "synthetic" and cfg.trainer.accelerator == "cpu"
    m = build_method(cfg)
    assert isinstance(m, DenseCL) and m.queue_global.size == cfg.method.queue_size
    batch = 2 * m.bn_groups  # the CNN's virtual ranks (BN groups) need 2 images each; the ViT has none
    x = torch.randint(0, 255, (2, batch, 3, cfg.method.crops.size, cfg.method.crops.size), dtype=torch.uint8)
    terms = m.compute_loss({"crops": [m.color(v) for v in x]})
    assert torch.isfinite(terms["loss"])


def test_r50_coco_experiment_trains_offline_and_checkpoints_queues(tmp_path):
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "+experiment=densecl_r50_coco",
           "backbone.weights=none", "data=synthetic", "trainer=cpu", f"hydra.run.dir={tmp_path / 'run'}",
           "data.synthetic.n_train=8", "data.synthetic.n_val=2", "data.synthetic.size=64", "data.num_workers=0",
           "data.batch_size=2", "trainer.max_epochs=1", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
           "logger=[csv]", "trainer.enable_progress_bar=false", "eval_before_after=false", "method.bn_groups=1",
           "+backbone.model_kwargs.layers=[1,1,1,1]", "method.crops.size=64", "method.neck.hidden_dim=64",
           "method.queue_size=16", "method.lambda_warmup_steps=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "lr: 0.3" in cfg and "name: sgd" in cfg and "momentum: 0.999" in cfg and "name: resnet50" in cfg
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "csv" / "metrics.csv")))
    lam = [float(r["train/loss_lambda"]) for r in rows if r.get("train/loss_lambda")]
    assert lam == [0.0, 0.5]  # warm-up: lambda 0 at step 0, then 0.5
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name, seed in (("queue_global", 0), ("queue_dense", 1)):
        init = FeatureQueue(16, 128, seed=seed).queue
        assert int(state[f"{name}.ptr"]) == 4 and int(state[f"{name}.filled"]) == 4
        assert not torch.allclose(state[f"{name}.queue"][:4], init[:4]) and torch.equal(state[f"{name}.queue"][4:], init[4:])
