"""Differentiable sorting networks (soft permutation matrices), diffsort 0.2.0 semantics.

Hand-written rather than calling ``diffsort`` because diffsort applies every comparator layer
as a dense (n x n) matmul, O(L n^3) per row, which dominates a NeCo step on CPU. Here a layer
is a strided view of the wires, ``(C, 2, m)``: wire ``a`` of each comparator sits at slot 0,
wire ``a + m`` at slot 1, and the layer only blends those pairs (O(n^2) per row). P is kept
transposed (wires x inputs) so each blend moves whole contiguous rows, and block-diagonal
while the bitonic network only mixes wires within aligned groups: 15 of the 21 layers for
n=49 touch a fraction of P, and the first layer of each block builds the merged blocks
directly (its two halves have disjoint support, so it only scales them).

Semantics (identical to ``diffsort.DiffSortNet(network, n, steepness=s)``):
ascending sort, ``sort(x) = x @ P`` and ``P[m, j]`` = soft probability that input ``m`` lands
at rank ``j``. Comparator ``(a, b)`` moves ``min`` to its low wire with weight
``alpha = f(s * (x_b - x_a))``, ``f(v) = 1/2 + atan(v)/pi`` (cauchy) or ``sigmoid(v)``
(logistic). The bitonic network runs on ``2^ceil(log2 n)`` wires; diffsort drops the top
``pad`` wires and comparators touching one of them are identities, so padded wires never
move and are dropped from P. Odd-even transposition runs ``n`` layers, starting with pairs
(0,1), (2,3), ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.amp import autocast_off

NETWORKS = ("bitonic", "odd_even")
DISTRIBUTIONS = ("cauchy", "logistic")


@dataclass(frozen=True)
class _Layer:
    """One comparator layer: wires ``[lo, hi)`` viewed as ``(C, 2, dist)``."""

    dist: int  # comparator distance m: pairs (a, a + m)
    span: tuple[int, int] | None  # wires the layer touches; None = all of them
    sign: Tensor | None  # (C, m) +1 = min to wire a, -1 = min to wire a + m; None = all +1
    keep: Tensor | None  # (C, m) True where the comparator touches a padded wire (identity)
    merge: bool = False  # pairs wire i of diagonal block 2k with wire i of block 2k + 1


@dataclass(frozen=True)
class _Network:
    width: int  # number of wires, padding included
    pad: int  # leading padded wires (diffsort discards the top ones)
    start_block: int  # P^T starts as identity blocks of this size
    layers: tuple[_Layer, ...]


def _bitonic(n: int) -> _Network:
    num_blocks = math.ceil(math.log2(n)) if n > 1 else 0
    width = 2**num_blocks
    pad = width - n
    layers = []
    for block in range(num_blocks):
        for layer in range(block + 1):
            m = 2 ** (block - layer)
            a = torch.arange(width).view(-1, 2, m)[:, 0]  # (C, m) low wire of each comparator
            descending = (a // 2 ** (block + 1)) % 2 == 1
            sign = 1.0 - 2.0 * descending.double()
            layers.append(_Layer(m, None, sign, a < pad, merge=layer == 0))
    return _Network(width, pad, 1, tuple(layers))


def _odd_even(n: int) -> _Network:
    layers = []
    for layer in range(n):
        lo = layer % 2
        pairs = (n - lo) // 2
        if pairs:
            layers.append(_Layer(1, (lo, lo + 2 * pairs), None, None))
    return _Network(n, 0, n, tuple(layers))


@lru_cache(maxsize=None)
def _network(network: str, n: int) -> _Network:
    return _bitonic(n) if network == "bitonic" else _odd_even(n)


def _slots(t: Tensor, span: tuple[int, int], m: int, dim: int) -> tuple[Tensor, Tensor]:
    """Views of wires a and a + m of every comparator: two (..., C, m[, r]) tensors."""
    lo, hi = span
    return t.narrow(dim, lo, hi - lo).unflatten(dim, (-1, 2, m)).unbind(dim - 1)


def _mix(t: Tensor, beta: Tensor, span: tuple[int, int], m: int, dim: int) -> Tensor:
    """One layer along wire dim ``dim``: slot a <- beta*a + (1-beta)*b, slot b <- the rest.

    ``beta`` broadcasts against one slot; returns a new contiguous tensor.
    """
    a, b = _slots(t, span, m, dim)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    lo, hi = span
    out.narrow(dim, 0, lo).copy_(t.narrow(dim, 0, lo))
    out.narrow(dim, hi, t.shape[dim] - hi).copy_(t.narrow(dim, hi, t.shape[dim] - hi))
    out_a, out_b = _slots(out, span, m, dim)
    torch.lerp(b, a, beta, out=out_a)
    torch.lerp(a, b, beta, out=out_b)
    return out


class _LayerMix(torch.autograd.Function):
    """``_mix`` with a hand-written backward that saves only ``beta`` and ``a - b``.

    Autograd's own backward of the strided slot views allocates and fills a zero tensor per
    slice (several times the forward cost). The 2x2 comparator matrix is symmetric, so the
    gradient w.r.t. ``t`` is the same layer applied to the incoming gradient.
    """

    @staticmethod
    def forward(ctx, t: Tensor, beta: Tensor, span: tuple[int, int], m: int, dim: int) -> Tensor:
        if ctx.needs_input_grad[1]:
            a, b = _slots(t, span, m, dim)
            ctx.save_for_backward(beta, a - b)
        else:
            ctx.save_for_backward(beta, None)
        ctx.layout = (span, m, dim)
        return _mix(t, beta, span, m, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        beta, diff = ctx.saved_tensors
        span, m, dim = ctx.layout
        grad_t = _mix(grad, beta, span, m, dim) if ctx.needs_input_grad[0] else None
        grad_beta = None
        if ctx.needs_input_grad[1]:
            grad_a, grad_b = _slots(grad, span, m, dim)
            grad_beta = ((grad_a - grad_b) * diff).sum_to_size(beta.shape)
        return grad_t, grad_beta, None, None, None


class _MergeMix(torch.autograd.Function):
    """First layer of a bitonic block on block-diagonal P^T: (R, nb, g, c) -> (R, nb/2, 2g, 2c).

    Wire i of block 2k (rows A) meets wire i of block 2k+1 (rows B). A and B cover disjoint
    inputs, so the merged block is ``[[beta A, (1-beta) B], [(1-beta) A, beta B]]``: one write,
    no zero fill. Padded inputs (only in the first block) are dropped when one block remains.
    """

    @staticmethod
    def forward(ctx, perm_t: Tensor, beta: Tensor, pad: int) -> Tensor:
        top, bottom = perm_t.unflatten(1, (-1, 2)).unbind(2)
        ctx.pad = pad if top.shape[1] == 1 else 0
        top = top[..., ctx.pad :]
        g, c = top.shape[-2], top.shape[-1]
        out = perm_t.new_empty(*top.shape[:-2], 2 * g, c + bottom.shape[-1])
        rest = 1 - beta
        torch.mul(top, beta, out=out[..., :g, :c])
        torch.mul(bottom, rest, out=out[..., :g, c:])
        torch.mul(top, rest, out=out[..., g:, :c])
        torch.mul(bottom, beta, out=out[..., g:, c:])
        ctx.save_for_backward(beta, top, bottom)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        beta, top, bottom = ctx.saved_tensors
        g, c = top.shape[-2], top.shape[-1]
        g_tl, g_tr, g_bl, g_br = grad[..., :g, :c], grad[..., :g, c:], grad[..., g:, :c], grad[..., g:, c:]
        grad_perm = grad_beta = None
        if ctx.needs_input_grad[0]:
            grad_top = F.pad(torch.lerp(g_bl, g_tl, beta), (ctx.pad, 0))
            grad_perm = torch.stack((grad_top, torch.lerp(g_tr, g_br, beta)), 2).flatten(1, 2)
        if ctx.needs_input_grad[1]:
            grad_beta = ((g_tl - g_bl) * top).sum(-1, keepdim=True)
            grad_beta += ((g_br - g_tr) * bottom).sum(-1, keepdim=True)
        return grad_perm, grad_beta, None


def soft_permutation(
    x: Tensor,
    steepness: float = 100.0,
    network: str = "bitonic",
    distribution: str = "cauchy",
) -> Tensor:
    """Soft permutation matrix that sorts ``x`` ascending, as ``diffsort.DiffSortNet`` returns.

    Args:
        x: (..., n) values to sort along the last dim.
        steepness: inverse temperature of each comparator.
        network: "bitonic" (pads to the next power of two) or "odd_even" (n layers).
        distribution: comparator CDF, "cauchy" (diffsort default) or "logistic".

    Returns:
        P: (..., n, n) doubly stochastic, a transposed (non-contiguous) view;
        ``(x.unsqueeze(-2) @ P).squeeze(-2)`` is the soft sort and ``P[..., m, j]`` is the
        probability that input ``m`` lands at rank ``j``. Computed in ``x``'s dtype with autocast off,
        so the custom autograd functions see one dtype in forward and backward (``sort_loss`` passes
        float32; half precision is too coarse for steep comparators).
    """
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., n) with n >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got {x.dtype}; cast it with .float()")
    with autocast_off(x.device):
        return _soft_permutation(x, steepness, network, distribution)


def _soft_permutation(x: Tensor, steepness: float, network: str, distribution: str) -> Tensor:
    n = x.shape[-1]
    net = _network(network, n)
    values = F.pad(x.reshape(-1, n), (net.pad, 0))  # (R, W)
    # P^T as (R, nb, wires, inputs), block-diagonal with nb identity blocks.
    nb = net.width // net.start_block
    eye = torch.eye(net.start_block, dtype=x.dtype, device=x.device)
    perm_t = (eye[:, net.pad :] if nb == 1 else eye).expand(values.shape[0], nb, net.start_block, -1)
    cdf = _cauchy if distribution == "cauchy" else torch.sigmoid

    for i, layer in enumerate(net.layers):
        span = layer.span if layer.span is not None else (0, net.width)
        a, b = _slots(values, span, layer.dist, -1)
        scale = steepness if layer.sign is None else layer.sign.to(x) * steepness
        beta = cdf(scale * (b - a))  # (R, C, m) weight of wire a's value on slot a
        if layer.keep is not None:
            beta = torch.where(layer.keep.to(x.device), 1.0, beta)
        if i + 1 < len(net.layers):  # the last layer's sorted values are never used
            values = _LayerMix.apply(values, beta, span, layer.dist, -1)
        blocks = perm_t.shape[1] // 2 if layer.merge else perm_t.shape[1]
        beta_t = beta.unflatten(1, (blocks, -1)).unsqueeze(-1)  # (R, nb, C/nb, m, 1)
        if layer.merge:  # C/nb == 1, m == current block size
            perm_t = _MergeMix.apply(perm_t, beta_t.squeeze(2), net.pad)
        else:
            span_t = span if layer.span is not None else (0, perm_t.shape[-2])  # per block
            perm_t = _LayerMix.apply(perm_t, beta_t, span_t, layer.dist, -2)
    return perm_t[:, 0, net.pad :].reshape(*x.shape, n).transpose(-1, -2)


def _cauchy(v: Tensor) -> Tensor:
    return 0.5 + torch.atan(v) / math.pi
