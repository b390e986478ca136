"""UDI's view geometry and Stratified Random Sampling (SRS) (Su & Ji, ECCV'24; ISL-CV/udi
``udi_augmentation.py``; docs/objectives/udi.md).

Views: :class:`UDIMultiCrop` draws the global view X, then X' and the local crops shifted toward X
(resp. the union of X and X') as the reference code does. Horizontal flips happen later on the
batch's device (:func:`random_hflip`) and are recorded in the boxes: a flipped crop has x0 > x1, i.e.
its left edge sits at image x = x0. Every mapping below is linear in the box, so flips need no special case.

SRS: each crop's token grid is split into ``window`` x ``window`` strata and one cell is drawn per
stratum (:func:`stratified_cells`); the cells' centres are mapped through image coordinates into
another crop (:func:`project_points`), points outside it are dropped (``valid`` mask), and features
there are read bilinearly (:func:`sample_tokens`).

Coordinates: boxes are (x0, y0, x1, y1) in normalised image coordinates (``MultiCropWithBoxes``);
points are (x, y) fractions of a crop, and token (r, c) of an (h, w) grid sits at its patch centre
((c + 0.5) / w, (r + 0.5) / h). Deliberate deviation: the reference puts token a at a / (n - 1)
(corner-aligned), which misplaces tokens by up to half a patch between crops of different scale
(a 96 px local's token 0 is a twelfth of the crop inside its edge, not on it) and, for identical crops,
drops every sample on the outer ring. Patch centres are also the convention of ``transforms.align``.
Valid samples are kept in stratum order with a mask rather than compacted to the front rows
(reference ``_create_map``): the same sums and means.
"""
from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.transforms.multicrop import MultiCropWithBoxes, sample_box

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------------- view geometry
def shift_towards(lo: float, hi: float, ref_lo: float, ref_hi: float, size: float) -> tuple[float, float]:
    """Move the interval [lo, hi] toward [ref_lo, ref_hi] on one axis (reference view shift rule).

    Any gap is closed first; then, if the overlap is at most half the shorter side, the interval moves
    a further half of the shorter side toward the reference's centre; finally it is clamped into
    [0, size]. Returns the new (lo, hi); its length never changes.
    """
    length = hi - lo
    if lo > ref_hi:
        lo = ref_hi
    elif hi < ref_lo:
        lo = ref_lo - length
    half_min = min(length, ref_hi - ref_lo) / 2
    if min(lo + length, ref_hi) - max(lo, ref_lo) <= half_min:
        direction = 1.0 if (ref_lo + ref_hi) / 2 > lo + length / 2 else -1.0
        lo += direction * half_min
    lo = min(max(lo, 0.0), size - length)
    return lo, lo + length


def shift_box(box: Box, ref: Box, width: int, height: int) -> Box:
    """:func:`shift_towards` on both axes; boxes are (x0, y0, x1, y1) in pixels."""
    x0, x1 = shift_towards(box[0], box[2], ref[0], ref[2], width)
    y0, y1 = shift_towards(box[1], box[3], ref[1], ref[3], height)
    return x0, y0, x1, y1


class UDIMultiCrop(MultiCropWithBoxes):
    """Multi-crop with UDI's geometry: X' is shifted toward X, every local toward the union box of X
    and X' (reference ``_crop_intersection`` returns that union; we compute its width correctly where
    the reference uses the row index). Keyword arguments as :class:`MultiCropWithBoxes` (its overlap
    thresholds are not used); exactly two global crops."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.n_global != 2:
            raise ValueError(f"UDI pairs the two global views X and X'; got n_global={self.n_global} "
                             f"(set method.crops.n_global=2)")

    def sample_boxes(self, width: int, height: int, rng: random.Random | None = None) -> list[Box]:
        glob, loc = self.specs
        first = sample_box(width, height, glob.scale, rng=rng)
        second = shift_box(sample_box(width, height, glob.scale, rng=rng), first, width, height)
        union = (min(first[0], second[0]), min(first[1], second[1]), max(first[2], second[2]),
                 max(first[3], second[3]))
        locals_ = [shift_box(sample_box(width, height, loc.scale, rng=rng), union, width, height)
                   for _ in range(loc.count)]
        return [first, second, *locals_]


def random_hflip(crops: Tensor, boxes: Tensor, p: float,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Flip each image of crops (B, C, H, W) with probability p; boxes (B, 4) swap x0 and x1 for the
    flipped ones so that image coordinates stay right. The coin is drawn on the generator's device."""
    dev = generator.device if generator is not None else None
    flip = (torch.rand(crops.shape[0], generator=generator, device=dev) < p).to(crops.device)
    crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
    boxes = torch.where(flip[:, None], boxes[:, [2, 1, 0, 3]], boxes)
    return crops, boxes


# ---------------------------------------------------------------------- stratified random sampling
def stratified_cells(batch: int, grid: tuple[int, int], window: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """One uniformly drawn cell per ``window`` x ``window`` stratum, per image -> flat indices (B, S).

    The strata tile a (h // window * window) x (w // window * window) block anchored at one of the
    four grid corners (p = 1/4 each); leftover rows/columns are never sampled (reference
    ``_sampling_mask``: 14 x 14 with window 3 -> 16 strata, 6 x 6 with window 2 -> 9). Strata are in
    row-major order, S = (h // window) * (w // window). Drawn on the generator's device.
    """
    h, w = grid
    kh, kw = h // window, w // window
    if window < 1 or kh == 0 or kw == 0:
        raise ValueError(f"SRS window {window} does not fit the {h}x{w} token grid; use a window between 1 "
                         f"and {min(h, w)} (method.srs_window_global / srs_window_local)")
    dev = generator.device if generator is not None else None
    corner = torch.randint(0, 2, (batch, 2), generator=generator, device=dev)
    off_r, off_c = corner[:, 0] * (h - kh * window), corner[:, 1] * (w - kw * window)
    dr = torch.randint(0, window, (batch, kh, kw), generator=generator, device=dev)
    dc = torch.randint(0, window, (batch, kh, kw), generator=generator, device=dev)
    rows = off_r[:, None, None] + torch.arange(kh, device=dev)[None, :, None] * window + dr
    cols = off_c[:, None, None] + torch.arange(kw, device=dev)[None, None, :] * window + dc
    return (rows * w + cols).reshape(batch, kh * kw)


def cell_centres(cells: Tensor, grid: tuple[int, int]) -> Tensor:
    """Flat cell indices (B, S) -> their patch centres (B, S, 2) as (x, y) fractions of the crop."""
    h, w = grid
    return torch.stack([(cells % w + 0.5) / w, (cells // w + 0.5) / h], dim=-1)


def project_points(points: Tensor, src_boxes: Tensor, tgt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Crop fractions (B, S, 2) in the source crop -> (fractions in the target crop (B, S, 2), valid (B, S)).

    Boxes (B, 4) in image coordinates (flipped crops have x0 > x1). A point is valid when it lies
    strictly inside the target crop, as the reference's strict inequality.
    """
    src0, src1 = src_boxes[:, None, :2], src_boxes[:, None, 2:]
    tgt0, tgt1 = tgt_boxes[:, None, :2], tgt_boxes[:, None, 2:]
    image = src0 + points * (src1 - src0)
    out = (image - tgt0) / (tgt1 - tgt0)
    return out, ((out > 0) & (out < 1)).all(-1)


def sample_tokens(tokens: Tensor, grid: tuple[int, int], points: Tensor) -> Tensor:
    """Bilinear read of tokens (B, N, D) on an (h, w) grid at crop fractions (B, S, 2) -> (B, S, D).

    ``align_corners=False`` puts token centres at (i + 0.5) / n, matching :func:`cell_centres`;
    points between the outer centres and the crop edge take the edge token (the reference clamps
    its neighbour indices the same way).
    """
    b, n, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, *grid)
    out = F.grid_sample(fmap, (points * 2 - 1)[:, :, None, :].to(fmap.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)  # (B, D, S, 1)
    return out[..., 0].transpose(1, 2)


def gather_tokens(tokens: Tensor, cells: Tensor) -> Tensor:
    """tokens (B, N, D) at flat cells (B, S) -> (B, S, D): the student's one-hot sampling rows."""
    return tokens.gather(1, cells[..., None].expand(-1, -1, tokens.shape[-1]))
