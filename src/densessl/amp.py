"""Mixed precision: code whose maths must run in float32 under ``trainer.precision=bf16-mixed`` / ``16-mixed``.

Autocast runs matmuls in bfloat16/float16. Where that breaks the maths (soft sorting at steepness 100,
whose comparator weights round to exactly 0/1 in bfloat16; the hand-written InfoNCE, whose backward
mixes saved half-precision probabilities with float32 inputs; DSE's k-means and singular values),
the code turns autocast off for the tensors' device and casts half-precision inputs to float32.
The casts are ordinary autograd ops, so gradients flow back in the inputs' own dtype, and custom
``torch.autograd.Function`` s called in such a region see float32 tensors in forward and backward on
any device (``torch.amp.custom_fwd`` needs the device type when the function is defined).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)

F = TypeVar("F", bound=Callable[..., Any])


def float32(t: Tensor) -> Tensor:
    """``t`` cast to float32 if it is float16/bfloat16; any other tensor (float32, float64, int, bool) as is."""
    return t.float() if t.dtype in HALF_DTYPES else t


@contextlib.contextmanager
def autocast_off(device: torch.device | str) -> Iterator[None]:
    """Autocast disabled for ``device``'s type (a no-op on device types without autocast)."""
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def full_precision(fn: F) -> F:
    """Decorator: ``fn`` runs with autocast off for the device of its first tensor argument, and its
    float16/bfloat16 tensor arguments (positional or keyword) arrive as float32. float32 and float64
    inputs are passed unchanged, so results outside autocast do not change."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if not tensors:
            return fn(*args, **kwargs)
        args = tuple(float32(a) if isinstance(a, Tensor) else a for a in args)
        kwargs = {k: float32(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        with autocast_off(tensors[0].device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
