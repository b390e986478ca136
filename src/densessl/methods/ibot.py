"""iBOT (Zhou et al., ICLR'22; bytedance/ibot) with the de-coupling strategy of "Mind Your
Augmentation" (ICLR'24; ztt1024/denseSSL); docs/objectives/ibot.md.

The student sees masked global views (a learnable mask token replaces the patch embeddings of masked
patches) and distils the EMA teacher's [CLS] distribution of the other view and its patch
distributions of the same clean view. With ``decoupling=True`` each global view also carries 2n
de-coupled rows whose context (or regions) comes from a partner image; their kept tokens are trained
to match the teacher's features in the true context (``transforms.decouple``).

Decisions on the reference's quirks:
(i)   local crops work with de-coupling: they are forwarded separately and their rows are the N
      regular images, so the [CLS] loss pairs them with the teacher's first N rows (the reference
      requires local_crops_number=0 because of its chunking and pos-embed code).
(ii)  fewer than 4 non-empty masks: de-coupling is skipped for the step (``dc`` logs 0).
(iii) the partner's embeddings are detached, as the reference.
(iv)  the mask shape is an explicit option (``masking.shape``); both presets use RCC masks, so the
      iBOT baseline and iBOT+DC differ only in ``decoupling`` (the reference's ×DC baseline is ambiguous).
(v)   de-coupling forwards N + 2n images per view, as the reference.
Heads: student and teacher share the [CLS]/patch prototypes or not together (``shared_head``); the
reference's mixed default (student separate, teacher shared) is not reproduced. The teacher
temperature is indexed by epoch as the reference. ``pred_start_epoch`` (0 in every preset) empties the
masks of earlier epochs and holds the patch temperature at its warm-up value until then, as the
reference (its loader returns all-False masks before that epoch). Colour augmentation (including blur) runs on the device with per-view settings
(``global_color``); blur comes after colour jitter there (the reference blurs on the CPU first).
"""
from __future__ import annotations

import random
from typing import Any

import torch
from timm.models import checkpoint_seq
from torch import Tensor, nn

from densessl.losses.ibot import IBOTLoss
from densessl.methods.base import SSLMethod
from densessl.models import Backbone, DINOHead, make_teacher
from densessl.models.heads import prototype_layer
from densessl.schedules import linear_warmup_constant
from densessl.transforms import ColorAugment, MultiCropWithBoxes, collate_multicrop
from densessl.transforms.decouple import build_decoupled_views, mix_partner_embeddings
from densessl.transforms.masks import MaskSampler


# denseSSL Pretrain.sh views: 2 x 224 bicubic global crops of scale (0.14, 1), no locals (parser: 96 px,
# scale (0.05, 0.4)); iBOT crops are independent, so only disjoint crops are redrawn (overlap > 0).
DEFAULT_CROPS: dict[str, Any] = dict(global_size=224, local_size=96, n_global=2, n_local=0, global_scale=(0.14, 1.0),
                                     local_scale=(0.05, 0.4), min_overlap=0.0, min_overlap_globals=0.0,
                                     interpolation="bicubic")
# kornia_transform.py aug1 (locals and, with the overrides of ``global_color``, both global views).
DEFAULT_COLOR: dict[str, Any] = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, jitter_p=0.8,
                                     grayscale_p=0.2, blur_p=0.5, solarize_p=0.0)


class IBOTHead(nn.Module):
    """iBOT head: one DINO MLP + L2-norm for all tokens; [CLS] through the prototypes, patches through
    the same prototypes (``shared_head``) or their own ``patch_out_dim`` ones."""

    def __init__(self, in_dim: int, out_dim: int = 8192, patch_out_dim: int | None = None, shared_head: bool = True,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3, batch_norm: bool = False,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        self.head = DINOHead(in_dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                             num_layers=num_layers, batch_norm=batch_norm, norm_last_layer=norm_last_layer)
        self.patch_last_layer = None if shared_head else prototype_layer(bottleneck_dim, patch_out_dim or out_dim,
                                                                          norm_last_layer)

    @property
    def last_layers(self) -> list[nn.Module]:
        return [self.head.last_layer] + ([self.patch_last_layer] if self.patch_last_layer is not None else [])

    def forward(self, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """cls (B, D), patches (B, N, D) -> cls logits (B, K), patch logits (B, N, K_p)."""
        z = self.head.bottleneck(torch.cat([cls[:, None], patches], 1))
        patch_layer = self.head.last_layer if self.patch_last_layer is None else self.patch_last_layer
        return self.head.last_layer(z[:, 0]), patch_layer(z[:, 1:])


class MaskToken(nn.Module):
    """The student's learnable mask embedding (1, D), zero-initialised (iBOT ``masked_embed``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, N, D) patch embeddings, mask (B, N) bool -> the token where masked."""
        return torch.where(mask[..., None], self.token.to(x.dtype), x)


def forward_masked(backbone: Backbone, images: Tensor, mask: Tensor | None = None,
                   mask_token: MaskToken | None = None, replaced: Tensor | None = None) -> dict[str, Tensor]:
    """Run the timm ViT stages of ``forward_features`` with patch-embedding surgery.

    images (B, 3, H, W); mask / replaced (B, N) bool over the patch grid. After the patch embedding
    and before the class token and position embeddings (iBOT ``prepare_tokens``): positions in
    ``replaced`` take the flipped batch's embedding (de-coupling), then masked positions take the mask
    token. Returns dict(cls (B, D), patches (B, N, D)) after the final norm.
    """
    model = backbone.model
    if not backbone.is_vit or getattr(model, "cls_token", None) is None:
        raise ValueError(f"iBOT needs a ViT with a class token; backbone '{backbone.name}' has none")
    if images.shape[-2] % backbone.patch_size or images.shape[-1] % backbone.patch_size:
        raise ValueError(f"crop size {tuple(images.shape[-2:])} is not a multiple of the patch size "
                         f"{backbone.patch_size}; set method.crops sizes to a multiple")
    x = model.patch_embed(images)  # (B, h, w, D) with dynamic_img_size (always on in Backbone), else (B, N, D)
    shape = x.shape
    x = x.reshape(shape[0], -1, shape[-1])
    if replaced is not None:
        x = mix_partner_embeddings(x, replaced)
    if mask is not None:
        if mask_token is None:
            raise ValueError("a mask needs a mask_token")
        x = mask_token(x, mask)
    x = model._pos_embed(x.reshape(shape))
    x = model.norm_pre(model.patch_drop(x))
    # timm's forward_features checkpoints the blocks the same way when grad_checkpointing is on
    x = checkpoint_seq(model.blocks, x) if model.grad_checkpointing and torch.is_grad_enabled() else model.blocks(x)
    x = model.norm(x)
    return {"cls": x[:, 0], "patches": x[:, backbone.num_prefix_tokens:]}


class IBOTViews:
    """CPU view sampler: multi-crop (globals first), horizontal flips, one mask per global crop.

    PIL image -> dict(crops=[uint8 (3, s, s)...], boxes=(n_crops, 4), masks=(n_global, h, w) bool).
    Boxes ignore the flips (iBOT aligns nothing; they are kept for the shared collate and logging).
    """

    def __init__(self, crops: MultiCropWithBoxes, masks: MaskSampler, grid: int, flip_p: float = 0.5) -> None:
        self.crops, self.masks, self.grid, self.flip_p = crops, masks, grid, flip_p

    def __call__(self, image: Any) -> dict[str, Any]:
        out = self.crops(image)
        out["crops"] = [c.flip(-1) if random.random() < self.flip_p else c for c in out["crops"]]
        out["masks"] = torch.stack([self.masks(self.grid, self.grid) for _ in range(self.crops.n_global)])
        return out


def collate_ibot(samples: list[dict]) -> dict[str, Any]:
    """collate_multicrop + masks -> list of (B, h, w) bool per global crop."""
    batch = collate_multicrop(samples)
    batch["masks"] = list(torch.stack([s["masks"] for s in samples]).unbind(1))
    return batch


class IBOT(SSLMethod):
    """iBOT (+ de-coupling) on a timm ViT backbone.

    Args (beyond :class:`SSLMethod`; defaults are denseSSL's Pretrain.sh, and ``crops`` / ``color``
    update :data:`DEFAULT_CROPS` / :data:`DEFAULT_COLOR`):
        head: IBOTHead kwargs (out_dim 8192, hidden 2048, bottleneck 256, norm_last_layer false,
            shared_head true, patch_out_dim only used when shared_head is false).
        student_temp, teacher_temp, warmup_teacher_temp, teacher_patch_temp, warmup_teacher_patch_temp,
        warmup_teacher_temp_epochs: temperatures; the teacher's rise linearly (endpoint included) over
            the warm-up epochs, then stay.
        centre_momentum / patch_centre_momentum: EMA of the [CLS] / patch centres.
        lambda1 / lambda2: weights of the [CLS] and masked-patch losses.
        masking: MaskSampler kwargs (shape block|rcc, ratio, ratio_var, aspect).
        decoupling: add the de-coupling rows and loss; dc_weight (0.3) and dc_sample_ratio (0.25).
        global_color: per global view, overrides of ``color`` (view 1 blur 1.0; view 2 blur 0.1 and
            solarise 0.2); local crops use ``color``.
        flip_p: horizontal flip probability of every crop.
        clip_grad: per-tensor gradient norm clip (0 disables), as iBOT's ``clip_gradients``.
        freeze_last_layer_epochs: epochs during which the prototype layers get no update.
        pred_start_epoch: first epoch with masked image modelling (masks are empty before it).
    """

    def __init__(self, backbone: dict[str, Any], optim: dict[str, Any], teacher: dict[str, Any] | None = None,
                 head: dict[str, Any] | None = None, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_patch_temp: float = 0.07,
                 warmup_teacher_patch_temp: float = 0.04, warmup_teacher_temp_epochs: int = 80,
                 centre_momentum: float = 0.9, patch_centre_momentum: float = 0.9, lambda1: float = 1.0,
                 lambda2: float = 1.0, masking: dict[str, Any] | None = None, decoupling: bool = False,
                 dc_weight: float = 0.3, dc_sample_ratio: float = 0.25,
                 global_color: list[dict[str, Any]] | None = None, flip_p: float = 0.5, clip_grad: float = 3.0,
                 freeze_last_layer_epochs: int = 1, pred_start_epoch: int = 0, **kwargs: Any) -> None:
        kwargs["crops"] = {**DEFAULT_CROPS, **(kwargs.get("crops") or {})}
        kwargs["color"] = {**DEFAULT_COLOR, **(kwargs.get("color") or {})}
        kwargs.setdefault("student_drop_path", 0.1)
        super().__init__(backbone, optim, teacher=teacher or {"momentum": 0.996}, **kwargs)
        if not self.student_backbone.is_vit:
            raise ValueError(f"iBOT needs a ViT backbone, got '{backbone['name']}'")
        n_global = self.crops_cfg.get("n_global", 2)
        if n_global != 2:
            raise ValueError(f"iBOT uses 2 global crops (method.crops.n_global=2), got {n_global}")
        head_cfg = {"out_dim": 8192, "shared_head": True, **(head or {})}
        dim = self.student_backbone.embed_dim
        self.student_head = IBOTHead(dim, **head_cfg)
        self.teacher_head = make_teacher(self.student_head, IBOTHead(dim, **head_cfg))
        self.mask_token = MaskToken(dim)  # student only: excluded from the EMA
        patch_dim = head_cfg["out_dim"]
        if not head_cfg["shared_head"]:
            patch_dim = head_cfg.get("patch_out_dim") or patch_dim
        self.loss_fn = IBOTLoss(head_cfg["out_dim"], patch_dim, student_temp, centre_momentum, patch_centre_momentum,
                                lambda1, lambda2, dc_weight)
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_patch_temp, teacher_patch_temp)
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.masking = MaskSampler(**(masking or {"shape": "rcc", "ratio": [0.0, 0.4], "ratio_var": [0.0, 0.2]}))
        self.decoupling, self.dc_sample_ratio = decoupling, dc_sample_ratio
        color = kwargs["color"]
        overrides = global_color if global_color is not None else [{"blur_p": 1.0}, {"blur_p": 0.1, "solarize_p": 0.2}]
        if len(overrides) != 2:
            raise ValueError(f"global_color needs one override dict per global view (2), got {len(overrides)}")
        self.global_color = nn.ModuleList([ColorAugment(**{**color, **o}) for o in overrides])
        self.flip_p, self.clip_grad, self.freeze_last_layer_epochs = flip_p, clip_grad, freeze_last_layer_epochs
        self.pred_start_epoch = pred_start_epoch

    # ------------------------------------------------------------------ networks and data
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return super().momentum_pairs() + [(self.student_head, self.teacher_head)]

    def param_groups(self) -> list[tuple[str, nn.Module, float]]:
        return super().param_groups() + [("head", self.student_head, self.optim_cfg.head_lr),
                                         ("mask_token", self.mask_token, self.optim_cfg.lr)]

    def train_transform(self) -> IBOTViews:
        size, patch = self.crops_cfg.get("global_size", 224), self.student_backbone.patch_size
        return IBOTViews(MultiCropWithBoxes(**self.crops_cfg), self.masking, size // patch, self.flip_p)

    collate_fn = staticmethod(collate_ibot)

    def teacher_temperatures(self, epoch: int) -> tuple[float, float]:
        """([CLS], patch) teacher temperatures: np.linspace(warm, final, W)[epoch], then final; the patch
        schedule starts at ``pred_start_epoch`` (warm value before it)."""
        warm, final, warm_p, final_p = self.temps
        steps = self.warmup_teacher_temp_epochs - 1
        patch_epoch = max(epoch - self.pred_start_epoch, 0)
        return (linear_warmup_constant(epoch, steps, warm, final),
                linear_warmup_constant(patch_epoch, steps, warm_p, final_p))

    def prepare_views(self, batch: dict[str, Any]) -> dict[str, Any]:
        """De-coupling rows (optional, before colour so duplicates get their own draws), then colour
        augmentation per crop group: global view 1, global view 2, locals."""
        crops, masks = batch["crops"], batch["masks"]
        if self.current_epoch < self.pred_start_epoch:
            masks = batch["masks"] = [torch.zeros_like(m) for m in masks]
        globals_ = crops[:2]
        if self.decoupling:
            views = build_decoupled_views(globals_, masks, self.dc_sample_ratio)
            globals_, batch["masks"], batch["replaced"] = views.crops, views.masks, views.replaced
        augs = list(self.global_color) + [self.color] * (len(crops) - 2)
        batch["crops"] = [aug(c) for aug, c in zip(augs, globals_ + crops[2:])]
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._trainer is not None and self.trainer.training and isinstance(batch, dict) and "masks" in batch:
            return self.prepare_views(batch)
        return batch

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        crops = batch["crops"]
        n_img, rows = batch["boxes"].shape[0], crops[0].shape[0]
        images = torch.cat(crops[:2])  # (2 B', 3, H, W): one batch, so the de-coupling flip spans both views
        masks = torch.cat(batch["masks"]).flatten(1)
        replaced = torch.cat(batch["replaced"]).flatten(1) if self.decoupling else None
        with torch.no_grad():
            t = self.teacher_backbone.forward_features(images)
            t_cls, t_patch = self.teacher_head(t["cls"], t["patches"])
        s = forward_masked(self.student_backbone, images, masks, self.mask_token, replaced)
        s_cls, s_patch = self.student_head(s["cls"], s["patches"])
        student_cls = list(s_cls.split(rows))
        if len(crops) > 2:  # local crops: [CLS] loss only, no masks
            local_cls = self.student_backbone.forward_features(torch.cat(crops[2:]))["cls"]
            student_cls += list(self.student_head.head(local_cls).split(n_img))
        temp, patch_temp = self.teacher_temperatures(self.current_epoch)
        terms = self.loss_fn(student_cls, list(s_patch.split(rows)), list(t_cls.split(rows)), list(t_patch.split(rows)),
                             list(masks.split(rows)), temp, patch_temp,
                             list(replaced.split(rows)) if replaced is not None else None)
        terms = {k: v if k == "loss" else v.detach() for k, v in terms.items()}
        terms["dense"] = s["patches"][:n_img]  # view 1, regular rows
        return terms

    # ------------------------------------------------------------------ optimisation details of iBOT
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # iBOT's cancel_gradients_last_layer: the prototypes stay fixed during the first epoch(s).
        if self.current_epoch < self.freeze_last_layer_epochs:
            for layer in self.student_head.last_layers:
                for p in layer.parameters():
                    p.grad = None

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # iBOT clips every tensor's gradient norm on its own (utils.clip_gradients), not the global norm.
        if self.clip_grad > 0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        torch.nn.utils.clip_grad_norm_(p, self.clip_grad)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
