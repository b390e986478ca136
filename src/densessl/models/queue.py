"""A FIFO queue of key vectors shared by every DDP rank (MoCo/DenseCL negatives, NeCo references)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densessl.distributed import gather_rows


class FeatureQueue(nn.Module):
    """Ring buffer holding the last ``size`` pushed keys, identical on every DDP rank.

    Buffers (so checkpoints and resumes carry them): ``queue`` (size, dim), ``ptr`` (next row to
    write) and ``filled`` (rows written by :meth:`push` so far, capped at ``size``).

    Args:
        size: K, the number of rows.
        dim: feature dimension.
        init: ``"randn"``: random unit rows (MoCo/DenseCL: a full set of random negatives from the
            first step); ``"zeros"``: read only the first ``filled`` rows until the queue is full.
        seed: seed of the ``randn`` init (the same on every rank, so ranks start identical).

    Batches that do not divide ``size``: the original MoCo/DenseCL code asserts ``size % batch == 0``;
    here writes wrap around the end of the buffer instead, so the queue always holds exactly the
    newest ``size`` keys in arrival order (identical to the original whenever the batch divides
    ``size``). A push larger than ``size`` keeps its newest ``size`` keys, as if pushed one by one.
    """

    def __init__(self, size: int, dim: int, init: str = "randn", seed: int = 0) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        if init == "randn":
            gen = torch.Generator().manual_seed(seed)
            queue = F.normalize(torch.randn(size, dim, generator=gen), dim=1)
        elif init == "zeros":
            queue = torch.zeros(size, dim)
        else:
            raise ValueError(f"unknown queue init '{init}' (randn | zeros)")
        self.size, self.dim = size, dim
        self.register_buffer("queue", queue)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Enqueue keys (n, dim) of this rank after gathering every rank's keys (rank order).

        Every rank must push the same n (the training loader drops the last partial batch).

        Writes in place: a graph that used ``queue`` and is not yet back-propagated must have used a
        ``queue.clone()`` (as MoCo/DenseCL do).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"push expects keys of shape (n, {self.dim}), got {tuple(keys.shape)}")
        keys = gather_rows(keys.detach())
        n, ptr = keys.shape[0], int(self.ptr)
        keys = keys[-self.size:]  # the rest would be overwritten within this push
        rows = (torch.arange(keys.shape[0], device=self.queue.device) + ptr + n - keys.shape[0]) % self.size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
