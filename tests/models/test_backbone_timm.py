"""Any timm ViT or CNN by name, the DINOv2 L/g and DINOv3 presets, normalisation from pretrained_cfg,
and weights=hub loading into the one model built (timm's download replaced by a state dict in memory:
no weights can be downloaded here)."""
import os
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

from densessl.constants import IMAGENET_MEAN, IMAGENET_STD
from densessl.models import ARCHS, Backbone, WeightsError

ROOT = Path(__file__).resolve().parents[2]
ONE_BLOCK = dict(depth=1)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


@pytest.mark.parametrize("name, patch, width, prefix", [
    ("vit_large_patch14_dinov2.lvd142m", 14, 1024, 1),
    ("vit_giant_patch14_reg4_dinov2.lvd142m", 14, 1536, 5),
    ("vit_small_patch16_dinov3.lvd1689m", 16, 384, 5),  # timm's eva family (RoPE)
    ("deit_tiny_distilled_patch16_224", 16, 192, 2),  # class + distillation token
])
def test_any_timm_vit_by_name_reads_patch_width_and_prefix_tokens(name, patch, width, prefix):
    b = Backbone(name, model_kwargs=ONE_BLOCK).eval()
    assert (b.is_vit, b.patch_size, b.embed_dim, b.num_prefix_tokens) == (True, patch, width, prefix)
    tokens, grid = b.forward_patches(torch.randn(2, 3, 2 * patch, 3 * patch))
    assert tokens.shape == (2, 6, width) and grid == (2, 3)


def test_any_timm_cnn_by_name():
    b = Backbone("convnext_tiny.dinov3_lvd1689m", model_kwargs=dict(depths=(1, 1, 1, 1))).eval()
    assert (b.is_vit, b.patch_size, b.embed_dim) == (False, 32, 768)
    tokens, grid = b.forward_patches(torch.randn(1, 3, 64, 96))
    assert tokens.shape == (1, 6, 768) and grid == (2, 3)


def test_unknown_name_and_unsupported_family_are_one_line_errors():
    with pytest.raises(ValueError, match=r"backbone.name=vit_larg_patch14_dinov2 is neither a densessl preset.*"
                                         r"did you mean \['vit_large_patch14_dinov2"):
        Backbone("vit_larg_patch14_dinov2")
    swin = Backbone("swin_tiny_patch4_window7_224", model_kwargs=dict(depths=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="neither ViT tokens nor a"):
        swin.forward_patches(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="backbone.model_kwargs"):
        Backbone("resnet18", model_kwargs=dict(no_such_option=1))


def test_normalisation_comes_from_the_pretrained_cfg():
    """The pipeline normalises with ImageNet statistics; a CLIP ViT sees its own."""
    b = Backbone("vit_base_patch16_clip_224.openai", model_kwargs=ONE_BLOCK).eval()
    assert b.renormalize and b.mean == tuple(b.model.pretrained_cfg["mean"]) != IMAGENET_MEAN
    raw = torch.rand(1, 3, 32, 32)
    ours = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    theirs = (raw - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(b.forward_patches(ours)[0], b.model.forward_features(theirs)[:, 1:])
    assert not Backbone("dinov2_vits14", model_kwargs=ONE_BLOCK).renormalize  # ImageNet statistics
    # Presets keep the pipeline's ImageNet statistics even where timm's default tag has others
    # (vit_tiny: random init, timm's augreg weights use 0.5 / 0.5).
    assert not Backbone("vit_tiny", model_kwargs=ONE_BLOCK).renormalize


@pytest.mark.parametrize("preset, timm_name", [
    ("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m"),
    ("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2.lvd142m"),
    ("dinov2_vitg14", "vit_giant_patch14_dinov2.lvd142m"),
    ("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2.lvd142m"),
    ("dinov3_vits16", "vit_small_patch16_dinov3.lvd1689m"), ("dinov3_vitb16", "vit_base_patch16_dinov3.lvd1689m"),
    ("dinov3_vitl16", "vit_large_patch16_dinov3.lvd1689m"),
])
def test_presets_are_configs_of_the_timm_models(preset, timm_name):
    assert ARCHS[preset].timm_name == timm_name and timm.is_model(timm_name)
    cfg = OmegaConf.load(ROOT / "configs" / "backbone" / f"{preset}.yaml")
    assert cfg.name == preset and cfg.defaults  # the rest from its smaller sibling
    assert timm_name in timm.list_models(pretrained=True)


@pytest.fixture
def hub(monkeypatch):
    """timm's downloads return ``served[0]``; counts the timm models built."""
    served, built = [], []

    def download(*args, **kwargs):
        return served[0]

    def create_model(*args, **kwargs):
        built.append(args[0])
        return real(*args, **kwargs)

    real = timm.create_model
    for source in ("load_state_dict_from_hf", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, source, download)
    monkeypatch.setattr(timm, "create_model", create_model)
    return served, built


@pytest.mark.parametrize("name, kwargs", [("vit_large_patch14_reg4_dinov2.lvd142m", ONE_BLOCK),
                                           ("dinov3_vits16", ONE_BLOCK),
                                           ("resnet18.a1_in1k", dict(layers=[1, 1, 1, 1]))])
def test_weights_hub_loads_into_the_one_model_built(hub, name, kwargs):
    served, built = hub
    donor = timm.create_model(ARCHS[name].timm_name if name in ARCHS else name, pretrained=False, **kwargs)
    served.append(donor.state_dict())
    built.clear()
    b = Backbone(name, weights="hub", model_kwargs=kwargs)
    assert len(built) == 1
    for key, value in b.model.state_dict().items():
        torch.testing.assert_close(value, donor.state_dict()[key], rtol=0, atol=0, msg=key)


def test_weights_hub_without_registers_and_errors(hub):
    served, _ = hub
    served.append(timm.create_model("vit_small_patch14_reg4_dinov2", depth=1).state_dict())
    xr = Backbone("dinov2_vits14_reg", weights="hub", drop_registers=True, model_kwargs=ONE_BLOCK)
    assert xr.num_prefix_tokens == 1 and xr.model.reg_token is None
    with pytest.raises(WeightsError, match="does not fit"):  # a depth-1 state into a depth-2 model
        Backbone("dinov2_vits14_reg", weights="hub", model_kwargs=dict(depth=2))
    with pytest.raises(WeightsError, match="has no pretrained weights in timm: use backbone.weights=none"):
        Backbone("vit_tiny", weights="hub")


def test_weights_hub_offline_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co\nretry later")

    for source in ("load_state_dict_from_hf", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, source, offline)
    with pytest.raises(WeightsError) as err:
        Backbone("dinov2_vitg14", weights="hub", model_kwargs=ONE_BLOCK)
    msg = str(err.value)
    assert "\n" not in msg and "cannot reach huggingface.co" in msg and "dinov2_vitg14_pretrain.pth" in msg
    assert "backbone.weights=/path/to/checkpoint.pth" in msg and "backbone.weights=none" in msg


def test_vit_giant_exports_the_official_swiglu_keys_and_reloads(tmp_path):
    g = Backbone("dinov2_vitg14", model_kwargs=ONE_BLOCK)
    official = g.export_state_dict(layout="dinov2")
    assert {"blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.weight"} <= set(official)
    assert not any(".mlp.fc" in k for k in official)
    torch.save(official, tmp_path / "g.pth")
    back = Backbone("dinov2_vitg14", weights=str(tmp_path / "g.pth"), model_kwargs=ONE_BLOCK)
    for key, value in back.model.state_dict().items():
        torch.testing.assert_close(value, g.model.state_dict()[key], rtol=0, atol=0, msg=key)


def test_train_cli_takes_a_timm_name(tmp_path):
    """experiments/train.py with backbone.name=<timm name> (DINOv3's eva family, one block) trains and exports."""
    from helpers.forked_runs import launch
    from cli.test_resume import RUN

    spec = {"args": [*RUN, f"hydra.run.dir={tmp_path / 'run'}", "backbone.name=vit_small_patch16_dinov3",
                     "trainer.max_epochs=1"], "env": {"DENSESSL_CACHE": str(tmp_path / "cache")},
            "cwd": str(ROOT), "log": str(tmp_path / "run.log")}
    [(code, out)] = launch([spec], tmp_path / "spec.json", {**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 0, out[-3000:]
    Backbone("vit_small_patch16_dinov3", weights=str(tmp_path / "run" / "backbone.pth"), img_size=32,
             model_kwargs=ONE_BLOCK)  # the export loads strictly


def test_trainer_fsdp_composes_and_its_export_gathers_the_eval_backbone(tmp_path, monkeypatch):
    """FSDP itself needs CUDA (Lightning); here: the config builds the strategy (every ViT block an FSDP
    unit and a checkpointed segment), and the export takes the eval backbone out of the gathered state."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    from densessl.training import export_eval_backbone

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        trainer_cfg = OmegaConf.to_container(compose("train", overrides=["trainer=fsdp"]).trainer, resolve=True)
    strategy = instantiate(trainer_cfg["strategy"])
    assert isinstance(strategy, FSDPStrategy) and trainer_cfg["precision"] == "bf16-mixed"
    assert Block in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy.kwargs["use_orig_params"] and strategy.sharding_strategy.name == "FULL_SHARD"

    class Method(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student_backbone = Backbone("dinov2_vits14", model_kwargs=ONE_BLOCK)
            self.teacher_backbone = Backbone("dinov2_vits14", model_kwargs=ONE_BLOCK)
            self.eval_backbone = self.teacher_backbone

    model = Method()
    monkeypatch.setattr(strategy, "lightning_module_state_dict", model.state_dict)  # the gathered full state
    export_eval_backbone(SimpleNamespace(strategy=strategy, is_global_zero=True), model, tmp_path / "b.pth", "dinov2")
    saved = torch.load(tmp_path / "b.pth", weights_only=True)
    expected = model.teacher_backbone.export_state_dict("dinov2")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_udi_renormalises_its_input_and_refuses_other_token_families():
    from densessl.models.udi_vit import UDIViT

    backbone = Backbone("vit_base_patch16_clip_224.openai", model_kwargs=ONE_BLOCK)
    clip, images = UDIViT(backbone).eval(), torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(clip.model_input(images), backbone.model_input(images))
    assert clip.forward_features(images)["patches"].shape == (1, 4, 768)
    with pytest.raises(ValueError, match="UDI needs a timm VisionTransformer.*is a Eva"):
        UDIViT(Backbone("dinov3_vits16", model_kwargs=ONE_BLOCK))
