"""BASELINE ONLY: straightforward port of the official per-image / per-group DSE loop.

Follows EldercatSAM/SSL-Degradation ``estimator.compute_DSE`` step by step (Python k-means
per image and per group, one svdvals per cluster and per position, float32 cdist) so that
``bench_dse.py`` can time it and compare values side by side with
``densessl.metrics.dse``. The one deliberate change: random draws come from a private
generator instead of reseeding the global RNG. Not part of the library; do not import it
from library code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_effective_rank(x: Tensor) -> Tensor:
    sigma = torch.linalg.svdvals(x)
    p = sigma / sigma.sum() + 1e-12
    return torch.exp(-(p * p.log()).sum()) / min(x.shape)


def reference_css(x: Tensor) -> Tensor:
    n, d = x.shape
    return torch.linalg.svdvals(x - x.mean(0)).sum() / math.sqrt(max(n - 1, d))


def reference_kmeans(x: Tensor, k: int, gen: torch.Generator, iters: int = 20, tol: float = 1e-4):
    """k-means++ (weights D) then Lloyd; labels of the last assignment (before the last update)."""
    n = x.shape[0]
    centroids = x[torch.randint(0, n, (1,), generator=gen)]
    for _ in range(k - 1):
        d = torch.cdist(x, centroids).min(1).values
        centroids = torch.cat([centroids, x[torch.multinomial(d / d.sum(), 1, generator=gen)]])
    for _ in range(iters):
        labels = torch.cdist(x, centroids).argmin(1)
        updated = []
        for j in range(k):
            members = x[labels == j]
            updated.append(members.mean(0) if len(members) else centroids[j])
        updated = torch.stack(updated)
        shift = (updated - centroids).pow(2).sum().sqrt().item()
        centroids = updated
        if shift < tol:
            break
    return centroids, labels


@torch.no_grad()
def reference_dse(
    z: Tensor, *, group_size: int = 8, local_clusters: int = 3, global_clusters: int = 24, seed: int = 0
) -> tuple[float, float, float, float, float]:
    """(M_inter, M_intra_img, M_intra_batch, M_dim, DSE) of one (B, N, D) batch, normalised."""
    gen = torch.Generator().manual_seed(seed)
    B, N, d = z.shape
    z = F.normalize(z, dim=-1)
    s = (z - z.mean((0, 1), keepdim=True)).norm(dim=-1).mean()

    per_image = []
    for b in range(B):
        _, labels = reference_kmeans(z[b], local_clusters, gen)
        css = [reference_css(z[b][labels == j]) for j in range(local_clusters) if (labels == j).sum() > 1]
        per_image.append(sum(css) / len(css) if css else torch.tensor(1.0))

    inter, css_batch = [], []
    for start in range(0, B, group_size):
        x = z[start : start + group_size].reshape(-1, d)
        centroids, labels = reference_kmeans(x, global_clusters, gen)
        css_batch += [
            reference_css(x[labels == j]) for j in range(global_clusters) if (labels == j).sum() > 1
        ]
        dist = torch.cdist(x, centroids)
        dist[torch.arange(len(x)), labels] = float("inf")
        inter.append(dist.min(1).values.mean())

    m_inter = torch.stack(inter).mean() / s
    m_img = torch.stack(per_image).mean() / s
    m_batch = (torch.stack(css_batch).mean() if css_batch else torch.tensor(1.0)) / s
    perm = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    draws = z[torch.arange(B)[:, None], perm].transpose(0, 1)
    m_dim = torch.stack([reference_effective_rank(draws[n]) for n in range(N)]).mean()
    value = m_inter + m_dim - (m_img + m_batch) / 2
    return m_inter.item(), m_img.item(), m_batch.item(), m_dim.item(), value.item()
