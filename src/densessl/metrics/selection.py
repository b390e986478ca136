"""Checkpoint selection from a per-checkpoint metric (official ``model_selection.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["select_checkpoints"]


def select_checkpoints(values: Sequence[float], top: int = 3, window: int = 2) -> list[int]:
    """Indices of the ``top`` highest local maxima of ``values``.

    Index i is a local maximum when values[i] equals the max over
    [max(0, i - window), min(n - 1, i + window)] (ties count, so a plateau yields adjacent
    candidates). Candidates are sorted by (-value, index). Map an index i to the epoch
    ``10 * (i + 1)`` for the reference's checkpoint spacing.
    """
    p = np.asarray(values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"values must be a 1-D sequence, got shape {p.shape}")
    if np.isnan(p).any():
        raise ValueError("values contain NaN; drop or fill the failed checkpoints first")
    if top < 0 or window < 0:
        raise ValueError(f"top and window must be >= 0, got top={top}, window={window}")
    n = len(p)
    maxima = [i for i in range(n) if p[i] == p[max(0, i - window) : i + window + 1].max()]
    return sorted(maxima, key=lambda i: (-p[i], i))[:top]
