"""Collectives that are no-ops in a single process, so losses and queues work with and without DDP
(and without a Lightning Trainer, e.g. in unit tests)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_rows(x: Tensor) -> Tensor:
    """(n_rank, ...) on every rank -> (sum of n_rank, ...) in rank order, no gradient (queue pushes).

    Ranks may hold different row counts (e.g. NeCo's foreground-only pushes): rows are padded to the
    largest count for ``all_gather`` and trimmed after."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, counts)])


@torch.no_grad()
def mean_over_ranks(x: Tensor) -> Tensor:
    """Average a tensor across ranks (DINO/iBOT centres), in place-safe."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()
