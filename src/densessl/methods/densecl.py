"""DenseCL: dense contrastive learning (Wang et al., CVPR 2021; WXinlong/DenseCL, mmpretrain densecl).

MoCo v2 with a second, dense branch: a query encoder (backbone + DenseCL neck) and its momentum
copy, the key encoder; two FIFO queues of 65536 x 128 negatives (global keys, pooled dense keys);
dense positives found by argmax cosine similarity of the two views' backbone features
(docs/objectives/densecl.md). Decisions on the reference's quirks:

(i) BatchNorm. Both encoders run BN in train mode, as the reference. Under DDP the key batch is
    shuffled across ranks before the key forward and unshuffled after (MoCo's shuffle BN, so a
    query and its positive key never share BN statistics). On one device the batch is split into
    ``bn_groups`` virtual ranks instead (as MoCo's single-GPU CIFAR demo, SplitBatchNorm): queries
    in order, keys after a random permutation, each group with its own BN statistics. Without it the
    key batch's statistics are the query batch's, a signature by which the positive key can be told
    from the queue's keys without learning anything (the reference cannot run without DDP at all,
    issue #32). Keep ``trainer.sync_batchnorm=false``: SyncBN makes the key statistics global again
    and voids the shuffle.
(ii) The EMA runs after each optimiser step (base class) instead of before the next key forward:
    the same sequence of key weights (the reference's first update, with equal weights, is a no-op).
    Momentum is a constant 0.999 on parameters only (BN buffers are the key encoder's own).
(iii) Non-dividing batches: the queues wrap around (``models.queue.FeatureQueue``) where the
    reference asserts queue_len % batch == 0.
(iv) Weight decay skips biases and 1-D parameters (project-wide optimiser); the reference's SGD
    decays every parameter.
(v) ViTs: patch tokens after the final norm play the C5 map's role (global branch on their mean).
The exported / evaluated network is the query backbone (``eval_on=student``), as the reference's.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms as T
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from densessl.distributed import gather_rows, is_distributed
from densessl.losses.densecl import densecl_loss
from densessl.methods.base import SSLMethod
from densessl.models import make_teacher
from densessl.models.queue import FeatureQueue


class DenseCLNeck(nn.Module):
    """DenseCL's two projection branches (no BN), on backbone tokens (B, N, D).

    Returns L2-normalised global (B, d) = MLP(mean of tokens), dense (B, N, d) = per-token MLP (the
    reference's 1x1 convs) and pooled (B, d) = mean of the raw dense output (the dense-queue entry).
    Init as the reference (``init_weights(init_linear="kaiming")``): kaiming-normal (fan_in, relu),
    zero bias on the global Linear layers only; its 1x1 convs keep PyTorch's default init, which
    ``nn.Linear`` shares. Hand-written rather than ``ProjectionHead``: ReLU and this init differ
    from its GELU / trunc-normal.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.dense = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dense = self.dense(tokens)
        return (F.normalize(self.mlp(tokens.mean(1)), dim=-1), F.normalize(dense, dim=-1),
                F.normalize(dense.mean(1), dim=-1))


class TwoViews:
    """PIL image -> dict(crops=[uint8 (3, s, s)] * 2): two independent MoCo v2 crops.

    RandomResizedCrop(size, scale) then a horizontal flip with p=``flip_p``, per view; colour
    augmentation runs later on the batch's device. DenseCL matches locations by feature argmax, so
    it needs no boxes (and a flip needs no bookkeeping).
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.2, 1.0), flip_p: float = 0.5) -> None:
        self.transform = T.Compose([T.RandomResizedCrop(size, scale=tuple(scale)), T.RandomHorizontalFlip(flip_p),
                                    T.PILToTensor()])

    def __call__(self, image: Any) -> dict[str, list[Tensor]]:
        image = image.convert("RGB")
        return {"crops": [self.transform(image), self.transform(image)]}


def collate_views(samples: list[dict[str, list[Tensor]]]) -> dict[str, list[Tensor]]:
    """crops -> [query views (B, 3, s, s), key views (B, 3, s, s)] uint8."""
    return {"crops": [torch.stack([s["crops"][i] for s in samples]) for i in range(2)]}


def grouped_forward(fn: Callable[[Tensor], tuple[Tensor, ...]], images: Tensor, groups: int,
                    perm: Tensor | None = None) -> tuple[Tensor, ...]:
    """``fn`` on ``groups`` consecutive slices of ``images`` (B, ...) (of ``images[perm]`` when given),
    so BatchNorm sees each slice's statistics alone, as on ``groups`` devices; outputs (B, ...) come
    back in the original order."""
    if perm is not None:
        images = images[perm]
    if groups == 1 and perm is None:  # one slice: no split, no copy of the outputs
        return fn(images)
    parts = [fn(chunk) for chunk in images.tensor_split(groups)]
    outputs = tuple(torch.cat(o) for o in zip(*parts))
    if perm is None:
        return outputs
    inverse = torch.argsort(perm)
    return tuple(o[inverse] for o in outputs)


# BatchNorm layers (timm's BatchNormAct2d subclasses BatchNorm2d; SyncBatchNorm after Lightning's conversion).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batch_norms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``module`` (an empty list for ViTs)."""
    return [m for m in module.modules() if isinstance(m, BATCH_NORMS)]


@torch.no_grad()
def shuffled_forward(fn: Callable[[Tensor], tuple[Tensor, ...]], images: Tensor,
                     generator: torch.Generator, groups: int = 1) -> tuple[Tensor, ...]:
    """MoCo's shuffle BN: ``fn`` on this rank's share of a random permutation of the global batch.

    images (B, ...) per rank; every output of ``fn`` (B, ...) comes back in this rank's original
    order. Without DDP, ``fn`` on ``groups`` slices of a random permutation of the batch (virtual
    ranks; 1: simply ``fn(images)``).
    """
    if not is_distributed():
        if groups <= 1:
            return fn(images)
        perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
        return grouped_forward(fn, images, groups, perm)
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = gather_rows(images)
    perm = torch.randperm(gathered.shape[0], generator=generator).to(images.device)
    dist.broadcast(perm, src=0)  # rank 0's permutation everywhere
    outputs = fn(gathered[perm.view(world, -1)[rank]])
    mine = torch.argsort(perm).view(world, -1)[rank]
    return tuple(gather_rows(o)[mine] for o in outputs)


class DenseCL(SSLMethod):
    """DenseCL on any backbone with ``forward_patches`` (ResNet-50 C5 map or ViT patch tokens).

    Batches come from :class:`TwoViews` + :func:`collate_views`: ``crops`` = [query views, key views].

    Args (beyond :class:`SSLMethod`):
        teacher: ``momentum`` of the key encoder, constant (0.999).
        neck: :class:`DenseCLNeck` kwargs (hidden_dim 2048, out_dim 128).
        queue_size: rows of each negative queue (65536).
        temperature: tau of both InfoNCE terms (0.2).
        loss_lambda: weight of the dense term (0.5).
        lambda_warmup_steps: the dense term's weight is 0 for optimiser steps below this
            (DenseCLWarmupHook / mmpretrain DenseCLHook ``start_iters``; the author suggests 10000;
            0 = off, as in every released config).
        shuffle_bn: shuffle the key batch across DDP ranks around the key forward; on one device, across
            ``bn_groups`` virtual ranks.
        bn_groups: virtual ranks on one device (each a slice of B / bn_groups images with its own BN
            statistics, queries in order, keys shuffled); 1 = whole-batch statistics, which leak
            the positive. Ignored under DDP (the real ranks) and without BN.
        seed: seed of the queue inits and of the shuffle permutations.
        crops: :class:`TwoViews` kwargs (size 224, scale (0.2, 1), flip_p 0.5).
    """

    def __init__(self, backbone: dict[str, Any], optim: dict[str, Any], teacher: dict[str, Any] | None = None,
                 neck: dict[str, Any] | None = None, queue_size: int = 65536, temperature: float = 0.2,
                 loss_lambda: float = 0.5, lambda_warmup_steps: int = 0, shuffle_bn: bool = True, bn_groups: int = 4,
                 seed: int = 0, eval_on: str = "student", **kwargs: Any) -> None:
        super().__init__(backbone, optim, teacher=teacher or {"momentum": 0.999}, eval_on=eval_on, **kwargs)
        if not 0.0 <= loss_lambda <= 1.0:
            raise ValueError(f"loss_lambda={loss_lambda} must lie in [0, 1] (method.loss_lambda)")
        if bn_groups < 1:
            raise ValueError(f"method.bn_groups={bn_groups} must be >= 1 (1: no virtual ranks)")
        neck = neck or {}
        dim = self.student_backbone.embed_dim
        self.student_neck = DenseCLNeck(dim, **neck)
        self.teacher_neck = make_teacher(self.student_neck, DenseCLNeck(dim, **neck))  # copied, as the reference
        out_dim = self.student_neck.out_dim
        self.queue_global = FeatureQueue(queue_size, out_dim, seed=seed)
        self.queue_dense = FeatureQueue(queue_size, out_dim, seed=seed + 1)
        self.temperature, self.loss_lambda = temperature, loss_lambda
        self.lambda_warmup_steps, self.shuffle_bn, self.seed = lambda_warmup_steps, shuffle_bn, seed
        self.bn_groups = 1
        if shuffle_bn and batch_norms(self.student_backbone):
            self.bn_groups = bn_groups  # without BN a split forward would only cost time
        self._shuffle_generator: torch.Generator | None = None

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return super().momentum_pairs() + [(self.student_neck, self.teacher_neck)]

    def param_groups(self) -> list[tuple[str, nn.Module, float]]:
        return super().param_groups() + [("neck", self.student_neck, self.optim_cfg.head_lr)]

    def momentum_at(self, step: int) -> float:
        return float(self.teacher_cfg.momentum)

    def lambda_at(self, step: int) -> float:
        """Weight of the dense term at optimiser step ``step`` (0 during the optional warm-up)."""
        return 0.0 if step < self.lambda_warmup_steps else self.loss_lambda

    def train_transform(self) -> Callable[[Any], Any]:
        return TwoViews(**self.crops_cfg)

    collate_fn = staticmethod(collate_views)

    def on_fit_start(self) -> None:
        if not self.shuffle_bn:
            return
        norms = batch_norms(self.teacher_backbone)
        if any(isinstance(m, nn.SyncBatchNorm) for m in norms):
            rank_zero_warn("DenseCL: SyncBatchNorm makes the key encoder's BN statistics global, which voids "
                           "shuffle BN; set trainer.sync_batchnorm=false as the reference.")
        elif norms and not is_distributed() and self.bn_groups == 1:
            rank_zero_warn("DenseCL: method.bn_groups=1 on one device: the key encoder's BN uses the whole batch's "
                           "statistics, which can leak the positive (MoCo); use bn_groups >= 2.")

    def _groups(self, batch_size: int) -> int:
        """Virtual ranks of this step: 1 under DDP (the real ranks shuffle) or with bn_groups=1."""
        if is_distributed() or self.bn_groups == 1:
            return 1
        if batch_size < 2 * self.bn_groups:
            raise ValueError(f"method.bn_groups={self.bn_groups} needs a batch of at least {2 * self.bn_groups} images "
                             f"(2 per group for BatchNorm), got {batch_size}: raise data.batch_size or lower method.bn_groups")
        return self.bn_groups

    # ------------------------------------------------------------------ the step
    def _encode_keys(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Key views (B, 3, H, W) -> backbone tokens (B, M, D), k (B, d), k_dense (B, M, d), pooled (B, d)."""
        feats, _ = self.teacher_backbone.forward_patches(images)
        return (feats, *self.teacher_neck(feats))

    def _generator(self) -> torch.Generator:
        if self._shuffle_generator is None:
            self._shuffle_generator = torch.Generator().manual_seed(self.seed)
        return self._shuffle_generator

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Any]:
        crops = batch["crops"]
        if len(crops) != 2:
            raise ValueError(f"DenseCL expects 2 views per image (query, key), got {len(crops)}; "
                             f"use its TwoViews transform (method.crops: size, scale, flip_p)")
        groups = self._groups(crops[0].shape[0])
        (q_feats,) = grouped_forward(lambda x: (self.student_backbone.forward_patches(x)[0],), crops[0], groups)
        q, q_dense, _ = self.student_neck(q_feats)
        with torch.no_grad():
            if self.shuffle_bn:
                k_feats, k, k_dense, k_pooled = shuffled_forward(self._encode_keys, crops[1], self._generator(), groups)
            else:
                k_feats, k, k_dense, k_pooled = self._encode_keys(crops[1])
        lam = self.lambda_at(self.global_step)
        # Clones: the queues are written in place below, before backward (reference: queue.clone()).
        terms = densecl_loss(q, k, q_dense, k_dense, q_feats, k_feats, self.queue_global.queue.clone(),
                             self.queue_dense.queue.clone(), self.temperature, lam)
        # After the losses: the current keys are never their own negatives (FIFO).
        self.queue_global.push(k)
        self.queue_dense.push(k_pooled)
        return {**terms, "loss_lambda": lam, "dense": q_feats}
