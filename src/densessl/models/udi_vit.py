"""UDI's ViT: a second class token z_cls+ and the SRS attention layer (ISL-CV/udi
``vision_transformer.py`` / ``UDIWrapper``; docs/objectives/udi.md), on any timm ViT
:class:`~densessl.models.Backbone`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from densessl.models.backbone import Backbone


class SRSAttention(nn.Module):
    """Patch features at sampled positions: z = LN_post(W_o Attn(M X W_q, X W_k, X W_v) + M X).

    X (B, N, D) are the last block's patch tokens after this layer's own LN (:meth:`prepare`, not the
    backbone's final norm); M X (B, S, D) are the tokens read at the S sampled positions (one-hot rows
    for the student, bilinear rows for the teacher; ``transforms.sampling``). Queries come from M X,
    keys and values from all N tokens. The reference gives all-zero rows of M (dropped samples) a
    constant attention logit; here dropped samples are read somewhere in the grid and masked out of the
    loss instead, with the same result for every valid sample.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SRS attention: embed dim {dim} is not divisible by {num_heads} heads "
                             f"(method.srs_heads)")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm_post = nn.LayerNorm(dim, eps=1e-6)
        for m in (self.q, self.kv, self.proj):  # timm ViT init
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def prepare(self, tokens: Tensor) -> Tensor:
        """Last-block patch tokens (B, N, D) -> X (B, N, D), the layer's input."""
        return self.norm(tokens)

    def forward(self, x: Tensor, queries: Tensor) -> Tensor:
        """x (B, N, D) from :meth:`prepare`, queries M X (B, S, D) -> features (B, S, D)."""
        b, n, d = x.shape
        s, h = queries.shape[1], self.num_heads
        q = self.q(queries).reshape(b, s, h, d // h).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        return self.norm_post(self.proj(out) + queries)


class UDIViT(Backbone):
    """A :class:`Backbone` ViT run with two class tokens (z_cls at index 0, z_cls+ at 1) plus the SRS layer.

    It adopts an already built backbone (its timm model, so pretrained weights are loaded once) and
    keeps its key layout: ``model.*`` as in :class:`Backbone`, plus ``cls_plus_token`` and ``srs.*``.
    A densessl checkpoint therefore still loads into a plain ``Backbone`` (which then runs without
    z_cls+), and :meth:`export_state_dict` exports the timm ViT alone, as the reference's evaluation
    scripts build a one-class-token ViT. Evaluators calling :meth:`forward_patches` get the network
    as trained, with both class tokens in the sequence.

    The reference gives z_cls+ its own position-embedding slot; the sum of two free (1, 1, D) vectors
    is one free vector, so a single parameter holds token + position here.
    """

    def __init__(self, backbone: Backbone, srs_heads: int | None = None) -> None:
        model = backbone.model
        if not isinstance(model, VisionTransformer) or getattr(model, "cls_token", None) is None:
            raise ValueError(f"UDI needs a timm VisionTransformer with a class token; backbone '{backbone.name}' "
                             f"is a {type(model).__name__} (pick one, e.g. backbone=vit_small_p16 or dinov2_vits14)")
        if not isinstance(model.patch_drop, nn.Identity):
            raise ValueError("UDI does not support patch dropout (set model_kwargs.patch_drop_rate=0)")
        nn.Module.__init__(self)
        vars(self).update({k: v for k, v in vars(backbone).items() if not k.startswith("_") and k != "training"})
        self.model = model
        for name in ("in_scale", "in_shift"):  # the input re-normalisation (Backbone.model_input)
            self.register_buffer(name, getattr(backbone, name), persistent=False)
        self.cls_plus_token = nn.Parameter(torch.empty(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.cls_plus_token, std=0.02)
        self.srs = SRSAttention(self.embed_dim, srs_heads or int(model.blocks[-1].attn.num_heads))

    def forward_features(self, images: Tensor) -> dict[str, Tensor | tuple[int, int] | None]:
        """images (B, 3, H, W) -> dict(cls (B, D), cls_plus (B, D), registers (B, R, D) | None,
        patches (B, N, D) after the final norm, last (B, N, D) last-block patch tokens before it, grid)."""
        m = self.model
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = m._pos_embed(m.patch_embed(self.model_input(images)))  # (B, 1 + R + N, D), the class token first
        x = torch.cat([x[:, :1], self.cls_plus_token.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        x = m.blocks(m.norm_pre(x))
        out = m.norm(x)
        p = self.num_prefix_tokens + 1
        return {"cls": out[:, 0], "cls_plus": out[:, 1], "registers": out[:, 2:p] if p > 2 else None,
                "patches": out[:, p:], "last": x[:, p:], "grid": grid}
