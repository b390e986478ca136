"""NeCo patch-neighbour-consistency loss (vpariza/NeCo, src/neco.py ``knn_loss``).

For every query patch, the similarities to R reference patches are soft-sorted with a
differentiable sorting network; the student's soft permutation P is trained towards the
teacher's Q with a row-wise cross-entropy, ``-1/(rows * R) * sum Q log P``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.amp import full_precision
from densessl.losses.sorting import soft_permutation

SIMILARITIES = ("cosine", "euclidean")


class _GivenGrad(torch.autograd.Function):
    """Returns ``value`` and backpropagates ``grad_output * grad`` into ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def _sort_ce_sum(
    student_sims: Tensor,
    teacher_sims: Tensor,
    student_steepness: float,
    teacher_steepness: float,
    network: str,
    eps: float,
    weights: Tensor | None = None,
) -> Tensor:
    """-sum_{rows, m, j} w_row Q log P for (rows, R) sims (w = 1 without ``weights`` (rows,))."""
    with torch.no_grad():
        q = soft_permutation(teacher_sims, teacher_steepness, network)
    p = soft_permutation(student_sims, student_steepness, network)
    # xlogy: reference computes q * log(p); same value, and 0 (not nan) where q == p == 0.
    ce = -torch.xlogy(q, p + eps if eps > 0 else p)
    return ce.sum() if weights is None else (ce.sum((-1, -2)) * weights).sum()


@full_precision
def sort_loss(
    student_sims: Tensor,
    teacher_sims: Tensor,
    student_steepness: float = 100.0,
    teacher_steepness: float = 100.0,
    network: str = "bitonic",
    eps: float = 0.0,
    chunk_rows: int | None = 512,
    row_weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy between teacher and student soft permutations of each row of sims.

    ``Q = DS_{teacher_steepness}(teacher_sims)`` (no grad), ``P = DS_{student_steepness}(student_sims)``,
    loss ``= -1/(rows * R) * sum_{rows, m, j} Q[m, j] log P[m, j]``: the mean over rows of the
    per-reference cross-entropy, NeCo's ``1/(B*49*49)`` normalisation. Not zero when
    student == teacher: it is then the mean row entropy of Q, its minimum.

    Args:
        student_sims: (..., R) query-to-reference similarities from the student.
        teacher_sims: (..., R) the same from the teacher; gets no gradient.
        network: "bitonic" or "odd_even" (see ``soft_permutation``).
        eps: added to P inside the log when > 0. The reference uses none: bitonic at
            steepness 100 keeps P >= ~1e-6, but odd_even underflows to 0 in float32.
        chunk_rows: if set and a gradient is needed, rows are processed in chunks of this
            size and each chunk's gradient w.r.t. ``student_sims`` is computed right away, so
            memory stays O(chunk_rows) instead of keeping the whole sorting graph for backward
            (also ~1.7x faster on CPU, where 512 rows stay in cache; on GPU prefer a larger
            value or None). The returned loss then supports one first-order backward.
            None: plain autograd over all rows.
        row_weights: (...,) weight of each row instead of the mean: the loss is then
            ``-1/R * sum_rows w_row sum_{m, j} Q log P`` (weights summing to 1 give a weighted mean).

    Returns:
        Scalar loss, float32 under autocast: half-precision inputs are cast to float32 and the sorting
        runs with autocast off (in bfloat16, comparator weights at steepness 100 round to exactly 0 or 1,
        P gets zeros where Q does not and the loss is inf).
    """
    if student_sims.shape != teacher_sims.shape or student_sims.ndim == 0:
        raise ValueError(
            f"student_sims and teacher_sims must both be (..., R) with the same shape, "
            f"got {tuple(student_sims.shape)} and {tuple(teacher_sims.shape)}"
        )
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows}")
    n_refs = student_sims.shape[-1]
    student = student_sims.reshape(-1, n_refs)
    teacher = teacher_sims.detach().reshape(-1, n_refs)
    if row_weights is not None and row_weights.shape != student_sims.shape[:-1]:
        raise ValueError(f"row_weights must be {tuple(student_sims.shape[:-1])}, got {tuple(row_weights.shape)}")
    weights = None if row_weights is None else row_weights.detach().reshape(-1).to(student.dtype)
    norm = n_refs if weights is not None else student.shape[0] * n_refs
    args = (student_steepness, teacher_steepness, network, eps)
    if chunk_rows is None or not (student.requires_grad and torch.is_grad_enabled()):
        return _sort_ce_sum(student, teacher, *args, weights) / norm

    total = student.new_zeros(())
    grads = []
    rows = torch.arange(student.shape[0], device=student.device)
    for r, s_chunk, t_chunk in zip(rows.split(chunk_rows), student.detach().split(chunk_rows), teacher.split(chunk_rows)):
        with torch.enable_grad():
            s_chunk.requires_grad_(True)
            chunk_loss = _sort_ce_sum(s_chunk, t_chunk, *args, None if weights is None else weights[r]) / norm
            grads.append(torch.autograd.grad(chunk_loss, s_chunk)[0])
        total += chunk_loss.detach()
    return _GivenGrad.apply(student, total, torch.cat(grads))


def _similarities(queries: Tensor, refs: Tensor, sim: str) -> Tensor:
    """(..., K, D) x (..., R, D) -> (..., K, R)."""
    if sim == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(refs, dim=-1).transpose(-1, -2)
    # Reference: raw torch.cdist distances (no re-normalisation), sorted ascending, so rank 0
    # is the nearest reference; with cosine, rank 0 is the least similar one.
    return torch.cdist(queries, refs)


@full_precision
def neco_loss(
    student_aligned: Tensor,
    teacher_aligned: Tensor,
    references: Tensor,
    student_steepness: float = 100.0,
    teacher_steepness: float = 100.0,
    network: str = "bitonic",
    sim: str = "cosine",
    eps: float = 0.0,
    chunk_rows: int | None = 512,
    query_mask: Tensor | None = None,
) -> Tensor:
    """NeCo loss over all (global crop c, other crop v) pairs, equally weighted.

    ``L = mean_pairs sort_loss(a(S_v, R), a(T_{c->v}, R))``, which for the reference's
    2 globals x 5 other crops equals ``1/2 sum_c 1/5 sum_v l_{c,v}``. All pairs are sorted in
    one batched call. Teacher features and references are treated as constants (detached).

    Args:
        student_aligned: (P, B, K, D) student features S_v of each pair (RoI-aligned queries).
        teacher_aligned: (P, B, K, D) teacher features T_{c->v} at the same locations.
        references: (P, B, R, D) per-pair references, or (B, R, D) shared by all pairs;
            R is the sorting size (49 in NeCo).
        sim: "cosine" (every NeCo config; features are re-normalised) or "euclidean"
            (reference code default: sorts raw ``cdist`` distances, which reverses the rank
            order relative to cosine).
        student_steepness, teacher_steepness, network, eps, chunk_rows: see ``sort_loss``.
        query_mask: (P, B, K) bool, NeCo's fg/bg variant (``loss_mask``): each pair's loss is the
            mean over its masked queries only, 0 for a pair without any (reference
            ``compute_knn_subloss``), and pairs are still averaged with equal weight.

    Returns:
        Scalar loss; similarities and sorting run in float32 under autocast (see ``sort_loss``).
    """
    if sim not in SIMILARITIES:
        raise ValueError(f"sim must be one of {SIMILARITIES}, got {sim!r}")
    if student_aligned.ndim != 4 or student_aligned.shape != teacher_aligned.shape:
        raise ValueError(
            "student_aligned and teacher_aligned must both be (P, B, K, D), got "
            f"{tuple(student_aligned.shape)} and {tuple(teacher_aligned.shape)}"
        )
    pairs, batch, _, dim = student_aligned.shape
    if references.ndim == 3:
        references = references.expand(pairs, *references.shape)
    if references.ndim != 4 or references.shape[:2] != (pairs, batch) or references.shape[-1] != dim:
        raise ValueError(
            f"references must be (P, B, R, D) = ({pairs}, {batch}, R, {dim}) or (B, R, D), "
            f"got {tuple(references.shape)}"
        )
    references = references.detach()
    student_sims = _similarities(student_aligned, references, sim)  # (P, B, K, R)
    with torch.no_grad():
        teacher_sims = _similarities(teacher_aligned, references, sim)
    weights = None
    if query_mask is not None:
        if query_mask.shape != student_aligned.shape[:3]:
            raise ValueError(f"query_mask must be (P, B, K) = {tuple(student_aligned.shape[:3])}, "
                             f"got {tuple(query_mask.shape)}")
        mask = query_mask.to(student_sims.dtype)
        weights = mask / mask.sum((1, 2), keepdim=True).clamp_min(1) / pairs
    # Every pair has B*K rows, so (without a mask) the mean over all rows is the mean of the pair losses.
    return sort_loss(
        student_sims, teacher_sims, student_steepness, teacher_steepness, network, eps, chunk_rows, weights
    )
