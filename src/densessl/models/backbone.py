"""Backbones built with timm behind one patch-token API.

Every objective, evaluator and the DSE metric talks to a backbone only through
``forward_patches(images) -> (tokens (B, N, D), grid (h, w))``, so ViTs and CNNs are
interchangeable everywhere. A backbone is a preset of :data:`ARCHS` or any timm ViT (the
``vision_transformer``, ``deit`` and ``eva`` families: DINOv2, DINOv3, DeiT, EVA, ...) or CNN by its
timm name; patch size, width and prefix tokens are read from the model, and a timm name's input
normalisation from its ``pretrained_cfg`` (presets: ImageNet's, as the data pipeline).
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.models
import torch
from timm.layers import GluMlp
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from densessl.amp import autocast_off
from densessl.constants import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class Arch:
    timm_name: str  # timm architecture; `.tag` selects the pretrained weights for weights=hub
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "timm"  # "dinov2" enables export in the official torch.hub key layout
    hub: bool | None = None  # weights=hub is possible; None: when timm_name carries a `.tag`
    # Input statistics of the timm name's pretrained_cfg; False: ImageNet's, as the data pipeline (the
    # presets: their weights are ImageNet-normalised, or they are random-init models trained here).
    cfg_stats: bool = False


ARCHS: dict[str, Arch] = {
    # Small random-init ViTs for tests and the CPU quickstart (no pretrained weights exist).
    "vit_tiny": Arch("vit_tiny_patch16_224", dict(depth=4, patch_size=16)),
    "vit_small_p16": Arch("vit_small_patch16_224"),
    "dino_vits16": Arch("vit_small_patch16_224.dino"),
    "dino_vitb16": Arch("vit_base_patch16_224.dino"),
    "dinov2_vits14": Arch("vit_small_patch14_dinov2.lvd142m", family="dinov2"),
    "dinov2_vitb14": Arch("vit_base_patch14_dinov2.lvd142m", family="dinov2"),
    "dinov2_vits14_reg": Arch("vit_small_patch14_reg4_dinov2.lvd142m", family="dinov2"),
    "dinov2_vitb14_reg": Arch("vit_base_patch14_reg4_dinov2.lvd142m", family="dinov2"),
    "dinov2_vitl14": Arch("vit_large_patch14_dinov2.lvd142m", family="dinov2"),
    "dinov2_vitl14_reg": Arch("vit_large_patch14_reg4_dinov2.lvd142m", family="dinov2"),
    "dinov2_vitg14": Arch("vit_giant_patch14_dinov2.lvd142m", family="dinov2"),
    "dinov2_vitg14_reg": Arch("vit_giant_patch14_reg4_dinov2.lvd142m", family="dinov2"),
    # DINOv3 (timm's eva family: RoPE, 4 registers); weights under Meta's DINOv3 licence.
    "dinov3_vits16": Arch("vit_small_patch16_dinov3.lvd1689m"),
    "dinov3_vitb16": Arch("vit_base_patch16_dinov3.lvd1689m"),
    "dinov3_vitl16": Arch("vit_large_patch16_dinov3.lvd1689m"),
    "resnet50": Arch("resnet50.tv_in1k"),
    # Small random-init CNN for the CPU results table; output stride 8 (dilated last stages) keeps a
    # token grid as fine as a patch-8 ViT's.
    "resnet18_os8": Arch("resnet18", dict(output_stride=8)),
}

# timm families whose forward_features gives (B, prefix + N, D) tokens and that take dynamic_img_size.
TOKEN_FAMILIES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.eva")

# Prefixes that wrap backbone keys in the checkpoints people actually have: DDP (module.),
# DINO/iBOT/NeCo heads (backbone.), MoCo/DenseCL (encoder_q.), I-JEPA (encoder.).
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder_q.", "encoder.", "model.")


class WeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the architecture."""


class Backbone(nn.Module):
    """A timm ViT or CNN exposing dense patch tokens.

    Args:
        name: a key of :data:`ARCHS`, or a timm model name with or without its pretrained tag
            (``vit_large_patch14_dinov2.lvd142m``, ``convnext_tiny.dinov3_lvd1689m``, ``resnet50``).
        weights: ``"none"`` (random init), ``"hub"`` (timm pretrained weights from the hub, loaded
            into this model) or a path to a checkpoint file (official DINO/DINOv2, timm, MoCo/DenseCL,
            a densessl Lightning checkpoint or an exported state dict).
        img_size: nominal input size of ViTs (positional embeddings are interpolated for other
            sizes; any size the patch size divides works).
        drop_path_rate: stochastic depth of ViT blocks (linear over depth, as timm).
        drop_registers: load register weights into a model without registers (NeCo's "R-XR").
        checkpoint_key: in a densessl Lightning checkpoint, which network to load ("teacher" or
            "student").
        model_kwargs: extra timm ``create_model`` arguments (e.g. depth for ``vit_tiny``).
        channels_last: NHWC memory format for CNNs (faster convolutions on GPUs with tensor cores).
        grad_checkpointing: timm's activation checkpointing of the blocks/stages: activations are
            recomputed in backward instead of stored (training memory for larger batches or crops).
        weights_key: the config key that set ``weights``, named in errors (the evaluation CLIs' ``weights``).
    """

    def __init__(
        self,
        name: str,
        weights: str = "none",
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        drop_registers: bool = False,
        checkpoint_key: str = "teacher",
        model_kwargs: dict[str, Any] | None = None,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        weights_key: str = "backbone.weights",
    ) -> None:
        super().__init__()
        self.weights_key = weights_key
        self.name, self.arch = name, ARCHS.get(name) or timm_arch(name)
        kwargs = {**self.arch.kwargs, **(model_kwargs or {})}
        self.is_vit = timm_family(self.arch.timm_name) in TOKEN_FAMILIES
        if self.is_vit:
            kwargs.update(dynamic_img_size=True, drop_path_rate=drop_path_rate)
            if img_size is not None:
                kwargs["img_size"] = img_size
            if drop_registers:
                if timm_family(self.arch.timm_name) != "timm.models.vision_transformer":
                    raise ValueError(f"backbone.drop_registers=true needs a timm vision_transformer; '{name}' is "
                                     f"{timm_family(self.arch.timm_name)}: set backbone.drop_registers=false")
                kwargs["reg_tokens"] = 0
                kwargs["no_embed_class"] = False
        try:
            self.model = timm.create_model(self.arch.timm_name, pretrained=False, num_classes=0, **kwargs)
        except (RuntimeError, TypeError) as err:  # a wrong pretrained tag, an option the model lacks
            raise ValueError(f"backbone.name={name}: timm cannot build '{self.arch.timm_name}' with "
                             f"backbone.model_kwargs={model_kwargs or {}} ({err})") from err
        if self.is_vit:
            self.patch_size = int(self.model.patch_embed.patch_size[0])
            self.embed_dim = int(self.model.embed_dim)
            self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        else:
            self.patch_size = int(self.model.feature_info[-1]["reduction"])  # C5 stride (32, or output_stride)
            self.embed_dim = int(self.model.num_features)
            self.num_prefix_tokens = 0
        # The data pipeline normalises with ImageNet statistics; a model trained with others gets the
        # images re-mapped to its own (per channel: x * in_scale + in_shift), an identity for most.
        cfg = (self.model.pretrained_cfg or {}) if self.arch.cfg_stats else {}
        self.mean, self.std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        # Python floats: the model may be built on the meta device (shapes only).
        scale = [s_in / s for s_in, s in zip(IMAGENET_STD, self.std)]
        shift = [(m_in - m) / s for m_in, m, s in zip(IMAGENET_MEAN, self.mean, self.std)]
        self.renormalize = any(abs(a - 1) > 1e-6 for a in scale) or any(abs(b) > 1e-6 for b in shift)
        self.register_buffer("in_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)
        self.load_weights(weights, drop_registers=drop_registers, checkpoint_key=checkpoint_key)
        self.channels_last = channels_last and not self.is_vit
        self.model.set_grad_checkpointing(grad_checkpointing)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ forward
    def forward_features(self, images: Tensor, cls_attention: bool = False) -> dict[str, Tensor | tuple[int, int] | None]:
        """images (B, 3, H, W) -> dict(patches (B, N, D), cls (B, D) | None,
        registers (B, R, D) | None, grid (h, w)); with ``cls_attention`` (ViTs with a CLS token)
        also cls_attention (B, heads, N): the last block's attention of the CLS query over the patch
        tokens (softmax over all tokens, registers' columns left out), as DINO's attention maps."""
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        has_cls = getattr(self.model, "cls_token", None) is not None
        if cls_attention and not (isinstance(self.model, VisionTransformer) and has_cls):
            raise ValueError(f"cls_attention (NeCo's method.loss_mask=fg) needs a timm VisionTransformer with a CLS "
                             f"token; backbone '{self.name}' is a {type(self.model).__name__}")
        images = self.model_input(images)
        if not self.is_vit:
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            fmap = self.model.forward_features(images)  # (B, D, h, w)
            if fmap.ndim != 4 or fmap.shape[1] != self.embed_dim:
                raise ValueError(f"backbone '{self.name}' ({type(self.model).__name__}) gives features of shape "
                                 f"{tuple(fmap.shape)}, neither ViT tokens nor a (B, {self.embed_dim}, h, w) map: "
                                 f"use a timm ViT ({', '.join(f.rsplit('.', 1)[1] for f in TOKEN_FAMILIES)}) or CNN")
            return {"patches": fmap.flatten(2).transpose(1, 2), "cls": None, "registers": None,
                    "grid": tuple(fmap.shape[-2:])}
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(f"input size {tuple(images.shape[-2:])} is not a multiple of the patch size "
                             f"{self.patch_size}; resize or crop to a multiple (e.g. {h * self.patch_size})")
        p = self.num_prefix_tokens
        inputs: list[Tensor] = []
        hook = (self.model.blocks[-1].attn.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
                if cls_attention else None)
        try:
            x = self.model.forward_features(images)  # (B, prefix + N, D), after the final norm
        finally:
            if hook is not None:
                hook.remove()
        out = {"patches": x[:, p:], "cls": x[:, 0] if has_cls else None,
               "registers": x[:, int(has_cls):p] if p > int(has_cls) else None, "grid": (h, w)}
        if cls_attention:
            out["cls_attention"] = _cls_attention(self.model.blocks[-1].attn, inputs[0])[..., p:]
        return out

    def model_input(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised with ImageNet statistics (the data pipeline's) -> normalised
        with the model's own (``pretrained_cfg``); unchanged for models trained with ImageNet's. Code
        that runs the timm model's stages itself (iBOT, UDI) calls it first."""
        if not self.renormalize:
            return images
        return images * self.in_scale.to(images.dtype) + self.in_shift.to(images.dtype)

    def check_input_size(self, size: int, key: str) -> None:
        """A ViT input side ``size`` (the config ``key``) that the patch size does not divide is a
        ValueError at start-up naming the key, not a shape error at the first step."""
        p = self.patch_size
        if self.is_vit and size % p:
            fits = " or ".join(str(s) for s in (size // p * p, size // p * p + p) if s > 0)
            raise ValueError(f"{key}={size} is not a multiple of the patch size {p} of backbone '{self.name}': "
                             f"set {key}={fits}")

    def forward_patches(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """images (B, 3, H, W) -> tokens (B, N, D) after the final norm, grid (h, w), N = h*w."""
        out = self.forward_features(images)
        return out["patches"], out["grid"]

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_patches(images)[0]

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: str, drop_registers: bool = False, checkpoint_key: str = "teacher") -> None:
        if weights in (None, "none"):
            return
        if weights == "hub":
            self._load_hub(drop_registers)
            return
        path = Path(os.path.expanduser(str(weights)))
        if not path.is_file():
            raise WeightsError(
                f"{self.weights_key}={weights!r} is neither 'none', 'hub' nor an existing checkpoint file. "
                f"Point it at a .pth/.ckpt file, or use {self.weights_key}=none for a random init.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated zip, random bytes, pickle of something else: many types
            raise WeightsError(
                f"cannot read {self.weights_key}={path} ({type(err).__name__}: {err}). The file is corrupt or not "
                f"a PyTorch checkpoint (e.g. an interrupted download): download it again, or point "
                f"{self.weights_key} at another .pth/.ckpt file.") from err
        if not isinstance(state, dict):
            raise WeightsError(f"{self.weights_key}={path} holds a {type(state).__name__}, not a checkpoint dict "
                               f"(state dict); point {self.weights_key} at a .pth/.ckpt checkpoint file.")
        state = extract_backbone_state(state, checkpoint_key)
        if drop_registers:
            state = _drop_register_tokens(state)
        self._load_state(state, source=str(path))

    def _load_hub(self, drop_registers: bool) -> None:
        """timm's pretrained weights of this architecture, downloaded (or taken from the cache) and
        loaded into ``self.model`` by timm's loader; no second model is built."""
        cfg = self.model.pretrained_cfg or {}
        allowed = self.arch.hub if self.arch.hub is not None else "." in self.arch.timm_name
        if not allowed or not any(cfg.get(k) for k in ("url", "hf_hub_id", "file", "state_dict")):
            raise WeightsError(f"backbone '{self.name}' has no pretrained weights in timm: use "
                               f"{self.weights_key}=none, or a timm name with a pretrained tag "
                               f"(timm.list_models(pretrained=True))")
        source = f"hub:{self.arch.timm_name}"

        def fit(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
            return self._fitted_state(_drop_register_tokens(state) if drop_registers else state, source)

        try:
            timm.models.load_pretrained(self.model, num_classes=0, filter_fn=fit, strict=True)
        except WeightsError:
            raise
        except Exception as err:  # network errors come in many types (OSError, HTTP, hub-specific)
            url = cfg.get("url") or f"https://huggingface.co/{cfg.get('hf_hub_id') or self.arch.timm_name}"
            reason = str(err).splitlines()[0] if str(err) else ""
            raise WeightsError(
                f"could not download pretrained weights for '{self.name}' (timm '{self.arch.timm_name}'; "
                f"{type(err).__name__}: {reason}); this machine may be offline: download the checkpoint elsewhere "
                f"(e.g. {url}) and set {self.weights_key}=/path/to/checkpoint.pth, or train from scratch with "
                f"{self.weights_key}=none") from err

    def _load_state(self, state: dict[str, Tensor], source: str) -> None:
        self.model.load_state_dict(self._fitted_state(state, source), strict=True)

    def _fitted_state(self, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
        """``state`` in this model's key layout (the timm family's own checkpoint filter: DINOv2/DINOv3
        official keys, pos-embed resampling), checked to fit it exactly (else a WeightsError)."""
        family_filter = getattr(inspect.getmodule(type(self.model)), "checkpoint_filter_fn", None)
        if family_filter is not None:
            state = family_filter(state, self.model)
        own = self.model.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "mask_token"))}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or mismatched:
            raise WeightsError(
                f"checkpoint {source} does not fit backbone '{self.name}': missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}, shape mismatch {mismatched[:5]}. "
                f"Check backbone.name matches the checkpoint's architecture.")
        return state

    # ------------------------------------------------------------------ export
    def export_state_dict(self, layout: str = "timm", state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """A plain state dict: ``layout="timm"`` loads strictly into the matching timm model,
        ``layout="dinov2"`` into the official torch.hub DINOv2 model (``facebookresearch/dinov2``).
        ``state``: this model's timm state dict gathered elsewhere (a sharded run), else its own."""
        state = {k: v.detach().clone().cpu() for k, v in (state or self.model.state_dict()).items()}
        if layout == "timm":
            return state
        if layout != "dinov2" or self.arch.family != "dinov2":
            raise ValueError(f"layout '{layout}' is not available for backbone '{self.name}' (use 'timm')")
        # S/B/L DINOv2 blocks share timm's key names; ViT-g's SwiGLU is w12/w3 officially, fc1/fc2 in timm.
        swiglu = isinstance(self.model.blocks[0].mlp, GluMlp)
        out = {re.sub(r"\.mlp\.fc([12])\.", lambda m: ".mlp.w12." if m[1] == "1" else ".mlp.w3.", k)
               if swiglu else k: v for k, v in state.items()}
        if "reg_token" in out:
            # timm folds the class position into cls_token for register models (no_embed_class);
            # the official layout keeps a class slot in pos_embed: give it zero so cls + pos[0] is unchanged.
            out["register_tokens"] = out.pop("reg_token")
            pos = out["pos_embed"]
            out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        out["mask_token"] = torch.zeros(1, self.embed_dim)
        return out


def _cls_attention(attn: nn.Module, x: Tensor) -> Tensor:
    """Attention of token 0 (CLS) over all tokens in a timm ``Attention`` given its input x (B, T, D)
    -> (B, heads, T). Recomputed from the block's own projections because timm's fused attention
    never materialises the attention matrix. In the weights' dtype (float32 under mixed precision)
    with autocast off: NeCo's foreground mask thresholds the cumulative attention mass, and bfloat16
    logits move tokens of a flat map across that threshold (tiny random-init ViT: 12 % of mask tokens
    flipped under bf16 autocast, none in float32)."""
    with autocast_off(x.device):
        return _cls_attention_rows(attn, x.to(attn.qkv.weight.dtype))


def _cls_attention_rows(attn: nn.Module, x: Tensor) -> Tensor:
    b, t, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]


def extract_backbone_state(state: dict[str, Any], checkpoint_key: str = "teacher") -> dict[str, Tensor]:
    """Find the backbone weights in the checkpoint formats in common use."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):  # Lightning (densessl or other)
        sd = state["state_dict"]
        prefix = f"{checkpoint_key}_backbone.model."
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        state = sd
    for key in (checkpoint_key, "model", "state_dict"):  # DINO/iBOT full checkpoints, timm/DeiT
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    changed = True
    while changed:  # strip nested wrappers such as module.backbone.
        changed = False
        for p in _WRAPPER_PREFIXES:
            if state and all(k.startswith(p) or not k.startswith(_WRAPPER_PREFIXES) for k in state) \
                    and any(k.startswith(p) for k in state):
                state = {k[len(p):] if k.startswith(p) else k: v for k, v in state.items()}
                changed = True
    if any(k.startswith("encoder_k.") or k.startswith("queue") for k in state):  # MoCo/DenseCL extras
        state = {k: v for k, v in state.items() if not k.startswith(("encoder_k.", "queue"))}
    return state


def _drop_register_tokens(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Register weights -> a model without registers (NeCo "R-XR": a non-strict load that drops them)."""
    state = dict(state)
    if "register_tokens" in state:  # official layout: pos_embed already has the class slot
        state.pop("register_tokens")
    elif "reg_token" in state:  # timm layout: class position folded into cls_token
        state.pop("reg_token")
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return state


def timm_family(timm_name: str) -> str:
    """The timm module that defines the architecture (``timm.models.vision_transformer``, ...)."""
    return timm.models.model_entrypoint(timm.models.get_arch_name(timm_name)).__module__


def timm_arch(name: str) -> Arch:
    """``backbone.name`` given as a timm model name: its Arch (DINOv2 names export the official layout)."""
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, [*ARCHS, *timm.list_models(pretrained=True)], n=3, cutoff=0.6)
        raise ValueError(f"backbone.name={name} is neither a densessl preset ({', '.join(sorted(ARCHS))}) nor a timm "
                         f"model{f' (did you mean {near}?)' if near else ''}: list timm's with "
                         f"python -c \"import timm; print(timm.list_models('*dinov2*', pretrained=True))\"")
    return Arch(name, family="dinov2" if "dinov2" in timm.models.get_arch_name(name) else "timm", hub=True,
                cfg_stats=True)


def build_backbone(name: str, weights: str = "none", **kwargs: Any) -> Backbone:
    return Backbone(name=name, weights=weights, **kwargs)
