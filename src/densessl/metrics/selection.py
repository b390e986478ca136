"""Across the checkpoints of one run: the lambda-normalised DSE and checkpoint selection from a per-checkpoint
metric (official ``model_selection.py``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from densessl.metrics.dse import DSEResult

__all__ = ["lambda_normalized_dse", "select_checkpoints"]


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


def lambda_normalized_dse(
    results: Sequence[DSEResult] | None = None,
    *,
    inter: Sequence[float] | np.ndarray | None = None,
    intra: Sequence[float] | np.ndarray | None = None,
    dim: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Final DSE over the checkpoints of one run (README's std-normalisation step).

    S_t = inter_t - intra_t with intra_t = (intra_img + intra_batch) / 2, D_t = dim_t,
    lambda = std(S) / std(D), DSE_t = S_t + lambda * D_t. Pass either ``results`` (one
    DSEResult per checkpoint, in order) or the three arrays ``inter``, ``intra``, ``dim``.
    Values are comparable only within one run. If std(D) = 0 (a single checkpoint or a
    constant M_dim), D cannot change the ranking: lambda falls back to 1 (the raw code
    combination) with a warning.

    Returns:
        (T,) float64 array of final DSE values.
    """
    if results is not None:
        if any(a is not None for a in (inter, intra, dim)):
            raise ValueError("pass either results or inter/intra/dim arrays, not both")
        inter = [r.inter for r in results]
        intra = [(r.intra_img + r.intra_batch) / 2 for r in results]
        dim = [r.dim for r in results]
    elif inter is None or intra is None or dim is None:
        raise ValueError("pass results (a sequence of DSEResult) or all of inter, intra and dim")
    arrays = [np.asarray(a, dtype=np.float64) for a in (inter, intra, dim)]
    if any(a.ndim != 1 for a in arrays) or len({len(a) for a in arrays}) != 1 or not len(arrays[0]):
        raise ValueError(
            "inter, intra and dim must be 1-D with one non-zero length (one value per checkpoint), "
            f"got shapes {[a.shape for a in arrays]}"
        )
    separation, dimension = arrays[0] - arrays[1], arrays[2]
    if not (np.isfinite(separation).all() and np.isfinite(dimension).all()):
        raise ValueError("lambda_normalized_dse got non-finite terms")
    std_dim = dimension.std()
    if std_dim > 0:
        lam = separation.std() / std_dim
    else:
        warnings.warn(
            "lambda_normalized_dse: M_dim has zero spread over the checkpoints, so "
            "lambda = std(S)/std(D) is undefined; using lambda = 1",
            RuntimeWarning,
            stacklevel=2,
        )
        lam = 1.0
    return separation + lam * dimension
