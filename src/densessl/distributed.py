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
    """(n, ...) on every rank -> (world * n, ...) in rank order, no gradient (queue pushes)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def mean_over_ranks(x: Tensor) -> Tensor:
    """Average a tensor across ranks (DINO/iBOT centres), in place-safe."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()
