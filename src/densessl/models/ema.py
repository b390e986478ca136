"""EMA teacher utilities (BYOL/DINO-style momentum encoders)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """m_k = final - (final - base) * (1 + cos(pi k / K)) / 2: ``base`` at k=0, ``final`` at k=K."""
    if total_steps <= 0:
        return base
    return final - (final - base) * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student for every (student, teacher) module pair.

    Parameters only: BN running statistics of a momentum encoder are its own (as MoCo/BYOL/DINO).
    """
    s_params, t_params = [], []
    for student, teacher in pairs:
        for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
            s_params.append(ps.detach())
            t_params.append(pt)
    if t_params:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def make_teacher(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """Copy the student's weights into ``teacher`` and freeze it (no grads: the reference NeCo
    keeps requires_grad on the teacher, which only wastes backward work)."""
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
