"""Batched k-means for DSE: k-means++ seeding, Lloyd steps and squared distances.

Each function works on P independent problems at once, x of shape (P, M, D). Split out of
``densessl.metrics.dse``, which chunks the problems and runs the chunks in parallel.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

__all__ = ["LloydRules", "Seeding", "kmeanspp_seed", "lloyd", "sq_dist", "weighted_draw"]

Seeding = Literal["d", "d2"]

# Seeding distances below this fraction of |x|^2 + |c|^2 count as 0 (the point sits on a chosen
# centroid): the matrix form leaves ~sqrt(D) * eps32 there, enough weight to pick a duplicate of
# a centroid on well-separated data. Points within ~0.5% of a centroid's norm lose their
# (already ~0.5%) weight, a negligible change to the seeding distribution.
_SEED_ZERO = 1e-5


class LloydRules(Protocol):
    """What :func:`lloyd` reads of the DSE rules (``densessl.metrics.dse``'s metric/regularizer rules)."""

    @property
    def reseed_empty(self) -> bool:
        """Re-initialise an empty cluster at a random token (regularizer) instead of keeping it (metric)."""
        ...

    @property
    def reassign(self) -> bool:
        """Take labels from the final centroids (regularizer) instead of the last assignment (metric)."""
        ...


def sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared distances. x: (P, M, D), c: (P, k, D) -> (P, M, k).

    Matrix-product form; callers pass batch-centred data, so the cancellation that breaks
    float32 cdist near collapse (all tokens nearly equal) does not occur.
    """
    x_sq = torch.linalg.vector_norm(x, dim=-1).square()
    return (x_sq[..., None] - 2 * x @ c.mT + c.square().sum(-1)[:, None, :]).clamp_min(0)


def kmeanspp_seed(x: Tensor, k: int, seeding: Seeding, generator: torch.Generator) -> Tensor:
    """k-means++ seeding per problem. x: (P, M, D) -> initial centroids (P, k, D).

    First centroid uniform, each next one drawn with weight D (reference) or D^2 (standard),
    D = distance to the nearest chosen centroid. Distances to a new centroid are one
    matrix-vector product per problem (a batched matmul of this shape is ~2x slower on CPU).
    """
    P, M, _ = x.shape
    batch = torch.arange(P, device=x.device)
    x_sq = x.square().sum(-1)  # (P, M)

    def dist_to(c: Tensor) -> Tensor:  # (P, D) -> (P, M)
        dots = torch.stack([torch.mv(a, b) for a, b in zip(x, c)])
        total = x_sq + c.square().sum(-1, keepdim=True)
        d2 = total - 2 * dots
        return torch.where(d2 > _SEED_ZERO * total, d2, torch.zeros_like(d2))

    first = torch.randint(M, (P,), generator=generator, device=x.device)
    chosen = [x[batch, first]]
    min_d2 = dist_to(chosen[0])
    for _ in range(k - 1):
        weight = min_d2 if seeding == "d2" else min_d2.sqrt()
        # All points on the chosen centroids: draw uniformly (as DSE_regularizer.py).
        weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
        pick = weighted_draw(weight, generator)
        chosen.append(x[batch, pick])
        min_d2 = torch.minimum(min_d2, dist_to(chosen[-1]))
    return torch.stack(chosen, 1)


def weighted_draw(weight: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row with probability proportional to ``weight`` (P, M) >= 0, rows with a positive
    sum -> (P,). Inverse-CDF sampling: one cumsum and a binary search, ~10x cheaper than
    ``torch.multinomial`` on rows of ~1,500. A zero weight never gets drawn: u < total, and the first
    cdf entry above u is one where the cdf grows."""
    cdf = weight.cumsum(1)
    total = cdf[:, -1:]
    u = (torch.rand(total.shape, generator=generator, device=weight.device, dtype=weight.dtype) * total)
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def lloyd(
    x: Tensor, centroids: Tensor, *, iters: int, tol: float, rules: LloydRules, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Lloyd steps per problem. x: (P, M, D), centroids: (P, k, D) -> ((P, k, D), labels (P, M)).

    A problem stops once its centroid shift (Frobenius) falls below ``tol``; later steps no
    longer update it, so each one follows exactly the path of the reference's loop. Labels
    are those of the last assignment, made before the last update (metric), or of a final
    assignment to the returned centroids (``rules.reassign``).
    """
    P, M, D = x.shape
    k = centroids.shape[1]
    centroids = centroids.clone()
    labels = torch.zeros(P, M, dtype=torch.long, device=x.device)
    # Working set: problems whose data sit in xs; it is compacted once half of them stopped
    # (gathering costs about one step, so doing it every step would not pay).
    work, xs = torch.arange(P, device=x.device), x
    moving = torch.ones(P, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        n = len(work)
        old = centroids[work]
        # |x|^2 is constant per point, so it is left out of the assignment.
        assign = torch.baddbmm(old.square().sum(-1)[:, None, :], xs, old.mT, alpha=-2).argmin(-1)
        # Cluster sums by index_add: O(M D) instead of the O(M k D) of a one-hot product.
        flat = (assign + k * torch.arange(n, device=x.device)[:, None]).flatten()
        sums = xs.new_zeros(n * k, D).index_add_(0, flat, xs.reshape(n * M, D)).view(n, k, D)
        counts = torch.bincount(flat, minlength=n * k).view(n, k, 1)
        if rules.reseed_empty:
            draw = torch.randint(M, (n, k), generator=generator, device=x.device)
            fallback = xs[torch.arange(n, device=x.device)[:, None], draw]
        else:
            fallback = old
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), fallback)
        labels[work[moving]] = assign[moving]
        centroids[work[moving]] = updated[moving]
        moving &= (updated - old).flatten(1).norm(dim=1) >= tol
        left = int(moving.sum())
        if not left:
            break
        if left <= n // 2:
            work, xs, moving = work[moving], xs[moving], moving[moving]
    if rules.reassign:
        labels = sq_dist(x, centroids).argmin(-1)
    return centroids, labels
