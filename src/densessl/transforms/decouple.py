"""De-coupling batch ("Mind Your Augmentation", ICLR'24; ztt1024/denseSSL ``main_ibot.py``).

Extra rows are appended to both global views: copies of the last 2n images of the view whose patch
embeddings are partly replaced by those of a partner image (the batch flipped), so their own
tokens must keep the features they have in their true context. The reference encodes this as mask
value 2 in the MIM masks; here it is a separate bool ``replaced`` mask per view (reference mask 2 =
``replaced``, 1 = ``masks``), and the loss set of a de-coupled row is ``~replaced``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DecoupledViews:
    """Global views with de-coupled rows appended (per view N + 2n rows).

    crops: per view (N + 2n, 3, H, W); masks: per view (N + 2n, h, w) MIM masks (False on the extra
    rows: de-coupled rows never get mask tokens); replaced: per view (N + 2n, h, w), True where the
    row's patch embedding is replaced by its partner's (False on the N regular rows); n: rows per half.
    """

    crops: list[Tensor]
    masks: list[Tensor]
    replaced: list[Tensor]
    n: int


def build_decoupled_views(crops: list[Tensor], masks: list[Tensor], sample_ratio: float = 0.25) -> DecoupledViews:
    """Append the de-coupled rows to two global views (before colour augmentation).

    crops: 2 x (N, 3, H, W); masks: 2 x (N, h, w) bool MIM masks. The replaced sets are taken from the
    batch's non-empty masks (view 1's, then view 2's, the first 2 floor(N r)); n = floor(count / 4).
    View 1 gets rows replacing pool[0:n] and the complement of pool[n:2n], view 2 pool[2n:3n] and
    the complement of pool[3n:4n]; the images are copies of each view's last 2n rows.

    Decisions on the reference's quirks (numbered as in ``methods/ibot.py``):
    (ii) with fewer than 4 non-empty masks n = 0 and the batch is returned unchanged (the reference
         skips de-coupling too; its ``[-0:]`` slice then re-augments the whole batch, which is moot
         here since colour augmentation runs once, afterwards, with per-sample draws: duplicates get
         independent colour draws, the reference's net effect).
    (iv) the masks come from whichever sampler the method uses (RCC in the DC presets).
    """
    if len(crops) != 2 or len(masks) != 2:
        raise ValueError(f"de-coupling needs exactly the 2 global views and their masks, "
                         f"got {len(crops)} / {len(masks)}")
    n_img = crops[0].shape[0]
    pool = torch.cat([m[m.flatten(1).any(1)] for m in masks])[: 2 * int(n_img * sample_ratio)]
    n = pool.shape[0] // 4
    no_replace = [torch.zeros_like(m) for m in masks]
    if n == 0:
        return DecoupledViews(list(crops), list(masks), no_replace, 0)
    extra = [torch.cat([pool[:n], ~pool[n:2 * n]]), torch.cat([pool[2 * n:3 * n], ~pool[3 * n:4 * n]])]
    return DecoupledViews(
        crops=[torch.cat([c, c[-2 * n:]]) for c in crops],
        masks=[torch.cat([m, torch.zeros_like(e)]) for m, e in zip(masks, extra)],
        replaced=[torch.cat([z, e]) for z, e in zip(no_replace, extra)],
        n=n,
    )


def mix_partner_embeddings(x: Tensor, replaced: Tensor) -> Tensor:
    """Replace patch embeddings by the flipped batch's, without gradient (denseSSL ``prepare_tokens``).

    x: (B, N, D) patch embeddings of both views concatenated; replaced: (B, N) bool. Row i takes row
    B - 1 - i's embedding where ``replaced`` is set, so a view-1 de-coupled row j gets its context from
    view-2 regular image 2n - 1 - j and vice versa; the background is detached (quirk (iii)): it gives
    no gradient to the patch embedding through the partner.
    """
    return torch.where(replaced[..., None], x.flip(0).detach(), x)
