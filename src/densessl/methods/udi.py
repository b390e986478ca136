"""UDI: Unsqueezed DIstillation (Su & Ji, ECCV'24; ISL-CV/udi @133c2cb; docs/objectives/udi.md).

A ViT with a second class token z_cls+ learns from a multimodal target that mixes the teacher's
class logits with its patch logits at stratified random positions (SRS), next to DINO's class term
and a patch term. Decisions on the reference's quirks:

(i) View geometry: the paper presents X' as a crop of X; the reference code instead draws X' like X and
    shifts it toward X (every local toward the union of X and X'), so X' lies inside X only 8% of the time.
    We follow the code (``transforms.sampling.UDIMultiCrop``), with the union width computed correctly
    (the code uses the row index there) and horizontal flips applied on device and recorded in the boxes.
(ii) Token positions are patch centres, not the code's corner-aligned a / (n - 1)
    (``transforms.sampling`` explains why); dropped samples are masked rather than compacted.
(iii) The teacher backbone runs once on both globals (the code runs it twice), and the student's locals
    skip the SRS layer, whose output the code computes and never uses.
(iv) The cls+ targets of the locals only need the *sum* of teacher patch logits over the valid samples;
    the head's last layer is linear and bias-free, so that sum is one last-layer product of the summed
    bottleneck vectors (``DINOHead.bottleneck``): exact, and n_l * B * 9 fewer K-wide logit rows.
(v) The reference's photometric branch choice (per image: blur p 0.5 or 1.0, or blur 0.1 + solarise
    0.2) is ``color`` (blur p 0.75) / ``color_alt`` picked per image with probability ``color_alt_p``.
The EMA update runs after the optimiser step, as the reference.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from densessl.losses.udi import UDILoss, teacher_temperature_schedule
from densessl.methods.base import SSLMethod
from densessl.models import DINOHead, make_teacher
from densessl.models.udi_vit import UDIViT
from densessl.transforms import ColorAugment
from densessl.transforms.sampling import (UDIMultiCrop, cell_centres, gather_tokens, project_points, random_hflip,
                                          sample_tokens, stratified_cells)

_HEAD_DEFAULTS = {"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "num_layers": 3,
                  "norm_last_layer": False}


class UDI(SSLMethod):
    """UDI on a timm ViT backbone (wrapped in :class:`UDIViT`).

    Batches come from :class:`UDIMultiCrop` + ``collate_multicrop``: ``crops`` (X, X', then locals) and
    ``boxes`` (B, n_crops, 4).

    Args (beyond :class:`SSLMethod`):
        head: DINOHead kwargs; one head serves cls, cls+ and patch (65536 prototypes, norm_last_layer false).
        alpha: patch share of the cls+ target (0.5).
        student_temperature: 0.1. teacher_temperature: 0.07, reached linearly from
            ``warmup_teacher_temperature`` (0.04) over ``warmup_teacher_temperature_epochs`` (30).
        centre_momentum: of the three centres (0.9).
        srs_window_global / srs_window_local: stratum side in tokens (3 on 14x14 -> 16, 2 on 6x6 -> 9).
        srs_heads: heads of the SRS attention (default: the backbone's).
        hflip_p: horizontal flip probability of every crop.
        color_alt / color_alt_p: second photometric branch and its per-image probability.
        freeze_last_layer_epochs: epochs during which the head's last layer gets no update (1).
        clip_grad: per-tensor gradient-norm clip (reference ``utils.clip_gradients``; 0 disables).
        seed: of the generator behind flips, branch choices and SRS draws (plus the rank).
    """

    def __init__(self, backbone: dict[str, Any], optim: dict[str, Any], teacher: dict[str, Any] | None = None,
                 head: dict[str, Any] | None = None, alpha: float = 0.5, student_temperature: float = 0.1,
                 teacher_temperature: float = 0.07, warmup_teacher_temperature: float = 0.04,
                 warmup_teacher_temperature_epochs: int = 30, centre_momentum: float = 0.9,
                 srs_window_global: int = 3, srs_window_local: int = 2, srs_heads: int | None = None,
                 hflip_p: float = 0.5, color_alt: dict[str, Any] | None = None, color_alt_p: float = 0.5,
                 freeze_last_layer_epochs: int = 1, clip_grad: float = 3.0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(backbone, optim, teacher=teacher or {"momentum": 0.996, "final_momentum": 1.0}, **kwargs)
        self.student_backbone = UDIViT(self.student_backbone, srs_heads)
        self.teacher_backbone = make_teacher(self.student_backbone, UDIViT(self.teacher_backbone, srs_heads))
        head = {**_HEAD_DEFAULTS, **(head or {})}
        dim = self.student_backbone.embed_dim
        self.student_head = DINOHead(dim, **head)
        self.teacher_head = make_teacher(self.student_head, DINOHead(dim, **head))
        self.criterion = UDILoss(head["out_dim"], alpha, student_temperature, centre_momentum)
        self.temperatures = (warmup_teacher_temperature, teacher_temperature, warmup_teacher_temperature_epochs)
        self.windows = (srs_window_global, srs_window_local)
        self.hflip_p, self.color_alt_p = hflip_p, color_alt_p
        self.color_alt = ColorAugment(**color_alt) if color_alt else None
        self.freeze_last_layer_epochs, self.clip_grad, self.seed = freeze_last_layer_epochs, clip_grad, seed

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return super().momentum_pairs() + [(self.student_head, self.teacher_head)]

    def param_groups(self) -> list[tuple[str, nn.Module, float]]:
        head_lr = self.optim_cfg.head_lr
        return super().param_groups() + [("head", self.student_head, head_lr)]

    def train_transform(self) -> UDIMultiCrop:
        return UDIMultiCrop(**self.crops_cfg)

    def stream(self) -> torch.Generator:
        """CPU generator of flips, colour branches and SRS draws: a private stream seeded per rank, in
        checkpoints with the other generators (exact resume)."""
        return self.generator("udi", torch.device("cpu"), self.seed)

    # ------------------------------------------------------------------ augmentation on device
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not (self._trainer is not None and self.trainer.training and isinstance(batch, dict) and "crops" in batch):
            return batch
        gen, boxes = self.stream(), batch["boxes"].clone()
        crops = []
        for i, c in enumerate(batch["crops"]):
            c, boxes[:, i] = random_hflip(c, boxes[:, i], self.hflip_p, gen)
            crops.append(self._colour(c, gen))
        return {**batch, "crops": crops, "boxes": boxes}

    def _colour(self, crops: Tensor, gen: torch.Generator) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised float; each image takes ``color_alt`` with p=color_alt_p."""
        if self.color_alt is None:
            return self.color(crops)
        alt = (torch.rand(crops.shape[0], generator=gen) < self.color_alt_p).to(crops.device)
        out = torch.empty(crops.shape, device=crops.device)
        for rows, aug in ((~alt, self.color), (alt, self.color_alt)):
            if rows.any():
                out[rows] = aug(crops[rows])
        return out

    # ------------------------------------------------------------------ the step
    def teacher_points(self, cells: Tensor, grid: tuple[int, int], local_cells: Tensor | None,
                       local_grid: tuple[int, int] | None, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Where the student's samples fall in each teacher view.

        cells (B, S_g) of the global grid (shared by X -> X' and X' -> X), local_cells (B, S_l) (shared
        by every local), boxes (B, 2 + n_l, 4). Returns points (2B, S_g + n_l S_l, 2) as crop fractions
        of teacher view g (batch order: view 0 images, then view 1) and valid (2, B, S_g + n_l S_l);
        the first S_g come from student global 1 - g, then local 0's S_l, local 1's, ...
        """
        b, n_local = boxes.shape[0], boxes.shape[1] - 2
        points, valid = [], []
        for g in (0, 1):
            p, v = project_points(cell_centres(cells, grid), boxes[:, 1 - g], boxes[:, g])
            if n_local:
                pl, vl = project_points(cell_centres(local_cells, local_grid).repeat_interleave(n_local, 0),
                                        boxes[:, 2:].reshape(-1, 4), boxes[:, g].repeat_interleave(n_local, 0))
                p, v = torch.cat([p, pl.reshape(b, -1, 2)], 1), torch.cat([v, vl.reshape(b, -1)], 1)
            points.append(p)
            valid.append(v)
        return torch.cat(points), torch.stack(valid)

    def forward_views(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """All logits of one step, as :class:`UDILoss` takes them (its docstring gives the shapes), plus
        ``valid_local`` (2, B, n_l S_l) and ``dense``: the student's patch tokens of X (B, N, D)."""
        crops, boxes = batch["crops"], batch["boxes"]
        b, n_local, dev = boxes.shape[0], len(crops) - 2, boxes.device
        with torch.no_grad():
            t = self.teacher_backbone.forward_features(torch.cat(crops[:2]))
        s = self.student_backbone.forward_features(torch.cat(crops[:2]))
        s_loc = self.student_backbone.forward_features(torch.cat(crops[2:])) if n_local else None

        gen, grid = self.stream(), s["grid"]
        cells = stratified_cells(b, grid, self.windows[0], gen).to(dev)
        local_cells = stratified_cells(b, s_loc["grid"], self.windows[1], gen).to(dev) if n_local else None
        points, valid = self.teacher_points(cells, grid, local_cells, s_loc["grid"] if n_local else None, boxes)
        n_s, n_sl = cells.shape[1], local_cells.shape[1] if n_local else 0

        with torch.no_grad():  # teacher: SRS features at the projected points, then the shared head
            srs = self.teacher_backbone.srs
            x = srs.prepare(t["last"])
            z = self.teacher_head.bottleneck(srs(x, sample_tokens(x, grid, points)))
            z = z.reshape(2, b, z.shape[1], -1)
            t_cls = self.teacher_head(t["cls"]).reshape(2, b, -1)
            t_patch = self.teacher_head.last_layer(z[:, :, :n_s].flip(0))  # by student view: (2, B, S_g, K)
            v_loc = valid[:, :, n_s:].reshape(2, b, n_local, n_sl)
            z_loc = z[:, :, n_s:].reshape(2, b, n_local, n_sl, z.shape[-1])
            plus_sum_l = self.teacher_head.last_layer((z_loc * v_loc[..., None]).sum(3)).permute(2, 0, 1, 3)
            plus_count_l = v_loc.sum(3).permute(2, 0, 1).float()

        srs = self.student_backbone.srs
        x = srs.prepare(s["last"])
        z_s = srs(x, gather_tokens(x, cells.repeat(2, 1)))  # one-hot rows: (2B, S_g, D)
        views = 2 + n_local
        cls, plus = [s["cls"]], [s["cls_plus"]]
        if n_local:
            cls.append(s_loc["cls"])
            plus.append(s_loc["cls_plus"])
        logits = self.student_head(torch.cat([*cls, *plus, z_s.reshape(-1, z_s.shape[-1])]))
        s_cls, s_plus, s_patch = logits.split([views * b, views * b, 2 * b * n_s])
        return {"s_cls": s_cls.reshape(views, b, -1), "s_plus": s_plus.reshape(views, b, -1),
                "s_patch": s_patch.reshape(2, b, n_s, -1), "t_cls": t_cls, "t_patch": t_patch,
                "valid": valid[:, :, :n_s].flip(0), "plus_sum_l": plus_sum_l, "plus_count_l": plus_count_l,
                "valid_local": valid[:, :, n_s:], "dense": s["patches"][:b]}

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        views = self.forward_views(batch)
        dense, valid_local = views.pop("dense"), views.pop("valid_local")
        tt = teacher_temperature_schedule(self.current_epoch, self.temperatures[2], *self.temperatures[:2])
        terms = self.criterion(**views, teacher_temperature=tt)
        terms["teacher_temperature"] = torch.tensor(tt, device=dense.device)
        terms["srs_valid_global"] = views["valid"].float().mean()
        if valid_local.numel():
            terms["srs_valid_local"] = valid_local.float().mean()
        terms["dense"] = dense
        return terms

    # ------------------------------------------------------------------ optimisation
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.clip_grad:
            for p in self.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, self.clip_grad)
        if self.current_epoch < self.freeze_last_layer_epochs:  # DINO: no prototype update in epoch 0
            for p in self.student_head.last_layer.parameters():
                p.grad = None
