"""Representation-quality metrics."""

from densessl.metrics.dse import (
    DSEOptions,
    DSEResult,
    dse,
    dse_over_batches,
    dse_regularizer,
)
from densessl.metrics.selection import lambda_normalized_dse, select_checkpoints
from densessl.metrics.spectra import centered_singular_sum, effective_rank

__all__ = [
    "DSEOptions",
    "DSEResult",
    "centered_singular_sum",
    "dse",
    "dse_over_batches",
    "dse_regularizer",
    "effective_rank",
    "lambda_normalized_dse",
    "select_checkpoints",
]
