"""Singular-value spectra of token matrices: singular values, effective rank, centred singular sum.

Split out of ``densessl.metrics.dse``, which uses them for the DSE terms M_dim (effective rank)
and css (centred singular-value sum of a cluster); see docs/dse.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["centered_singular_sum", "effective_rank", "erank", "singular_values"]

_P_EPS = 1e-12  # added to every p_i in the effective rank (reference)
# Eigenvalues of a float32 Gram (float32 eigvalsh) carried absolute errors of ~4e-9 x the largest on
# 1024 x 384 token matrices with power-law and exponential spectra, so those above 1e-5 x the largest
# are within ~4e-4 and their singular values within ~2e-4 (measured: <= 1.6e-4); a spectrum with a
# smaller non-zero eigenvalue is recomputed in float64 (low-rank or strongly decaying features).
_FLOAT32_RESOLVED = 1e-5


def singular_values(x: Tensor, member: Tensor | None = None, centre: bool = False) -> Tensor:
    """Singular values of the member rows of x, column-centred over them if ``centre``.

    x: (..., m, d), member: (..., m) bool (default all rows) -> (..., min(m, d)) float64 (input
    dtype with autograd), unordered; rows outside ``member`` only add zero singular values.

    With autograd on: ``torch.linalg.svdvals`` of the masked, centred rows (differentiable,
    as the reference). Without: eigenvalues of the smaller Gram matrix, ~4x faster than
    svdvals. For float32 x the Gram is float32 (2.5-5x faster than float64) and every matrix
    whose spectrum float32 does not resolve (:func:`_float32_eigenvalues`) is recomputed from
    a float64 Gram, whose zero singular values stay near sqrt(eps64) * sigma_max ~ 1e-8 *
    sigma_max, below those of the reference's float32 svdvals.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        if member is not None:
            x = x * member[..., None]
        if centre:
            n = x.shape[-2] if member is None else member.sum(-1)[..., None, None]
            x = x - x.sum(-2, keepdim=True) / n
            if member is not None:
                x = x * member[..., None]
        return torch.linalg.svdvals(x)
    if x.dtype != torch.float32:
        return _float64_singular_values(x, member, centre)
    eigenvalues, resolved = _float32_eigenvalues(x, member, centre)
    sigma = eigenvalues.double().sqrt()
    if not resolved.all():
        redo = ~resolved
        sigma[redo] = _float64_singular_values(x[redo], None if member is None else member[redo], centre)
    return sigma


def _float32_eigenvalues(x: Tensor, member: Tensor | None, centre: bool) -> tuple[Tensor, Tensor]:
    """Eigenvalues of the float32 Gram of the member rows, centred on the row side first.

    x: (..., m, d) float32 -> (eigenvalues (..., min(m, d)), resolved (...) bool). The
    eigenvalues that must be 0 (rank <= min(members - centre, d)) are set to 0. ``resolved``
    is false where the smallest other one is below ``_FLOAT32_RESOLVED`` x the largest.
    """
    m, d = x.shape[-2:]
    n = x.new_full(x.shape[:-2], m) if member is None else member.sum(-1).to(x.dtype)
    w = None if member is None else member[..., None].to(x.dtype)
    if centre:  # on the rows: a Gram-side centring would cancel |mean|^2 in float32
        mean = (x.sum(-2, keepdim=True) if w is None else w.mT @ x) / n[..., None, None]  # (..., 1, d)
        x = x - mean if w is None else (x - mean).mul_(w)  # one new (..., m, d) tensor, not three
    elif w is not None:
        x = x * w
    eigenvalues = torch.linalg.eigvalsh(x @ x.mT if m <= d else x.mT @ x).clamp_min(0)  # ascending
    zeros = (min(m, d) - (n - int(centre)).clamp(0, d)).long()  # (...)
    eigenvalues = eigenvalues.masked_fill(torch.arange(min(m, d), device=x.device) < zeros[..., None], 0)
    smallest = eigenvalues.gather(-1, zeros.clamp_max(min(m, d) - 1)[..., None]).squeeze(-1)
    resolved = (smallest >= _FLOAT32_RESOLVED * eigenvalues[..., -1]) | (zeros == min(m, d))
    return eigenvalues, resolved


def _float64_singular_values(x: Tensor, member: Tensor | None, centre: bool) -> Tensor:
    """:func:`singular_values` from float64 Gram matrices, masked and centred on the Gram side
    so the (..., m, d) data is read only once."""
    x = x.double()
    w = None if member is None else member.double()
    n = x.shape[-2] if w is None else w.sum(-1)[..., None, None]
    if x.shape[-2] <= x.shape[-1]:
        gram = x @ x.mT
        ones = torch.ones_like(x[..., 0]) if w is None else w
        outer = ones[..., :, None] * ones[..., None, :]
        if w is not None:
            gram = gram * outer
        if centre:  # J G J with J = I - w w^T / n
            r = gram.sum(-1, keepdim=True) / n  # (..., m, 1): row i . member mean
            mean_sq = r.sum(-2, keepdim=True) / n  # |member mean|^2
            gram = gram - r * ones[..., None, :] - ones[..., :, None] * r.mT + mean_sq * outer
    else:
        if w is not None:
            x = x * w[..., None]
        gram = x.mT @ x
        if centre:
            mean = x.sum(-2, keepdim=True) / n
            gram = gram - n * mean.mT @ mean
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


def erank(x: Tensor, *, sum_eps: float = 0.0, normalise: bool = True) -> Tensor:
    """exp(entropy of sigma / sum(sigma)) [/ min(n, d)]. x: (..., n, d) uncentred -> (...).

    ``sum_eps`` is added to sum(sigma) (the regularizer's 1e-12); ``normalise=False`` gives the
    un-normalised effective rank (paper variant). :func:`effective_rank` is the default case.
    """
    sigma = singular_values(x)
    total = (sigma.sum(-1, keepdim=True) + sum_eps).clamp_min(torch.finfo(sigma.dtype).tiny)
    p = sigma / total + _P_EPS  # no renormalising (reference); an all-zero x gives 1 / min(n, d)
    rank = torch.exp(-(p * p.log()).sum(-1))
    return rank / min(x.shape[-2:]) if normalise else rank


def effective_rank(x: Tensor) -> Tensor:
    """Normalised effective rank of the uncentred rows, in (0, 1]. x: (..., n, d) -> (...)."""
    return erank(x)


def centered_singular_sum(x: Tensor) -> Tensor:
    """Nuclear norm of the column-centred x over sqrt(max(n - 1, d)). x: (..., n, d) -> (...)."""
    n, d = x.shape[-2:]
    return singular_values(x, centre=True).sum(-1) / math.sqrt(max(n - 1, d))
