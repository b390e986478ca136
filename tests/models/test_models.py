import math

import pytest
import timm
import torch

from densessl.models import Backbone, WeightsError, cosine_momentum, ema_update, make_teacher
from densessl.models.heads import DINOHead, ProjectionHead
from densessl.schedules import cosine_schedule, linear_warmup_constant

TINY = dict(name="vit_tiny", model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=8))


def test_forward_patches_any_size_the_patch_divides():
    b = Backbone(**TINY)
    tokens, grid = b.forward_patches(torch.randn(2, 3, 48, 64))
    assert grid == (6, 8) and tokens.shape == (2, 48, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        b.forward_patches(torch.randn(1, 3, 50, 64))


def test_resnet_patches_are_c5_map():
    b = Backbone("resnet50")
    tokens, grid = b.forward_patches(torch.randn(1, 3, 64, 96))
    assert grid == (2, 3) and tokens.shape == (1, 6, 2048) and b.patch_size == 32
    small = Backbone("resnet18_os8")  # dilated last stages: stride 8, the grid of a patch-8 ViT
    tokens, grid = small.forward_patches(torch.randn(1, 3, 64, 96))
    assert grid == (8, 12) and tokens.shape == (1, 96, 512) and small.patch_size == 8


def test_registers_are_separate_from_patches():
    b = Backbone("dinov2_vits14_reg", model_kwargs=dict(depth=1))
    out = b.forward_features(torch.randn(1, 3, 28, 42))
    assert out["patches"].shape == (1, 6, 384) and out["registers"].shape == (1, 4, 384)
    assert out["cls"].shape == (1, 384)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_timm_state_dict_and_wrapped_dino_checkpoint(tmp_path):
    src = Backbone(**TINY)
    torch.save(src.export_state_dict("timm"), tmp_path / "timm.pth")
    assert _same_weights(Backbone(**TINY, weights=str(tmp_path / "timm.pth")).model, src.model)
    # DINO/iBOT training checkpoints: {"teacher": {"module.backbone.<key>": ..., "module.head...": ...}}
    wrapped = {f"module.backbone.{k}": v for k, v in src.model.state_dict().items()}
    wrapped["module.head.mlp.0.weight"] = torch.zeros(2, 2)
    torch.save({"teacher": wrapped, "student": {}, "epoch": 3}, tmp_path / "dino.pth")
    assert _same_weights(Backbone(**TINY, weights=str(tmp_path / "dino.pth")).model, src.model)


def test_dinov2_export_round_trip_in_official_layout(tmp_path):
    kw = dict(name="dinov2_vits14_reg", model_kwargs=dict(depth=1))
    src = Backbone(**kw)
    official = src.export_state_dict("dinov2")
    # Official hub layout: register_tokens, a class slot in pos_embed, a mask_token.
    assert "register_tokens" in official and "mask_token" in official and "reg_token" not in official
    assert official["pos_embed"].shape[1] == 37 * 37 + 1
    torch.save(official, tmp_path / "official.pth")
    dst = Backbone(**kw, weights=str(tmp_path / "official.pth"))
    x = torch.randn(1, 3, 28, 28)
    src.eval(), dst.eval()
    torch.testing.assert_close(dst.forward_patches(x)[0], src.forward_patches(x)[0])


def test_register_weights_into_model_without_registers(tmp_path):
    src = Backbone("dinov2_vits14_reg", model_kwargs=dict(depth=1))
    torch.save(src.export_state_dict("dinov2"), tmp_path / "reg.pth")
    xr = Backbone("dinov2_vits14_reg", weights=str(tmp_path / "reg.pth"), drop_registers=True, model_kwargs=dict(depth=1))
    assert xr.num_prefix_tokens == 1 and "reg_token" not in xr.model.state_dict()
    torch.testing.assert_close(xr.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)


def test_wrong_checkpoint_and_missing_file_name_the_fix(tmp_path):
    torch.save(Backbone("resnet50").export_state_dict(), tmp_path / "r50.pth")
    with pytest.raises(WeightsError, match="does not fit backbone 'vit_tiny'"):
        Backbone(**TINY, weights=str(tmp_path / "r50.pth"))
    with pytest.raises(WeightsError, match="backbone.weights=none"):
        Backbone(**TINY, weights=str(tmp_path / "nope.pth"))


def test_offline_hub_names_both_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    for source in ("load_state_dict_from_hf", "load_state_dict_from_url"):  # timm's downloads
        monkeypatch.setattr(timm.models._builder, source, offline)
    with pytest.raises(WeightsError) as err:
        Backbone("dino_vits16", weights="hub", model_kwargs=dict(depth=1))
    msg = str(err.value)
    assert "backbone.weights=/path/to/checkpoint.pth" in msg and "backbone.weights=none" in msg
    assert "dino_deitsmall16_pretrain.pth" in msg  # where to download it


def test_momentum_and_cosine_schedules_endpoints():
    assert cosine_momentum(0, 100, 0.9995) == pytest.approx(0.9995)
    assert cosine_momentum(100, 100, 0.9995) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_schedule(0, 100, 0.04, 0.5) == pytest.approx(0.04)
    assert cosine_schedule(100, 100, 0.04, 0.5) == pytest.approx(0.5)
    assert cosine_schedule(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(5, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.0) == pytest.approx(0.5)
    assert cosine_schedule(25, 100, 2.0, 0.0) == pytest.approx(1 + math.cos(math.pi / 4))
    assert linear_warmup_constant(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup_constant(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup_constant(99, 30, 0.04, 0.07) == pytest.approx(0.07)


def test_ema_update_by_hand_and_frozen_teacher():
    student = torch.nn.Linear(2, 1)
    teacher = make_teacher(student, torch.nn.Linear(2, 1))
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(3.0)
    ema_update([(student, teacher)], 0.75)
    torch.testing.assert_close(teacher.weight, torch.full((1, 2), 0.75 * 3 + 0.25 * 1))


def test_heads_shapes_and_normalisation():
    head = ProjectionHead(32, hidden_dim=16, out_dim=8)
    y = head(torch.randn(2, 5, 32))
    assert y.shape == (2, 5, 8)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(2, 5))
    dino = DINOHead(32, out_dim=64, hidden_dim=16, bottleneck_dim=8)
    assert dino(torch.randn(3, 32)).shape == (3, 64)
    assert not dino.last_layer.parametrizations.weight.original0.requires_grad


def test_channels_last_resnet_gives_the_same_tokens():
    torch.manual_seed(0)
    a = Backbone("resnet50", model_kwargs=dict(layers=[1, 1, 1, 1])).eval()
    b = Backbone("resnet50", model_kwargs=dict(layers=[1, 1, 1, 1]), channels_last=True).eval()
    b.model.load_state_dict(a.model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(b.forward_patches(x)[0], a.forward_patches(x)[0], atol=1e-4, rtol=1e-4)
    assert b.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_switch_keeps_state_dict_keys():
    from densessl.methods import NeCo

    kw = dict(backbone=dict(TINY), optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), queue_size=0)
    eager, compiled = NeCo(**kw), NeCo(**kw, compile={"backend": "eager"})
    compiled.configure_model()
    assert set(compiled.state_dict()) == set(eager.state_dict())
    assert compiled.student_backbone.model._compiled_call_impl is not None
    x = torch.randn(2, 3, 32, 32)
    compiled.load_state_dict(eager.state_dict())
    torch.testing.assert_close(compiled.student_backbone.forward_patches(x)[0], eager.student_backbone.forward_patches(x)[0])


def test_cls_attention_equals_the_blocks_own_softmax():
    backbone = Backbone(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    out = backbone.forward_features(x, cls_attention=True)
    attn = backbone.model.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path materialises softmax(q k^T) for attn_drop
    seen = []
    hook = attn.attn_drop.register_forward_hook(lambda module, inputs, output: seen.append(output))
    backbone.forward_features(x)
    hook.remove()
    expected = seen[0][:, :, 0, backbone.num_prefix_tokens:]  # CLS row, patch columns
    assert out["cls_attention"].shape == (2, 2, 16)
    torch.testing.assert_close(out["cls_attention"], expected)
    with pytest.raises(ValueError, match="CLS token"):
        Backbone("resnet50").forward_features(torch.randn(1, 3, 64, 64), cls_attention=True)


@pytest.mark.parametrize("loss_mask", ["fg", "bg"])
def test_neco_fg_bg_variant_masks_queries_queue_and_loss(loss_mask):
    from densessl.methods import NeCo
    from densessl.transforms import MultiCropWithBoxes, collate_multicrop
    from PIL import Image

    torch.manual_seed(0)
    method = NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), roi_size=3,
                  queue_size=256, queue_push=64, loss_mask=loss_mask)
    crops = MultiCropWithBoxes(global_size=64, local_size=32, n_global=2, n_local=2)
    image = Image.fromarray((torch.rand(96, 96, 3) * 255).byte().numpy())
    batch = collate_multicrop([crops(image) for _ in range(2)])
    batch["crops"] = [method.color(c) for c in batch["crops"]]  # uint8 -> normalised float, as in training
    views = method.forward_views(batch)
    masks, query_mask = views["token_masks"], views["query_mask"]
    assert len(masks) == 2 and masks[0].shape == (2, 64) and query_mask.shape == (6, 2, 9)
    assert 0 < int(masks[0].sum()) < masks[0].numel()  # a real split of the 8x8 teacher grid
    terms = method.compute_loss(batch)
    assert torch.isfinite(terms["loss"])
    # only the masked teacher tokens were queued (unmasked: all 2 x 64 tokens of each global)
    assert int(method.queue_fill[0]) == int(masks[0].sum()) and int(method.queue_fill[1]) == int(masks[1].sum())
    # nothing masked (e.g. an all-background batch for "fg"): nothing queued, references from the pair's
    # own teacher tokens, and a zero loss (every query weight is 0)
    empty = NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), roi_size=3,
                 queue_size=256, queue_push=64, loss_mask=loss_mask)
    empty._token_masks = lambda teacher: [torch.zeros(2, 64, dtype=torch.bool)] * 2
    terms = empty.compute_loss(batch)
    assert int(empty.queue_fill.sum()) == 0 and terms["loss"].item() == 0.0
    with pytest.raises(ValueError, match="loss_mask"):
        NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), loss_mask="objects")


def test_grad_checkpointing_gives_the_same_tokens_and_gradients():
    from densessl.methods.ibot import forward_masked

    plain, ckpt = Backbone(**TINY, drop_path_rate=0.1), Backbone(**TINY, drop_path_rate=0.1, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.grad_checkpointing and not plain.model.grad_checkpointing
    x = torch.randn(2, 3, 32, 32)
    for run in (lambda b: b.forward_patches(x)[0], lambda b: forward_masked(b, x)["patches"]):
        grads, calls = [], []
        for backbone in (plain, ckpt):
            torch.manual_seed(0)  # same drop-path draws; checkpointing replays them in backward
            backbone.zero_grad()
            seen = []
            hook = backbone.model.blocks[0].register_forward_pre_hook(lambda *_: seen.append(1))
            out = run(backbone)
            out.square().sum().backward()
            hook.remove()
            grads.append((out.detach(), backbone.model.blocks[0].attn.qkv.weight.grad.clone()))
            calls.append(len(seen))
        assert calls == [1, 2]  # the checkpointed block ran again in backward
        torch.testing.assert_close(grads[0][0], grads[1][0])
        torch.testing.assert_close(grads[0][1], grads[1][1])


def test_optim_and_teacher_options_reject_unknown_keys():
    from densessl.methods import NeCo

    kw = dict(backbone=dict(TINY), head=dict(hidden_dim=16, out_dim=8), queue_size=0)
    method = NeCo(optim=dict(lr=1e-3, weight_decay=0.04), teacher=dict(momentum=0.99), **kw)
    assert (method.optim_cfg.head_lr, method.optim_cfg.final_weight_decay) == (1e-3, 0.04)  # defaults follow lr, wd
    assert (method.teacher_cfg.momentum, method.teacher_cfg.final_momentum) == (0.99, 1.0)
    with pytest.raises(ValueError, match=r"method.optim.lrr is not an option \(did you mean method.optim.lr\?\); "
                                         r"valid keys of method.optim: lr, name, head_lr"):
        NeCo(optim=dict(lr=1e-3, lrr=0.1), **kw)
    with pytest.raises(ValueError, match="method.optim.lr is required"):
        NeCo(optim=dict(head_lr=0.1), **kw)
    with pytest.raises(ValueError, match="method.teacher.final_momentun is not an option"):
        NeCo(optim=dict(lr=1e-3), teacher=dict(momentum=0.99, final_momentun=1.0), **kw)


def test_crop_sizes_are_checked_against_the_patch_size_at_start_up():
    from densessl.methods import NeCo

    with pytest.raises(ValueError, match="method.crops.local_size=30 is not a multiple of the patch size 8 of "
                                         "backbone 'vit_tiny': set method.crops.local_size=24 or 32"):
        NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), crops=dict(global_size=64, local_size=30))
    Backbone("resnet50").check_input_size(100, "any")  # CNNs take any size


def test_non_finite_loss_lists_the_terms_of_the_step(monkeypatch):
    import densessl.methods.neco as neco
    from densessl.methods import NonFiniteLossError
    from densessl.transforms import MultiCropWithBoxes, collate_multicrop
    from PIL import Image

    torch.manual_seed(0)
    method = neco.NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), roi_size=3,
                       queue_size=0, crops=dict(global_size=32, local_size=16, n_local=1))
    image = Image.fromarray((torch.rand(48, 48, 3) * 255).byte().numpy())
    batch = collate_multicrop([method.train_transform()(image) for _ in range(2)])
    batch["crops"] = [method.color(c) for c in batch["crops"]]
    monkeypatch.setattr(neco, "neco_loss", lambda *args, **kwargs: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"terms: \{'loss': nan, 'teacher_spread': [0-9.]+, 'student_tokens_nonfinite': 0.0\}"):
        method.training_step(batch, 0)
    # every scalar term of the objective reaches the message, plain numbers too (DenseCL's loss_lambda)
    terms = {"loss": torch.tensor(float("inf")), "local": torch.tensor(1.5), "loss_lambda": 0.5}
    monkeypatch.setattr(method, "compute_loss", lambda batch: dict(terms))
    with pytest.raises(NonFiniteLossError, match=r"terms: \{'loss': inf, 'local': 1.5, 'loss_lambda': 0.5\}"):
        method.training_step(batch, 0)


def test_corrupt_weights_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(WeightsError, match=f"cannot read backbone.weights={path} .*corrupt"):
        Backbone(**TINY, weights=str(path))
    with pytest.raises(WeightsError, match=f"cannot read weights={path}"):
        Backbone(**TINY, weights=str(path), weights_key="weights")
    torch.save([1, 2], path)
    with pytest.raises(WeightsError, match="holds a list, not a checkpoint dict"):
        Backbone(**TINY, weights=str(path))


def test_neco_teacher_spread_is_zero_exactly_when_ranks_are_uniform():
    import math

    from PIL import Image

    from densessl.losses.neco import neco_loss
    from densessl.methods import NeCo
    from densessl.transforms import MultiCropWithBoxes, collate_multicrop

    torch.manual_seed(0)
    refs = torch.nn.functional.normalize(torch.randn(2, 3, 16, 8), dim=-1)  # (P, B, R, d)
    teacher = torch.nn.functional.normalize(torch.randn(2, 3, 4, 8), dim=-1)  # (P, B, K, d)
    spread = NeCo.teacher_spread(teacher, refs)
    cos = teacher @ refs.transpose(-1, -2)
    assert spread.item() == pytest.approx(cos.std(-1).mean().item()) and spread > 0.1
    # collapsed: every reference is the same vector, so every query sees them all equally near
    same = refs[:, :, :1].expand_as(refs)
    assert NeCo.teacher_spread(teacher, same).item() == pytest.approx(0.0, abs=1e-6)
    # ... and the loss is then ln R, its value for uniform soft ranks, whatever the student does
    loss = neco_loss(teacher, teacher, same)
    assert loss.item() == pytest.approx(math.log(16), rel=1e-3)
    method = NeCo(backbone=dict(TINY), optim=dict(lr=1e-3), head=dict(hidden_dim=16, out_dim=8), roi_size=2, queue_size=0)
    image = Image.fromarray((torch.rand(96, 96, 3) * 255).byte().numpy())
    batch = collate_multicrop([MultiCropWithBoxes(global_size=64, local_size=32, n_global=2, n_local=0)(image)] * 2)
    batch["crops"] = [method.color(c) for c in batch["crops"]]
    assert method.compute_loss(batch)["teacher_spread"] > 0  # logged as train/teacher_spread
