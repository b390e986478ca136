"""RoI alignment of patch grids between overlapping crops."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align


def intersection(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """(..., 4) x (..., 4) boxes (x0, y0, x1, y1) in image coordinates -> their intersection (..., 4).
    Empty intersections come back with x1 <= x0 or y1 <= y0."""
    return torch.cat([torch.maximum(boxes_a[..., :2], boxes_b[..., :2]),
                      torch.minimum(boxes_a[..., 2:], boxes_b[..., 2:])], dim=-1)


def to_crop_frame(region: Tensor, crop: Tensor, grid: tuple[int, int]) -> Tensor:
    """Express image-coordinate boxes ``region`` (..., 4) in the token-grid frame of ``crop`` (..., 4).

    Tokens per crop are (h, w) = ``grid``; the result is in token units (token i spans [i, i+1)).
    Using the real grid instead of size/patch fixes NeCo quirk (iii): 98 px crops at patch 16 have a
    6-token grid, not 6.125 (reference: src/neco.py divides boxes by the patch size).
    """
    cw = (crop[..., 2] - crop[..., 0]).clamp_min(1e-8)
    ch = (crop[..., 3] - crop[..., 1]).clamp_min(1e-8)
    h, w = grid
    x0 = (region[..., 0] - crop[..., 0]) / cw * w
    x1 = (region[..., 2] - crop[..., 0]) / cw * w
    y0 = (region[..., 1] - crop[..., 1]) / ch * h
    y1 = (region[..., 3] - crop[..., 1]) / ch * h
    return torch.stack([x0, y0, x1, y1], dim=-1)


def align_tokens(tokens: Tensor, grid: tuple[int, int], boxes: Tensor, output_size: int = 7) -> Tensor:
    """Bilinearly sample an ``output_size``^2 grid of features inside each box.

    tokens: (B, N, D) with N = h*w; boxes: (B, P, 4) in token units (``to_crop_frame``).
    Returns (B, P, output_size**2, D). ``aligned=True`` treats token i's centre as i + 0.5.
    """
    b, n, d = tokens.shape
    h, w = grid
    fmap = tokens.transpose(1, 2).reshape(b, d, h, w)
    p = boxes.shape[1]
    idx = torch.arange(b, device=tokens.device, dtype=boxes.dtype).repeat_interleave(p)[:, None]
    rois = torch.cat([idx, boxes.reshape(-1, 4).to(tokens.dtype)], dim=1)
    out = roi_align(fmap, rois.to(fmap.dtype), output_size=output_size, spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)  # (B*P, D, o, o)
    return out.flatten(2).transpose(1, 2).reshape(b, p, output_size * output_size, d)
