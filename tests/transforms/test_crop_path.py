"""MultiCropWithBoxes' torch crop path: the crops PIL would cut from the same boxes, and the same boxes."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.functional import pil_to_tensor

from densessl.data import read_image
from densessl.transforms import MultiCropWithBoxes

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def photo_like(width: int = 320, height: int = 240) -> Image.Image:
    """Blurred noise: structure at every position, so a crop from a shifted box does not match."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.filter(ImageFilter.GaussianBlur(1.5))


def pil_crop(image: Image.Image, box: list[float], size: int, interpolation: str) -> torch.Tensor:
    return pil_to_tensor(image.crop(tuple(int(v) for v in box)).resize((size, size), RESAMPLE[interpolation]))


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crops_equal_pil_crop_and_resize_of_the_returned_boxes(interpolation):
    image = photo_like()
    mc = MultiCropWithBoxes(global_size=96, local_size=40, n_global=2, n_local=3, interpolation=interpolation)
    scale = torch.tensor([320, 240, 320, 240])
    random.seed(0)
    for _ in range(5):
        out = mc(image)
        sizes = [96, 96, 40, 40, 40]
        for crop, box, size in zip(out["crops"], (out["boxes"] * scale).tolist(), sizes):
            assert crop.dtype == torch.uint8 and crop.shape == (3, size, size)
            assert all(v == round(v) for v in box)  # whole pixels: the torch path is exact
            ref = pil_crop(image, box, size, interpolation)
            assert mean_abs(crop, ref) < 0.5 and (crop.int() - ref.int()).abs().max() <= 3
            # PIL's resize(box=...) (the previous path) also reads pixels just outside the box: borders differ
            assert mean_abs(crop, pil_to_tensor(image.resize((size, size), RESAMPLE[interpolation], box=box))) < 3
            # the check can see a crop 2 px off
            dx = 2 if box[2] + 2 <= 320 else -2
            assert mean_abs(crop, pil_crop(image, [box[0] + dx, box[1], box[2] + dx, box[3]], size, interpolation)) > 3


def test_the_crop_path_leaves_the_boxes_and_the_random_stream_unchanged():
    image = photo_like()
    mc = MultiCropWithBoxes(global_size=64, local_size=32, n_global=2, n_local=4)
    random.seed(3)
    outs = [mc(image) for _ in range(4)]
    after = random.random()
    random.seed(3)
    expected = [mc.sample_boxes(320, 240) for _ in range(4)]
    assert random.random() == after  # cropping draws nothing
    for out, boxes in zip(outs, expected):
        torch.testing.assert_close(out["boxes"], torch.tensor(boxes) / torch.tensor([320.0, 240.0, 320.0, 240.0]))


def test_fractional_box_goes_through_pils_subpixel_resize():
    image = photo_like()
    mc = MultiCropWithBoxes(global_size=48, local_size=24)
    box = (10.5, 20.0, 110.5, 100.0)  # UDI's shifted views can be half-pixel
    crop = mc.resized_crop(image, pil_to_tensor(image)[None], box, 48)
    assert torch.equal(crop, pil_to_tensor(image.resize((48, 48), Image.BILINEAR, box=box)))


def test_jpeg_decoded_by_read_image_crops_like_pil(tmp_path):
    path = tmp_path / "a.jpg"
    photo_like().save(path, quality=90)
    image = read_image(path)
    assert image.mode == "RGB"
    mc = MultiCropWithBoxes(global_size=64, local_size=32, n_global=1, n_local=2)
    random.seed(1)
    out = mc(image)
    boxes = (out["boxes"] * torch.tensor([320, 240, 320, 240])).tolist()
    for crop, box, size in zip(out["crops"], boxes, [64, 32, 32]):
        assert mean_abs(crop, pil_crop(image, box, size, "bilinear")) < 0.5


def test_grey_and_unknown_interpolation():
    grey = Image.open(io.BytesIO(_jpeg(photo_like().convert("L"))))
    out = MultiCropWithBoxes(global_size=32, local_size=16, n_global=1, n_local=1)(grey)
    assert [c.shape for c in out["crops"]] == [(3, 32, 32), (3, 16, 16)]
    with pytest.raises(ValueError, match="interpolation"):
        MultiCropWithBoxes(interpolation="nearest")


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()
