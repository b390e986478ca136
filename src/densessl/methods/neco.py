"""NeCo: patch neighbour consistency (Pariza et al., ICLR 2025; vpariza/NeCo src/neco.py).

The student learns to order reference patches by similarity to each of its patches the way the EMA
teacher orders them, via differentiable sorting (docs/objectives/neco.md). Decisions on the
reference's quirks:

(i) the reference's queue fill counter is shared by both queues and advances twice per step, so its
    first steps sample zero vectors; here each queue keeps its own count and references are drawn
    only from filled rows (with replacement while fewer than needed are filled).
(ii) teacher parameters are frozen (``requires_grad=False``): same maths, no wasted backward.
(iii) boxes are mapped to token units with the real grid (``transforms.align.to_crop_frame``).
(iv) references come from the teacher, as the reference code does (the project page says student).
The EMA update runs after the optimiser step (the reference runs it inside training_step, before the
step): a one-step lag that does not change the schedule.

``loss_mask="fg"``/``"bg"`` (the reference's ablation variant): a foreground mask per global crop from the
teacher's last-layer CLS attention (head mean, ``transforms.masks.foreground_mask``: blur 0.6, 60 % of the
mass, components <= 2 patches dropped), inverted for "bg". Only the masked teacher tokens enter the queue
(or, without a queue, the references); a query counts when its whole RoI bin is masked (the reference's
``roi_align(mask) >= 1.0``, here with a 1e-4 tolerance for bilinear rounding); each pair's loss is the mean
over its masked queries.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densessl.distributed import gather_rows
from densessl.losses.neco import neco_loss
from densessl.methods.base import SSLMethod
from densessl.models import ProjectionHead, make_teacher
from densessl.transforms import align_tokens, intersection, to_crop_frame
from densessl.transforms.masks import foreground_mask


class NeCo(SSLMethod):
    """NeCo on any backbone with ``forward_patches``.

    Batches come from ``MultiCropWithBoxes`` + ``collate_multicrop``: ``crops`` (globals first, then
    locals; all crops of one resolution share a forward pass) and ``boxes`` (B, n_crops, 4).

    Args (beyond :class:`SSLMethod`):
        head: ProjectionHead kwargs (2048 hidden, 256 out, 3 layers, L2-normalised).
        roi_size: aligned grid per crop pair (7 -> 49 queries and 49 references per image).
        queue_size: rows per global-crop reference queue (0 disables the queue: references are the
            batch's shuffled aligned teacher features).
        queue_push: teacher tokens pushed per image per step (reference: 10).
        student_steepness / teacher_steepness: sorting-network steepness (100 / 100).
        sorter: "bitonic" or "odd_even".
        similarity: "cosine" (every reference config) or "euclidean" (the code's default).
        loss_mask: "all" (reference default), "fg" or "bg": train on the foreground / background of
            the teacher's CLS attention only (ViTs with a CLS token).
        mask_keep_mass, mask_blur_sigma: foreground = the top 60 % of the blurred attention mass.
    """

    def __init__(self, backbone: dict[str, Any], optim: dict[str, Any], teacher: dict[str, Any] | None = None,
                 head: dict[str, Any] | None = None, roi_size: int = 7, queue_size: int = 8192,
                 queue_push: int = 10, student_steepness: float = 100.0, teacher_steepness: float = 100.0,
                 sorter: str = "bitonic", similarity: str = "cosine", n_global: int = 2, loss_mask: str = "all",
                 mask_keep_mass: float = 0.6, mask_blur_sigma: float = 0.6, **kwargs: Any) -> None:
        if loss_mask not in ("all", "fg", "bg"):
            raise ValueError(f"loss_mask must be 'all', 'fg' or 'bg', got {loss_mask!r}")
        super().__init__(backbone, optim, teacher=teacher or {"momentum": 0.9995}, **kwargs)
        self.loss_mask, self.mask_keep_mass, self.mask_blur_sigma = loss_mask, mask_keep_mass, mask_blur_sigma
        head = head or {}
        dim = self.student_backbone.embed_dim
        # Heads are independent random inits (the reference does not copy the student head).
        self.student_head = ProjectionHead(dim, **head)
        self.teacher_head = make_teacher(ProjectionHead(dim, **head), ProjectionHead(dim, **head))
        self.roi_size, self.n_global = roi_size, n_global
        self.steepness = (student_steepness, teacher_steepness)
        self.sorter, self.similarity = sorter, similarity
        self.queue_size, self.queue_push = queue_size, queue_push
        out_dim = head.get("out_dim", 256)
        if queue_size > 0:
            # Buffers, so checkpoints (and exact resume) carry the queues and their fill counts.
            self.register_buffer("queue", torch.zeros(n_global, queue_size, out_dim))
            self.register_buffer("queue_ptr", torch.zeros(n_global, dtype=torch.long))
            self.register_buffer("queue_fill", torch.zeros(n_global, dtype=torch.long))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return super().momentum_pairs() + [(self.student_head, self.teacher_head)]

    def param_groups(self) -> list[tuple[str, nn.Module, float]]:
        return super().param_groups() + [("head", self.student_head, self.optim_cfg.head_lr)]

    # ------------------------------------------------------------------ views
    @staticmethod
    def _embed(backbone: nn.Module, head: nn.Module, crops: list[Tensor],
               attention: bool = False) -> list[tuple[Tensor, Tensor, tuple[int, int], Tensor | None]]:
        """One forward per resolution: (backbone tokens (B, N, D), projected (B, N, d), grid, CLS
        attention (B, heads, N) if ``attention`` else None) per crop."""
        out: list[Any] = [None] * len(crops)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(crops):
            by_size.setdefault(tuple(c.shape[-2:]), []).append(i)
        for idx in by_size.values():
            if attention:
                feats = backbone.forward_features(torch.cat([crops[i] for i in idx]), cls_attention=True)
                tokens, grid, attn = feats["patches"], feats["grid"], feats["cls_attention"].chunk(len(idx))
            else:
                (tokens, grid), attn = backbone.forward_patches(torch.cat([crops[i] for i in idx])), [None] * len(idx)
            for j, raw, proj, a in zip(idx, tokens.chunk(len(idx)), head(tokens).chunk(len(idx)), attn):
                out[j] = (raw, proj, grid, a)
        return out

    @torch.no_grad()
    def _token_masks(self, teacher: list[tuple[Tensor, Tensor, tuple[int, int], Tensor | None]]) -> list[Tensor] | None:
        """(B, N) bool per global crop: its foreground ("fg") or background ("bg") tokens; None for "all"."""
        if self.loss_mask == "all":
            return None
        masks = []
        for _, _, (h, w), attn in teacher:
            fg = foreground_mask(attn.mean(1).reshape(-1, h, w), self.mask_keep_mass, self.mask_blur_sigma)
            masks.append((fg if self.loss_mask == "fg" else ~fg).flatten(1))
        return masks

    def forward_views(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Aligned student/teacher features of every (global c, other v) pair.

        Returns student (P, B, K, d), teacher (P, B, K, d), teacher_maps list of (B, N, d) per global,
        dense: the student's backbone tokens of the first global crop (B, N, D), with
        P = n_global * (n_crops - 1) pairs and K = roi_size**2.
        """
        crops, boxes = batch["crops"], batch["boxes"]
        n_crops, g = len(crops), self.n_global
        with torch.no_grad():
            teacher = self._embed(self.teacher_backbone, self.teacher_head, crops[:g], self.loss_mask != "all")
        masks = self._token_masks(teacher)
        student = self._embed(self.student_backbone, self.student_head, crops)
        pairs = [(c, v) for c in range(g) for v in range(n_crops) if v != c]
        t_aligned, s_aligned, q_masks = [], [], []
        for c, v in pairs:
            region = intersection(boxes[:, c], boxes[:, v])[:, None]  # (B, 1, 4) image coords
            _, t_tok, t_grid, _ = teacher[c]
            _, s_tok, s_grid, _ = student[v]
            t_box = to_crop_frame(region, boxes[:, c:c + 1], t_grid)
            t_aligned.append(align_tokens(t_tok, t_grid, t_box, self.roi_size))
            s_aligned.append(align_tokens(s_tok, s_grid, to_crop_frame(region, boxes[:, v:v + 1], s_grid), self.roi_size))
            if masks is not None:  # a query counts when its whole bin is masked
                # float32 whatever the token dtype: in bfloat16 (bf16-mixed) bin averages near 1 are
                # spaced 2^-8 apart and 1 - 1e-4 rounds to 1, so the "whole bin" test would depend on rounding.
                bins = align_tokens(masks[c][..., None].float(), t_grid, t_box, self.roi_size)
                q_masks.append(bins[..., 0] >= 1 - 1e-4)
        # RoI-align averages unit vectors: re-normalise (reference: F.normalize after roi_align).
        t = F.normalize(torch.cat(t_aligned, 1).transpose(0, 1), dim=-1)  # (P, B, K, d)
        s = F.normalize(torch.cat(s_aligned, 1).transpose(0, 1), dim=-1)
        return {"student": s, "teacher": t, "teacher_maps": [teacher[c][1] for c in range(g)], "pairs": pairs,
                "dense": student[0][0], "token_masks": masks,
                "query_mask": torch.cat(q_masks, 1).transpose(0, 1) if masks is not None else None}

    # ------------------------------------------------------------------ references
    @torch.no_grad()
    def _push(self, maps: list[Tensor], masks: list[Tensor] | None = None) -> None:
        """Push min(queue_push * B, queue_size) random teacher tokens of each global's full map (only
        its masked tokens with ``masks`` (B, N) bool per global), gathered from every DDP rank first so
        all ranks keep identical queues."""
        gen = self.generator("references", maps[0].device)
        for c, tokens in enumerate(maps):
            flat = tokens.reshape(-1, tokens.shape[-1])
            if masks is not None:
                flat = flat[masks[c].reshape(-1)]
            n = min(self.queue_push * tokens.shape[0], self.queue_size, flat.shape[0])
            rows = flat[torch.randperm(flat.shape[0], generator=gen, device=flat.device)[:n]]
            rows = gather_rows(rows)[: self.queue_size]
            n = rows.shape[0]
            ptr = int(self.queue_ptr[c])
            idx = (torch.arange(n, device=rows.device) + ptr) % self.queue_size
            self.queue[c, idx] = rows.to(self.queue.dtype)
            self.queue_ptr[c] = (ptr + n) % self.queue_size
            self.queue_fill[c] = min(int(self.queue_fill[c]) + n, self.queue_size)

    @torch.no_grad()
    def references(self, teacher_aligned: Tensor, pairs: list[tuple[int, int]], query_mask: Tensor | None = None) -> Tensor:
        """(P, B, R, d) reference vectors per pair, R = roi_size**2, constant for the student."""
        p, b, k, d = teacher_aligned.shape
        gen = self.generator("references", teacher_aligned.device)
        if self.queue_size <= 0:
            # No-queue path: shuffle the pair's B*K aligned teacher vectors across the batch; with a
            # mask, its masked vectors repeated to B*K first (reference). A pair without masked
            # queries keeps all vectors: its loss weight is 0 anyway.
            refs = []
            for i, flat in enumerate(teacher_aligned.reshape(p, b * k, d)):
                if query_mask is not None and query_mask[i].any():
                    flat = flat[query_mask[i].reshape(-1)]
                    flat = flat.repeat(-(-b * k // len(flat)), 1)[: b * k]
                refs.append(flat[torch.randperm(b * k, generator=gen, device=gen.device)])
            return torch.stack(refs).reshape(p, b, k, d)
        refs = []
        need = b * k
        for pair, (c, _) in enumerate(pairs):
            fill = int(self.queue_fill[c])
            if fill == 0:  # masked pushes can leave a queue empty at first: use the pair's own teacher tokens
                own = teacher_aligned[pair].reshape(need, d)
                refs.append(own[torch.randperm(need, generator=gen, device=gen.device)])
                continue
            if fill >= need:
                idx = torch.randperm(fill, generator=gen, device=gen.device)[:need]
            else:  # early steps: fewer rows than references needed
                idx = torch.randint(fill, (need,), generator=gen, device=gen.device)
            refs.append(self.queue[c, idx])
        return torch.stack(refs).reshape(p, b, k, d)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        views = self.forward_views(batch)
        if self.queue_size > 0:
            self._push(views["teacher_maps"], views["token_masks"])  # before the loss, as the reference
        refs = self.references(views["teacher"], views["pairs"], views["query_mask"])
        loss = neco_loss(views["student"], views["teacher"], refs, student_steepness=self.steepness[0],
                         teacher_steepness=self.steepness[1], network=self.sorter, sim=self.similarity,
                         query_mask=views["query_mask"])
        return {"loss": loss, "dense": views["dense"], "teacher_spread": self.teacher_spread(views["teacher"], refs)}

    @staticmethod
    @torch.no_grad()
    def teacher_spread(teacher: Tensor, refs: Tensor) -> Tensor:
        """Collapse monitor: mean over queries of the std of the teacher's cosines to its references.

        teacher (P, B, K, d), refs (P, B, R, d), both unit rows. When it nears 0 every reference is
        equally near, the teacher's soft ranks become uniform and the loss settles at ln R, its value
        for uniform ranks: nothing is left to learn (what NeCo from a random init does within ~100
        steps on the synthetic scenes; docs/objectives/neco.md).
        """
        return (teacher.float() @ refs.float().transpose(-1, -2)).std(-1).mean()
