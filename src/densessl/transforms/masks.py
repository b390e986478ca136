"""Patch masks: BEiT/iBOT block masks and denseSSL's RCC masks for masked image modelling, and
foreground masks from a ViT's CLS attention (NeCo's fg/bg loss variant).

All masks are bool tensors (h, w) over the patch grid, True = masked (the student sees the mask token
there). Randomness comes from a ``random.Random`` (the data-loader worker's seeded ``random`` module
by default), as the references' loaders do. Written by hand because neither timm nor torchvision
ships these samplers.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from densessl.amp import autocast_off


def sample_pred_ratio(ratios: float | Sequence[float], variances: float | Sequence[float] = 0.0,
                      rng: random.Random | None = None) -> float:
    """iBOT's ``get_pred_ratio``: per entry U(r - v, r + v) (r when v = 0), then one entry at random.

    [0, 0.3] +- [0, 0.2] gives 0 with p = 1/2, else U(0.1, 0.5).
    """
    rng = rng or random
    ratios = [float(ratios)] if isinstance(ratios, (int, float)) else [float(r) for r in ratios]
    if isinstance(variances, (int, float)):
        variances = [float(variances)] * len(ratios)
    variances = [float(v) for v in variances]
    if len(ratios) != len(variances):
        raise ValueError(f"pred_ratio {ratios} and pred_ratio_var {variances} must have the same length")
    if any(v > r for r, v in zip(ratios, variances)) or any(not 0 <= r <= 1 for r in ratios):
        raise ValueError(f"need 0 <= pred_ratio <= 1 and pred_ratio_var <= pred_ratio, got {ratios} +- {variances}")
    drawn = [rng.uniform(r - v, r + v) if v > 0 else r for r, v in zip(ratios, variances)]
    return rng.choice(drawn)


def block_mask(h: int, w: int, ratio: float, aspect: tuple[float, float] = (0.3, 1 / 0.3),
               rng: random.Random | None = None) -> Tensor:
    """BEiT block-wise mask with at most ``ratio * h * w`` masked patches (iBOT ``loader.py``, 'block').

    Rectangles of area U(min(h, w)//3 squared, remaining) and log-uniform aspect are added (10 tries
    each) while they fit in the remaining budget; stops when a round adds nothing.
    """
    rng = rng or random
    mask = np.zeros((h, w), dtype=bool)
    target = ratio * h * w
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    low = (min(h, w) // 3) ** 2
    count = 0
    while count < target:
        budget = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform(low, budget)
            a = math.exp(rng.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(area * a))), int(round(math.sqrt(area / a)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return torch.from_numpy(mask)


def rcc_boxes(scale: tuple[float, float] = (0.12, 0.3), ratio: tuple[float, float] = (0.5, 2.0), grid: int = 3,
              rng: random.Random | None = None) -> list[tuple[float, float, float, float]]:
    """One box (x1, y1, x2, y2) in unit coordinates per cell of a ``grid`` x ``grid`` split of the image
    (denseSSL ``get_bboxs_in_grid``): area U(scale) of the whole image, log-uniform aspect, centre
    uniform in the cell shrunk by a quarter cell on each side, clipped to [0, 1]."""
    rng = rng or random
    cell = 1.0 / grid
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = []
    for gid in range(grid * grid):
        gx, gy = gid % grid, gid // grid
        area = rng.uniform(*scale)
        a = math.exp(rng.uniform(*log_ratio))
        bw, bh = math.sqrt(area * a), math.sqrt(area / a)
        xc = rng.uniform(gx * cell + cell / 4, (gx + 1) * cell - cell / 4)
        yc = rng.uniform(gy * cell + cell / 4, (gy + 1) * cell - cell / 4)
        boxes.append((max(0.0, xc - bw / 2), max(0.0, yc - bh / 2), min(1.0, xc + bw / 2), min(1.0, yc + bh / 2)))
    return boxes


def rcc_mask(h: int, w: int, ratio: float, boxes: Sequence[tuple[float, float, float, float]] | None = None,
             rng: random.Random | None = None) -> Tensor:
    """Region Collaborative Cutout (denseSSL ``loader.py``, ``RCC``): cut ``ratio`` of every box.

    Boxes (default :func:`rcc_boxes`) are processed by decreasing area. For each, f = the fraction
    already cut; if f > ratio the box is restored first (f = 0); then a rectangle of area
    (ratio - f) * box area with the box's aspect is cut at a uniform position inside the box. Returns
    the union of the cuts (True = masked); ratio 0 gives an empty mask.

    As the reference, a cut wider (taller) than its box may start up to a patch before it; that keeps
    the reference's statistics (clipping the cut into the box lowers the mean masked fraction by
    about 0.01-0.02). Differences: x uses the grid width and y the height (the reference scales both
    by the width, equal on square grids), and a start before the grid is clipped to 0 (the reference's
    negative slice start silently drops that cut).
    """
    rng = rng or random
    boxes = list(boxes) if boxes is not None else rcc_boxes(rng=rng)
    keep = np.ones((h, w), dtype=bool)
    for x1f, y1f, x2f, y2f in sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True):
        x2, y2 = min(round(x2f * w), w - 1), min(round(y2f * h), h - 1)
        # A box starting in the last half-cell rounds past the clamped end on small grids: keep one cell.
        x1, y1 = min(round(x1f * w), x2), min(round(y1f * h), y2)
        area = (y2 - y1 + 1) * (x2 - x1 + 1)
        cut = 1.0 - keep[y1:y2 + 1, x1:x2 + 1].sum() / area
        if cut > ratio:
            keep[y1:y2 + 1, x1:x2 + 1] = True
            cut = 0.0
        target = (ratio - cut) * area
        aspect = (x2 - x1 + 1) / (y2 - y1 + 1)
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if cw == 0 or ch == 0:
            continue
        fx, fy = rng.random() * (x2 - x1 - cw) + x1, rng.random() * (y2 - y1 - ch) + y1  # unrounded corner
        cx1, cy1 = max(round(fx), 0), max(round(fy), 0)
        cx2, cy2 = min(round(fx + cw - 1), x2), min(round(fy + ch - 1), y2)
        keep[cy1:cy2 + 1, cx1:cx2 + 1] = False
    return torch.from_numpy(~keep)


class MaskSampler:
    """Draws one mask per view: ratio from :func:`sample_pred_ratio`, shape ``block`` or ``rcc``.

    ``MaskSampler("rcc", [0, 0.4], [0, 0.2])(14, 14)`` is denseSSL's Pretrain.sh setting;
    ``MaskSampler("block", [0, 0.3], [0, 0.2])`` iBOT's ImageNet-1k ViT-S setting.
    """

    def __init__(self, shape: str = "block", ratio: float | Sequence[float] = 0.3,
                 ratio_var: float | Sequence[float] = 0.0, aspect: Sequence[float] = (0.3, 1 / 0.3)) -> None:
        if shape not in ("block", "rcc"):
            raise ValueError(f"unknown mask shape '{shape}'; use 'block' (iBOT) or 'rcc' (denseSSL)")
        self.shape, self.ratio, self.ratio_var = shape, ratio, ratio_var
        self.aspect = (float(aspect[0]), float(aspect[1]))
        sample_pred_ratio(ratio, ratio_var, random.Random(0))  # validate the ratios now, not in a worker

    def __call__(self, h: int, w: int, rng: random.Random | None = None) -> Tensor:
        rng = rng or random
        ratio = sample_pred_ratio(self.ratio, self.ratio_var, rng)
        if self.shape == "block":
            return block_mask(h, w, ratio, self.aspect, rng=rng)
        return rcc_mask(h, w, ratio, rng=rng)


def foreground_mask(attention: Tensor, keep_mass: float = 0.6, blur_sigma: float = 0.6) -> Tensor:
    """Foreground of each map from CLS attention, as NeCo/Leopart ``process_attentions``.

    attention: (B, h, w) non-negative maps (e.g. the head mean of a last-layer CLS attention)
    -> (B, h, w) bool. Each map is Gaussian-blurred (7x7 kernel, ``blur_sigma``), its largest values
    holding ``keep_mass`` of the total are kept, then 8-connected components of at most 2 patches
    are dropped (skimage ``label`` in the reference; scipy's here, same connectivity).
    """
    from scipy import ndimage
    from torchvision.transforms.functional import gaussian_blur

    b, h, w = attention.shape
    with autocast_off(attention.device):  # else the blur's conv2d runs in bf16 under bf16-mixed and the
        # cumulative-mass threshold moves (a quarter of the tokens of a flat random-init map)
        flat = gaussian_blur(attention[:, None].float(), [7, 7], [blur_sigma, blur_sigma]).reshape(b, h * w)
    values, order = flat.sort(dim=1)  # ascending: the tail of the cumulative mass is the foreground
    cumulative = (values / values.sum(1, keepdim=True)).cumsum(1)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, cumulative > 1 - keep_mass)
    keep = keep.reshape(b, h, w).cpu().numpy()
    for mask in keep:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        mask[(sizes <= 2)[labels] & (labels > 0)] = False
    return torch.from_numpy(keep).to(attention.device)
