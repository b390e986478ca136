"""UDI objective (Su & Ji, ECCV'24; ISL-CV/udi ``main_udi.py`` ``UDILoss``; docs/objectives/udi.md).

Three self-distillation terms with one DINO head and three centres:
(i) cls: student z_cls vs teacher z'_cls; (ii) cls+: student z_cls+ vs the *multimodal* target
u* = alpha * mean_i h_t(z'_i) + (1 - alpha) * h_t(z'_cls), mixed in logit space before centring and
sharpening, where z'_i are the teacher's SRS features at the student view's sampled positions;
(iii) patch: student SRS features vs teacher SRS features at the same image positions (globals only).
Pairs are cross-view: student X with teacher X', student X' with teacher X, every local with both.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from densessl.losses.dino import Centre, distill_ce, teacher_probs
from densessl.schedules import linear_warmup_constant

# The reference divides the valid-sample sum by |V| + 1e-5, so an empty V gives (1 - alpha) * cls.
_COUNT_EPS = 1e-5


def teacher_temperature_schedule(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """Per-epoch teacher temperature: ``linspace(start, end, warmup_epochs)[epoch]``, then ``end``
    (reference: np.linspace over the warm-up epochs, i.e. ``end`` is reached at epoch warmup - 1)."""
    return linear_warmup_constant(epoch, warmup_epochs - 1, start, end)


def multimodal_target(patch_sum: Tensor, count: Tensor, cls_logits: Tensor, alpha: float) -> Tensor:
    """u* = alpha * patch_sum / (count + 1e-5) + (1 - alpha) * cls_logits, in logit space.

    patch_sum (..., K): sum of the teacher patch logits over the valid samples V; count (...): |V|;
    cls_logits (..., K): the teacher's class logits of the same view.
    """
    return alpha * patch_sum / (count[..., None] + _COUNT_EPS) + (1 - alpha) * cls_logits


def crop_weighted(global_term: Tensor, local_term: Tensor | None, n_global: int, n_local: int) -> Tensor:
    """(n_g * L^g + 2 n_l * L^l) / (n_g + 2 n_l): every local pairs with both teacher views."""
    if n_local == 0 or local_term is None:
        return global_term
    return (n_global * global_term + 2 * n_local * local_term) / (n_global + 2 * n_local)


class UDILoss(nn.Module):
    """The three UDI terms and their centres (c_0 cls, c_1 cls+, c_2 patch; EMA buffers, DDP-averaged).

    Inputs (K logits; V = 2 + n_l student views, globals first; teacher views are the two globals):
        s_cls, s_plus: (V, B, K) student z_cls / z_cls+ logits.
        s_patch: (2, B, S, K) student SRS logits of each global view v at its S sampled cells.
        t_cls: (2, B, K) teacher z'_cls logits, indexed by *teacher* view.
        t_patch: (2, B, S, K) teacher SRS logits at the positions of student view v in teacher view 1 - v
            (indexed by student view); valid: (2, B, S) which of them lie inside view 1 - v.
        plus_sum_l: (n_l, 2, B, K) sum of the teacher SRS logits over local l's valid samples projected
            into teacher view g; plus_count_l: (n_l, 2, B) their number.
    """

    def __init__(self, out_dim: int, alpha: float = 0.5, student_temperature: float = 0.1,
                 centre_momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (the patch share of the cls+ target) must lie in [0, 1], got {alpha}")
        self.alpha, self.student_temperature = alpha, student_temperature
        self.centre_cls = Centre(out_dim, centre_momentum)
        self.centre_plus = Centre(out_dim, centre_momentum)
        self.centre_patch = Centre(out_dim, centre_momentum)

    def forward(self, s_cls: Tensor, s_plus: Tensor, s_patch: Tensor, t_cls: Tensor, t_patch: Tensor,
                valid: Tensor, plus_sum_l: Tensor, plus_count_l: Tensor,
                teacher_temperature: float) -> dict[str, Tensor]:
        """-> dict(loss, loss_cls, loss_cls_plus, loss_patch); then updates the centres."""
        n_local, ts, tt = s_cls.shape[0] - 2, self.student_temperature, teacher_temperature
        t_cls_paired = t_cls.flip(0)  # student view v pairs with teacher view 1 - v
        mask = valid.to(t_patch.dtype)

        # (i) cls
        p_cls = teacher_probs(t_cls, self.centre_cls.centre, tt)
        cls_g = distill_ce(s_cls[:2], p_cls.flip(0), ts).mean()
        cls_l = distill_ce(s_cls[2:, None], p_cls[None], ts).mean() if n_local else None

        # (ii) cls+: the multimodal target of each pair
        plus_sum_g = (t_patch * mask[..., None]).sum(2)
        u_g = multimodal_target(plus_sum_g, mask.sum(2), t_cls_paired, self.alpha)
        u_l = multimodal_target(plus_sum_l, plus_count_l, t_cls[None], self.alpha)
        plus_g = distill_ce(s_plus[:2], teacher_probs(u_g, self.centre_plus.centre, tt), ts).mean()
        plus_l = (distill_ce(s_plus[2:, None], teacher_probs(u_l, self.centre_plus.centre, tt), ts).mean()
                  if n_local else None)

        # (iii) patch: one mean over the valid samples of both directions and the whole batch (the
        # reference pools them; averaging each direction first would weight a sample by 1 / its direction's count)
        ce = distill_ce(s_patch, teacher_probs(t_patch, self.centre_patch.centre, tt), ts)
        patch = (ce * mask).sum() / mask.sum().clamp_min(1)

        terms = {"loss_cls": crop_weighted(cls_g, cls_l, 2, n_local),
                 "loss_cls_plus": crop_weighted(plus_g, plus_l, 2, n_local),
                 "loss_patch": patch}
        terms["loss"] = (terms["loss_cls"] + terms["loss_cls_plus"] + terms["loss_patch"]) / 3
        self.update_centres(t_cls, u_g, u_l, plus_sum_g.sum((0, 1)) + plus_sum_l.sum((0, 1, 2)),
                            mask.sum() + plus_count_l.sum())
        return terms

    def update_centres(self, t_cls: Tensor, u_g: Tensor, u_l: Tensor, patch_sum: Tensor, patch_count: Tensor) -> None:
        """After the loss, from raw teacher logits: c_0 <- 2B cls logits, c_1 <- all 2B + 2 n_l B
        targets u*, c_2 <- the mean of every valid patch logit (global and local-projected)."""
        k = t_cls.shape[-1]
        self.centre_cls.update(t_cls)
        self.centre_plus.update(torch.cat([u_g.reshape(-1, k), u_l.reshape(-1, k)]))
        # One row holding this rank's weighted mean (the reference: own count, then all_reduce / world).
        self.centre_patch.update((patch_sum / patch_count.clamp_min(1))[None])
