"""iBOT loss: [CLS] self-distillation across views + masked patch self-distillation within views
(bytedance/ibot ``main_ibot.py`` ``iBOTLoss``), with denseSSL's de-coupling term.

Shapes: B' rows per global view (N regular rows, then 2n de-coupled rows under de-coupling), N_p
patches, K / K_p prototypes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from densessl.losses.dino import Centre, distill_ce, teacher_probs


def masked_patch_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, centre: Tensor,
                      teacher_temp: float, student_temp: float) -> Tensor:
    """Per-row masked patch self-distillation: sum_i m_i CE_i / max(1, sum_i m_i).

    student_logits / teacher_logits (B, N, K), mask (B, N) bool, centre (1, K) -> (B,). Distributions
    are computed at masked positions only (the reference computes every patch, then multiplies by the
    mask: same value, several times the work). A row with an empty mask gives exactly 0 (and still
    counts in a later batch mean, as the reference).
    """
    q = teacher_probs(teacher_logits[mask], centre, teacher_temp)
    ce = distill_ce(student_logits[mask], q, student_temp)  # (M,) over the M masked positions
    per_patch = torch.zeros(mask.shape, device=mask.device).index_put((mask,), ce)
    return per_patch.sum(-1) / mask.sum(-1).clamp(min=1)


def _row_mean(values: Tensor, rows: Tensor) -> Tensor:
    """Mean of ``values`` (B,) over the selected ``rows`` (B,) bool; 0 when none is selected."""
    return (values * rows).sum() / rows.sum().clamp(min=1)


class IBOTLoss(nn.Module):
    """L = lambda1 L_cls + lambda2 L_mim + dc_weight lambda2 L_dc, then the centre update.

    Centres (buffers, so checkpoints carry them) are updated after the loss from every teacher output
    of the step; the current loss uses the pre-update centres.
    """

    def __init__(self, out_dim: int, patch_out_dim: int, student_temp: float = 0.1, centre_momentum: float = 0.9,
                 patch_centre_momentum: float = 0.9, lambda1: float = 1.0, lambda2: float = 1.0,
                 dc_weight: float = 0.3) -> None:
        super().__init__()
        self.centre = Centre(out_dim, centre_momentum)
        self.patch_centre = Centre(patch_out_dim, patch_centre_momentum)
        self.student_temp, self.lambda1, self.lambda2, self.dc_weight = student_temp, lambda1, lambda2, dc_weight

    def forward(self, student_cls: list[Tensor], student_patch: list[Tensor], teacher_cls: list[Tensor],
                teacher_patch: list[Tensor], masks: list[Tensor], teacher_temp: float, teacher_patch_temp: float,
                replaced: list[Tensor] | None = None) -> dict[str, Tensor]:
        """
        Args:
            student_cls: per student crop (globals first, then locals) (B_v, K); globals have B' rows,
                locals N (their rows match the globals' first N).
            student_patch / teacher_patch: per global view (B', N_p, K_p) logits; the student saw the
                masked view, the teacher the clean one.
            teacher_cls: per global view (B', K).
            masks: per global view (B', N_p) bool MIM masks.
            replaced: per global view (B', N_p) bool de-coupling replacement masks (None: vanilla iBOT).
                Rows with any replaced patch are de-coupled rows: excluded from L_cls and L_mim, trained
                on their kept positions ``~replaced`` by L_dc.
        Returns: dict(loss, cls, patch[, dc]) scalars.
        """
        n_global = len(teacher_cls)
        if len(student_patch) != n_global or len(teacher_patch) != n_global or len(masks) != n_global:
            raise ValueError("student_patch, teacher_patch and masks need one entry per global view")
        t_cls = [teacher_probs(t, self.centre.centre, teacher_temp) for t in teacher_cls]
        decoupling = replaced is not None
        replaced = replaced if decoupling else [torch.zeros_like(m) for m in masks]
        dc_rows = [r.any(-1) for r in replaced]

        cls_terms = []
        for q in range(n_global):
            for v, s in enumerate(student_cls):
                if v == q:
                    continue
                ce = distill_ce(s, t_cls[q][: s.shape[0]], self.student_temp)
                keep = ~dc_rows[v] if v < n_global else torch.ones_like(ce, dtype=torch.bool)
                cls_terms.append(_row_mean(ce, keep))
        mim_terms, dc_terms = [], []
        for v in range(n_global):
            loss_mask = torch.where(dc_rows[v][:, None], ~replaced[v], masks[v])
            rows = masked_patch_loss(student_patch[v], teacher_patch[v], loss_mask, self.patch_centre.centre,
                                     teacher_patch_temp, self.student_temp)
            mim_terms.append(_row_mean(rows, ~dc_rows[v]))
            dc_terms.append(_row_mean(rows, dc_rows[v]))

        l_cls = torch.stack(cls_terms).mean() * self.lambda1
        l_mim = torch.stack(mim_terms).mean() * self.lambda2
        out = {"cls": l_cls, "patch": l_mim}
        loss = l_cls + l_mim
        if decoupling:
            l_dc = torch.stack(dc_terms).mean() * self.lambda2
            out["dc"] = l_dc
            loss = loss + self.dc_weight * l_dc
        self.centre.update(torch.cat(teacher_cls))
        self.patch_centre.update(torch.cat(teacher_patch))
        return {"loss": loss, **out}
