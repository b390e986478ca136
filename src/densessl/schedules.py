"""Per-step schedules (learning rate, weight decay, temperatures, momentum)."""
from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, base: float, final: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a cosine from
    ``base`` (at the end of warm-up) to ``final`` (at ``total_steps``)."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span
    return final + (base - final) * (1 + math.cos(math.pi * t)) / 2


def linear_warmup_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` -> ``end`` linearly over ``warmup_steps``, then ``end`` (teacher temperature warm-up)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
