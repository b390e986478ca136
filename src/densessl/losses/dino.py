"""DINO-style self-distillation pieces shared by iBOT and UDI.

The teacher distribution is a centred, sharpened softmax of the teacher logits; the student is trained
with the cross-entropy to it; the centre is an EMA of the mean teacher logit (bytedance/ibot
``main_ibot.py``: ``iBOTLoss.update_center``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class Centre(nn.Module):
    """EMA centre of teacher logits, ``c <- m c + (1 - m) mean(z)``; a buffer so checkpoints carry it."""

    centre: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Centre momentum must lie in [0, 1], got {momentum}.")
        self.momentum = momentum
        self.register_buffer("centre", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """Update from teacher logits (..., dim): mean over all leading dims, averaged over DDP ranks.

        Nested means (over patches, then over the batch) equal this flat mean when every row has the same
        number of tokens, which is the case for iBOT's patch centre.
        """
        if teacher_logits.shape[-1] != self.centre.shape[-1]:
            raise ValueError(
                f"Centre has dim {self.centre.shape[-1]} but the logits have last dim {teacher_logits.shape[-1]}."
            )
        mean = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]).mean(0, keepdim=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.centre.mul_(self.momentum).add_(mean.to(self.centre.dtype), alpha=1.0 - self.momentum)


def teacher_probs(teacher_logits: Tensor, centre: Tensor, temperature: float) -> Tensor:
    """softmax((t - c) / temperature) over the last dim, without gradient; (..., K), centre (1, K)."""
    with torch.no_grad():
        return F.softmax((teacher_logits.float() - centre.float()) / temperature, dim=-1)


def distill_ce(student_logits: Tensor, teacher_probs: Tensor, student_temperature: float) -> Tensor:
    """Per-row cross-entropy ``-sum_k q_k log softmax(s / temp)_k``; (..., K), (..., K) -> (...).

    Computed in float32 because log-softmax of sharpened fp16 logits overflows (bytedance/ibot #19).
    """
    log_p = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    return -(teacher_probs * log_p).sum(-1)
