import random

import torch
from PIL import Image

from densessl.transforms import (ColorAugment, MultiCropWithBoxes, align_tokens, collate_multicrop,
                                 intersection, to_crop_frame)
from densessl.transforms.multicrop import _overlap_area


def _coordinate_tokens(box, grid):
    """Tokens whose features are the image coordinates (x, y) of their centres: a linear field,
    which bilinear RoI sampling reproduces exactly."""
    h, w = grid
    x0, y0, x1, y1 = box
    xs = x0 + (torch.arange(w) + 0.5) / w * (x1 - x0)
    ys = y0 + (torch.arange(h) + 0.5) / h * (y1 - y0)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], -1).reshape(1, h * w, 2)


def test_roi_alignment_matches_a_known_shift():
    crop_a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    crop_b = torch.tensor([[0.25, 0.375, 0.75, 0.875]])  # shifted and zoomed
    region = intersection(crop_a, crop_b)
    torch.testing.assert_close(region, crop_b)
    grid = (8, 8)
    ta, tb = _coordinate_tokens(crop_a[0].tolist(), grid), _coordinate_tokens(crop_b[0].tolist(), grid)
    fa = align_tokens(ta, grid, to_crop_frame(region[:, None], crop_a[:, None], grid), 7)
    fb = align_tokens(tb, grid, to_crop_frame(region[:, None], crop_b[:, None], grid), 7)
    assert fa.shape == (1, 1, 49, 2)
    fa, fb = fa.reshape(7, 7, 2), fb.reshape(7, 7, 2)
    # Interior bins are exact in both frames: the image coordinates of the region's bin centres.
    centres_x = 0.25 + (torch.arange(7) + 0.5) / 7 * 0.5
    centres_y = 0.375 + (torch.arange(7) + 0.5) / 7 * 0.5
    torch.testing.assert_close(fa[1:-1, 1:-1], fb[1:-1, 1:-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(fa[3, 1:-1, 0], centres_x[1:-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(fa[1:-1, 3, 1], centres_y[1:-1], atol=1e-5, rtol=0)
    # Border bins of crop b reach past its outermost token centres, where roi_align clamps
    # (as the reference does): they stay within a fraction of a token of the truth.
    assert (fb[0, :, 0] - centres_x).abs().max() < 0.5 / 8 * 0.5


def test_to_crop_frame_uses_real_grid():
    # 98 px crop at patch 16 has a 6-token grid (NeCo quirk iii): the whole crop maps to [0, 6].
    crop = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    torch.testing.assert_close(to_crop_frame(crop, crop, (6, 6)), torch.tensor([[0.0, 0.0, 6.0, 6.0]]))


def test_multicrop_boxes_overlap_globals_and_match_crops():
    image = Image.new("RGB", (200, 150))
    mc = MultiCropWithBoxes(global_size=32, local_size=16, n_global=2, n_local=3)
    random.seed(0)
    for _ in range(20):
        out = mc(image)
        assert [c.shape[-1] for c in out["crops"]] == [32, 32, 16, 16, 16]
        boxes = out["boxes"] * torch.tensor([200, 150, 200, 150])
        for i in range(1, 5):
            need = 0.02 if i < 2 else 0.01
            for g in range(min(i, 2)):
                assert _overlap_area(boxes[i].tolist(), boxes[g].tolist()) > need * 200 * 150
    batch = collate_multicrop([mc(image), mc(image)])
    assert batch["crops"][0].shape == (2, 3, 32, 32) and batch["boxes"].shape == (2, 5, 4)


def test_color_augment_keeps_shape_and_normalises():
    x = torch.full((4, 3, 16, 16), 128, dtype=torch.uint8)
    aug = ColorAugment(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    y = aug(x)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(y[:, :, 0, 0], expected.expand(4, 3))
    assert ColorAugment()(x).shape == (4, 3, 16, 16)


def test_color_augment_channel_shuffle_and_invert_remap_colours_only():
    from densessl.constants import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    x = torch.zeros(64, 3, 4, 4, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 200, 100, 0  # one colour per channel: a permutation is visible
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    plain = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    rgb = (ColorAugment(**plain, channel_shuffle_p=1.0)(x) * std + mean) * 255
    # every pixel keeps its three values in some order, the same order over the image; not always RGB
    assert torch.allclose(rgb.sort(dim=1).values, torch.tensor([0.0, 100, 200]).view(1, 3, 1, 1).expand_as(rgb), atol=1e-3)
    assert torch.allclose(rgb, rgb[:, :, :1, :1].expand_as(rgb))
    assert len({tuple(v) for v in rgb[:, :, 0, 0].round().tolist()}) > 2
    inv = (ColorAugment(**plain, invert_p=1.0)(x) * std + mean) * 255
    torch.testing.assert_close(inv, 255 - x.float(), atol=1e-3, rtol=0)


def test_foreground_mask_keeps_the_attended_blob_and_drops_specks():
    from densessl.transforms.masks import foreground_mask

    attention = torch.full((2, 8, 8), 0.01)
    attention[0, 2:5, 2:5] = 1.0  # a 3x3 blob ...
    attention[0, 7, 7] = 1.0  # ... and a one-patch speck, dropped (components of <= 2 patches)
    attention[1, 0:4, 0:8] = 1.0  # half the image
    mask = foreground_mask(attention)
    assert mask.dtype == torch.bool and mask.shape == (2, 8, 8)
    assert not mask[0, 7, 7] and mask[0, 3, 3] and not mask[0, 0, 0]
    assert mask[0].sum() <= 9 and mask[1, :4].sum() > mask[1, 4:].sum()
    # the kept fraction of the blurred mass is ~keep_mass
    assert foreground_mask(attention, keep_mass=0.99)[0].sum() > mask[0].sum()
