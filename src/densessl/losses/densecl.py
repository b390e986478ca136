"""DenseCL's objective on tensors (Wang et al., CVPR 2021; WXinlong/DenseCL openselfsup/models/densecl.py).

L = (1 - lambda) * L_global + lambda * L_dense, both InfoNCE at temperature tau against a queue:
the global term is MoCo v2's (pooled query vs its key, negatives = queue of past keys); the dense
term matches each query location to the key location whose BACKBONE feature is most cosine-similar
(argmax, not mutual), and its negatives are a second queue of past images' pooled dense keys.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.amp import full_precision


@torch.no_grad()
@full_precision
def dense_correspondence(query_feats: Tensor, key_feats: Tensor) -> Tensor:
    """Index (B, N) of the key position most cosine-similar to each query position.

    query_feats (B, N, D), key_feats (B, M, D): backbone features of the two views. Ties go to the
    lowest index (torch.argmax on CPU; not guaranteed on CUDA). Similarities are float32 under autocast
    (bfloat16's 8-bit mantissa would tie or swap near-equal neighbours).
    """
    sim = F.normalize(query_feats, dim=-1) @ F.normalize(key_feats, dim=-1).transpose(1, 2)  # (B, N, M)
    return sim.argmax(dim=-1)


class _InfoNCE(torch.autograd.Function):
    """InfoNCE whose (R, K) negative logits become the softmax probabilities in place and are reused
    by backward, which is then matmuls only. Hand-written because cross-entropy on concatenated
    logits keeps several (R, K) buffers and costs ~1.7x these matmuls on CPU (65536 negatives x
    392 locations per 8 images; benchmarks/bench_densecl.py); same values and gradients."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
        scaled = query / temperature
        pos = (scaled * positive).sum(-1, keepdim=True)  # (R, 1)
        prob = scaled @ negatives.T  # (R, K) logits, turned into probabilities below
        shift = torch.maximum(prob.amax(1, keepdim=True), pos)
        prob.sub_(shift).exp_()
        p_pos = (pos - shift).exp()
        z = prob.sum(1, keepdim=True) + p_pos
        prob.div_(z)
        ctx.save_for_backward(query, positive, negatives, prob, p_pos / z)
        ctx.temperature = temperature
        return (z.log() + shift - pos).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        query, positive, negatives, prob, p_pos = ctx.saved_tensors
        scale = grad / (len(query) * ctx.temperature)
        coef = p_pos - 1  # dL/d(positive logit); dL/d(negative logits) = prob
        need_q, need_p, need_n = ctx.needs_input_grad[:3]
        return ((prob @ negatives + coef * positive) * scale if need_q else None,
                coef * query * scale if need_p else None,
                (prob.T @ query) * scale if need_n else None,
                None)


@full_precision
def info_nce(query: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Mean over rows of -log(e^{q.p/t} / (e^{q.p/t} + sum_n e^{q.n/t})).

    query, positive (R, d); negatives (K, d), K >= 1, shared by every row. Inputs are used as given
    (pass unit vectors for cosine logits). Equal to the reference's ContrastiveHead: cross-entropy
    with the positive at index 0 of the (R, 1 + K) logits. Runs in float32 under autocast (half-precision
    inputs are cast, their gradients come back in their dtype): the probabilities saved for backward and
    every matmul share one dtype.
    """
    return _InfoNCE.apply(query, positive, negatives, temperature)


def densecl_loss(q: Tensor, k: Tensor, q_dense: Tensor, k_dense: Tensor, q_feats: Tensor, k_feats: Tensor,
                 queue_global: Tensor, queue_dense: Tensor, temperature: float = 0.2,
                 loss_lambda: float = 0.5) -> dict[str, Tensor]:
    """DenseCL loss of one step (x1 = query view, x2 = key view; asymmetric as the reference).

    Args:
        q, k: unit global projections (B, d) of the query / key encoder.
        q_dense, k_dense: unit dense projections (B, N, d) / (B, M, d).
        q_feats, k_feats: backbone features (B, N, D) / (B, M, D), only used for the correspondence.
        queue_global: (K, d) unit negatives for the global term (past keys k).
        queue_dense: (K2, d) unit negatives for the dense term (past images' pooled dense keys).
        temperature: tau of both terms (0.2).
        loss_lambda: weight of the dense term (0.5; 0 = MoCo v2, 1 = dense only).

    Returns ``loss``, and the unweighted ``loss_global`` and ``loss_dense`` (the reference logs them
    multiplied by 1 - lambda and lambda).
    """
    loss_global = info_nce(q, k.detach(), queue_global.detach(), temperature)
    idx = dense_correspondence(q_feats, k_feats)  # (B, N)
    positive = k_dense.detach().gather(1, idx[..., None].expand(-1, -1, k_dense.shape[-1]))  # (B, N, d)
    d = q_dense.shape[-1]
    loss_dense = info_nce(q_dense.reshape(-1, d), positive.reshape(-1, d), queue_dense.detach(), temperature)
    loss = (1.0 - loss_lambda) * loss_global + loss_lambda * loss_dense
    return {"loss": loss, "loss_global": loss_global, "loss_dense": loss_dense}
