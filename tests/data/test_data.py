"""Synthetic VOC generator, dataset layout checks and the joint segmentation transform."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats

import densessl.data.synthetic as synthetic
from densessl.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ADE20KSegmentation,
    BadImageError,
    ImageFolderDataset,
    SegTransform,
    VOCSegmentation,
    ensure_synthetic_voc,
    make_synthetic_voc,
    read_image,
    skipped_files,
    voc_colormap,
)

SMALL = dict(n_train=4, n_val=2, size=96)


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_split(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _labels(root: Path, folder: str, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / folder / f"{name}.png"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """60 + 30 scenes at 128 px: enough instances (~300) for the colour statistics test."""
    return make_synthetic_voc(tmp_path_factory.mktemp("synth") / "voc", n_train=60, n_val=30, size=128)


@pytest.fixture
def small_voc(tmp_path) -> Path:
    return make_synthetic_voc(tmp_path / "VOC2012", n_train=2, n_val=1, size=64)


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def test_generator_is_deterministic(tmp_path):
    a = _tree_hash(make_synthetic_voc(tmp_path / "a", seed=0, **SMALL))
    b = _tree_hash(make_synthetic_voc(tmp_path / "b", seed=0, **SMALL))
    c = _tree_hash(make_synthetic_voc(tmp_path / "c", seed=1, **SMALL))
    assert a == b
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 6
    assert all(a[k] != c[k] for k in jpgs)


def test_voc_colormap_matches_reference_entries():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    # Values from the VOC devkit's labelcolormap: background, aeroplane, bicycle, person, ignore.
    assert cmap[[0, 1, 2, 15, 255]].tolist() == [
        [0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128], [224, 224, 192],
    ]


def test_layout_and_label_values(scenes):
    train, val = _read_split(scenes, "train"), _read_split(scenes, "val")
    assert len(train) == 60 and len(val) == 30 and not set(train) & set(val)
    classes = (scenes / "classes.txt").read_text().split("\n")[:-1]
    assert classes == list(synthetic.SYNTHETIC_CLASSES)
    assert json.loads((scenes / "params.json").read_text())["n_train"] == 60
    seen = set()
    for name in train + val:
        image = Image.open(scenes / "JPEGImages" / f"{name}.jpg")
        assert image.mode == "RGB" and image.size == (128, 128)
        for folder in ("SegmentationClass", "SegmentationObject"):
            png = Image.open(scenes / folder / f"{name}.png")
            assert png.mode == "P" and png.size == (128, 128)
            assert np.array_equal(np.array(png.getpalette()).reshape(-1, 3), voc_colormap())
        values = set(np.unique(_labels(scenes, "SegmentationClass", name)).tolist())
        assert values <= set(range(len(classes))) | {255}
        seen |= values
    assert seen == set(range(len(classes))) | {255}


def test_num_classes_limits_object_classes(tmp_path):
    root = make_synthetic_voc(tmp_path / "v", n_train=8, n_val=1, size=96, num_classes=3)
    assert (root / "classes.txt").read_text().split() == ["background", "disc", "square"]
    for name in _read_split(root, "train"):
        assert set(np.unique(_labels(root, "SegmentationClass", name)).tolist()) <= {0, 1, 2, 255}
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_voc(tmp_path / "w", num_classes=9, **SMALL)


def test_every_image_has_two_visible_instances(scenes):
    for name in _read_split(scenes, "train") + _read_split(scenes, "val"):
        inst = _labels(scenes, "SegmentationObject", name)
        ids, counts = np.unique(inst[(inst != 0) & (inst != 255)], return_counts=True)
        assert (counts >= 50).sum() >= 2, name


def _instance_colours(root: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB and class of every visible instance."""
    colours, classes = [], []
    for name in names:
        image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg"), dtype=np.float64)
        cls, inst = _labels(root, "SegmentationClass", name), _labels(root, "SegmentationObject", name)
        for k in set(np.unique(inst).tolist()) - {0, 255}:
            pixels = inst == k
            colours.append(image[pixels].mean(0))
            classes.append(int(np.bincount(cls[pixels]).argmax()))
    return np.array(colours), np.array(classes)


def test_colour_does_not_identify_the_class(scenes):
    """Nearest class-mean colour must be near chance; it would be ~100 % if colour gave the class."""
    x_tr, y_tr = _instance_colours(scenes, _read_split(scenes, "train"))
    x_va, y_va = _instance_colours(scenes, _read_split(scenes, "val"))
    classes = np.unique(y_tr)
    assert len(classes) == 6 and len(y_va) > 60
    centroids = np.stack([x_tr[y_tr == c].mean(0) for c in classes])
    pred = classes[np.linalg.norm(x_va[:, None] - centroids[None], axis=-1).argmin(1)]
    assert (pred == y_va).mean() < 0.4  # chance = 1/6
    # One-way ANOVA per channel: between-class over within-class variance is ~1 when colour is
    # independent of the class (it would be in the hundreds for class-specific colours).
    f_stat = stats.f_oneway(*[x_tr[y_tr == c] for c in classes]).statistic
    assert np.all(f_stat < 4.0), f_stat


def test_colour_does_not_identify_the_image(scenes):
    """The mean colour of an image's left half must not find its right half among the 90 scenes.

    Chance is 1/90; generator version 2 (three of twelve colours per scene) reached 0.32, which made even
    random-init tokens image codes. Every scene now shares one four-colour palette: 0.07.
    """
    halves = []
    for name in _read_split(scenes, "train") + _read_split(scenes, "val"):
        image = np.asarray(Image.open(scenes / "JPEGImages" / f"{name}.jpg"), dtype=np.float64)
        w = image.shape[1] // 2
        halves.append((image[:, :w].reshape(-1, 3).mean(0), image[:, w:].reshape(-1, 3).mean(0)))
    left, right = map(np.array, zip(*halves))
    found = np.linalg.norm(left[:, None] - right[None], axis=-1).argmin(1) == np.arange(len(left))
    assert found.mean() < 0.15, found.mean()


def test_ignore_band_separates_every_pair_of_labels(scenes):
    """With ignore_width=3 no two different labels lie within 3 px (Chebyshev) of each other."""
    for name in _read_split(scenes, "train")[:20]:
        cls = _labels(scenes, "SegmentationClass", name).astype(np.int32)
        assert 0.0 < (cls == 255).mean() < 0.2
        valid = np.where(cls == 255, -1, cls)
        near_max = ndimage.maximum_filter(valid, size=7)
        near_min = ndimage.minimum_filter(np.where(cls == 255, 1000, cls), size=7)
        labelled = cls != 255
        assert np.all(near_max[labelled] == cls[labelled]), name
        assert np.all(near_min[labelled] == cls[labelled]), name


def test_objects_are_textured_and_the_background_is_not_flat(scenes):
    name = _read_split(scenes, "train")[0]
    image = np.asarray(Image.open(scenes / "JPEGImages" / f"{name}.jpg"), dtype=np.float64)
    cls = _labels(scenes, "SegmentationClass", name)
    inside = ndimage.binary_erosion((cls > 0) & (cls < 255), iterations=2)
    assert image[inside].std(0).mean() > 30  # two-colour texture, not a flat fill
    assert image[cls == 0].std(0).mean() > 20  # cluttered background


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_ensure_synthetic_voc_reuses_and_regenerates(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSESSL_CACHE", str(tmp_path / "cache"))
    root = ensure_synthetic_voc(**SMALL)
    assert root == tmp_path / "cache" / "synthetic_voc"
    first = _tree_hash(root)

    def fail(*args, **kwargs):
        raise AssertionError("cache was not reused")

    real_make = synthetic.make_synthetic_voc
    monkeypatch.setattr(synthetic, "make_synthetic_voc", fail)
    assert ensure_synthetic_voc(**SMALL) == root and _tree_hash(root) == first

    monkeypatch.setattr(synthetic, "make_synthetic_voc", real_make)
    ensure_synthetic_voc(**{**SMALL, "n_val": 3})  # params changed -> regenerated in place
    assert len(_read_split(root, "val")) == 3
    assert sorted(p.name for p in root.parent.iterdir()) == ["synthetic_voc"]  # no temp leftovers
    with pytest.raises(TypeError, match="unknown synthetic dataset parameters"):
        ensure_synthetic_voc(n_imgs=3)


def test_ensure_synthetic_voc_keeps_the_winner_of_a_race(tmp_path, monkeypatch):
    """Another process publishes the same data while we generate: keep theirs, drop our temp."""
    root = tmp_path / "voc"
    real_make = synthetic.make_synthetic_voc

    def make_while_other_process_publishes(out, **params):
        real_make(root, **params)  # the "other process" wins the rename
        (root / "winner").touch()
        return real_make(out, **params)

    monkeypatch.setattr(synthetic, "make_synthetic_voc", make_while_other_process_publishes)
    assert ensure_synthetic_voc(root, **SMALL) == root
    assert (root / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]


# ---------------------------------------------------------------------------------------------
# Datasets: layout errors
# ---------------------------------------------------------------------------------------------


def _assert_layout_message(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    for fragment in ("Expected layout:", "data.root=", *fragments):
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"


def test_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(tmp_path / "nope")
    _assert_layout_message(err, "does not exist", str(tmp_path / "nope"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(tmp_path / "empty", config_key="train.data.root")
    assert "no files with extensions" in str(err.value) and "train.data.root=" in str(err.value)


def test_image_folder_is_recursive_and_sorted(tmp_path):
    for rel in ("b/2.png", "a/1.JPEG", "0.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 6), 7).save(tmp_path / rel, format="PNG" if rel.endswith("png") else "JPEG")
    (tmp_path / "a" / "labels.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["0.jpg", "a/1.JPEG", "b/2.png"]
    assert ds[1].mode == "RGB" and ds[1].size == (8, 6)
    assert ImageFolderDataset(tmp_path, transform=lambda im: im.size)[2] == (8, 6)


def test_voc_missing_root_and_folders(tmp_path, small_voc):
    with pytest.raises(FileNotFoundError) as err:
        VOCSegmentation(tmp_path / "missing")
    _assert_layout_message(err, "does not exist", "VOCdevkit/VOC2012")
    shutil.rmtree(small_voc / "JPEGImages")
    with pytest.raises(FileNotFoundError) as err:
        VOCSegmentation(small_voc)
    _assert_layout_message(err, "missing folder", str(small_voc / "JPEGImages"))


def test_voc_missing_split_file(small_voc):
    (small_voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        VOCSegmentation(small_voc, split="val")
    _assert_layout_message(err, "val.txt", "found: ['train.txt']")


def test_voc_pointing_at_vocdevkit_gives_the_right_path(tmp_path):
    inner = make_synthetic_voc(tmp_path / "VOCdevkit" / "VOC2012", n_train=1, n_val=1, size=64)
    for wrong in (tmp_path / "VOCdevkit", tmp_path):
        with pytest.raises(FileNotFoundError) as err:
            VOCSegmentation(wrong)
        _assert_layout_message(err, "is not the VOC2012 folder", f"set data.root={inner}")
    assert len(VOCSegmentation(inner)) == 1


def test_voc_missing_listed_file(small_voc):
    name = _read_split(small_voc, "train")[1]
    (small_voc / "SegmentationClass" / f"{name}.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        VOCSegmentation(small_voc)
    _assert_layout_message(err, "1 of 4 listed files are missing", f"{name}.png")


def test_voc_trainaug(small_voc):
    with pytest.raises(FileNotFoundError) as err:
        VOCSegmentation(small_voc, split="trainaug")
    _assert_layout_message(err, "SegmentationClassAug", "SBD")
    shutil.copytree(small_voc / "SegmentationClass", small_voc / "SegmentationClassAug")
    with pytest.raises(FileNotFoundError) as err:
        VOCSegmentation(small_voc, split="trainaug")
    _assert_layout_message(err, "trainaug.txt")
    split_dir = small_voc / "ImageSets" / "Segmentation"
    shutil.copy(split_dir / "train.txt", split_dir / "train_aug.txt")
    ds = VOCSegmentation(small_voc, split="trainaug")
    assert len(ds) == 2 and ds.masks[0].parent.name == "SegmentationClassAug"
    with pytest.raises(ValueError, match="split must be one of"):
        VOCSegmentation(small_voc, split="test")


def test_voc_items_and_metadata(small_voc):
    ds = VOCSegmentation(small_voc, split="train")
    assert (ds.num_classes, ds.ignore_index) == (7, 255)
    assert ds.class_names[:3] == ("background", "disc", "square")
    image, mask = ds[0]
    assert image.mode == "RGB" and mask.mode == "P" and image.size == mask.size == (64, 64)
    image, mask = VOCSegmentation(small_voc, transform=SegTransform(32))[1]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64


def test_corrupt_image_error_names_the_file_and_the_option(small_voc, tmp_path):
    ds = VOCSegmentation(small_voc)
    ds.images[0].write_bytes(ds.images[0].read_bytes()[:200])  # truncated JPEG
    with pytest.raises(BadImageError, match=f"cannot read image {ds.images[0]}.*data.on_bad_image=skip"):
        ds[0]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "bad.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(BadImageError, match="cannot read image .*bad.jpg"):
        ImageFolderDataset(tmp_path / "folder")[0]


def test_skip_bad_image_logs_counts_and_serves_the_next(small_voc, caplog):
    ds = VOCSegmentation(small_voc, on_bad_image="skip")
    half = ds.images[0].read_bytes()
    ds.images[0].write_bytes(half[: len(half) // 2])  # a JPEG cut in half
    with caplog.at_level("WARNING", logger="densessl"):
        image, mask = ds[0]
        ds[0]  # the same file again: logged and counted once
    assert image.size == mask.size and np.array_equal(np.asarray(mask), np.asarray(ds[1][1]))
    assert skipped_files(torch.utils.data.Subset(ds, [0, 1])) == [ds.images[0]]
    assert len(caplog.records) == 1 and str(ds.images[0]) in caplog.text and "1 skipped" in caplog.text
    with pytest.raises(ValueError, match="data.on_bad_image must be 'error' or 'skip'"):
        VOCSegmentation(small_voc, on_bad_image="ignore")


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    gradient = (np.arange(64 * 256, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)  # 0..65532
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # I;16 (or I in older Pillow)
    rgb = np.asarray(read_image(tmp_path / "g16.png")).astype(np.float64)
    assert rgb.shape == (64, 256, 3) and np.abs(rgb - (gradient / 257.0)[..., None]).max() <= 1.0
    as_int = Image.fromarray(gradient.astype(np.int32))  # mode I
    as_float = Image.fromarray((gradient / 65535.0).astype(np.float32))  # mode F in [0, 1]
    for im, name in ((as_int, "i.tif"), (as_float, "f.tif")):
        im.save(tmp_path / name)
        assert np.abs(np.asarray(read_image(tmp_path / name))[..., 0] - gradient / 257.0).max() <= 1.0


def test_mask_ids_outside_the_classes_name_the_file(small_voc):
    ds = VOCSegmentation(small_voc)  # 7 classes (classes.txt)
    labels = np.asarray(Image.open(ds.masks[1])).copy()
    labels[:4, :4] = 30
    mask = Image.fromarray(labels, mode="P")
    mask.putpalette(voc_colormap().flatten().tolist())
    mask.save(ds.masks[1])
    ds[0]  # the other masks are fine (255 = ignore is allowed)
    with pytest.raises(ValueError) as err:
        ds[1]
    msg = str(err.value)
    assert str(ds.masks[1]) in msg and "[30]" in msg and "num_classes=7" in msg
    assert f"data.root={small_voc}" in msg and "data=" in msg


def test_coco_image_folder_hints_name_data_root(tmp_path):
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(coco / "train2017" / "000000000009.jpg")
    hints = {coco: "mv train2017 images/", coco / "train2017": f"set data.root={coco},"}
    for root, hint in hints.items():
        with pytest.raises(FileNotFoundError) as err:
            ImageFolderDataset(root, subdir="images/train2017")
        assert hint in str(err.value) and "images/train2017/" in str(err.value), str(err.value)
    (coco / "images").mkdir()
    (coco / "train2017").rename(coco / "images" / "train2017")
    for root in (coco / "images", coco / "images" / "train2017"):
        with pytest.raises(FileNotFoundError, match=f"set data.root={coco}\\n"):
            ImageFolderDataset(root, subdir="images/train2017")
    assert len(ImageFolderDataset(coco, subdir="images/train2017")) == 1


def test_colour_rendered_mask_is_rejected(small_voc):
    ds = VOCSegmentation(small_voc)
    Image.open(ds.masks[0]).convert("RGB").save(ds.masks[0])
    with pytest.raises(ValueError, match="colour-rendered"):
        ds[0]


def _fake_ade(root: Path, split: str = "validation") -> Path:
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    Image.new("RGB", (3, 2), (10, 20, 30)).save(root / "images" / split / "ADE_val_00000001.jpg")
    Image.fromarray(np.array([[0, 1, 150], [2, 0, 75]], dtype=np.uint8), mode="L").save(
        root / "annotations" / split / "ADE_val_00000001.png"
    )
    return root


def test_ade20k_reduce_zero_label(tmp_path):
    root = _fake_ade(tmp_path / "ADEChallengeData2016")
    ds = ADE20KSegmentation(root, split="val")  # alias of "validation"
    assert (ds.num_classes, ds.ignore_index, len(ds.class_names)) == (150, 255, 150)
    assert ds.class_names[0] == "wall" and ds.class_names[-1] == "flag"
    _, mask = ds[0]
    assert np.asarray(mask).tolist() == [[255, 0, 149], [1, 255, 74]]
    raw = ADE20KSegmentation(root, split="validation", reduce_zero_label=False)
    assert raw.num_classes == 151 and raw.class_names[0] == "other"
    assert np.asarray(raw[0][1]).tolist() == [[0, 1, 150], [2, 0, 75]]


def test_ade20k_layout_errors(tmp_path):
    root = _fake_ade(tmp_path / "ADEChallengeData2016")
    with pytest.raises(FileNotFoundError) as err:
        ADE20KSegmentation(tmp_path, split="validation")
    _assert_layout_message(err, "is not the ADEChallengeData2016 folder", f"set data.root={root}")
    with pytest.raises(FileNotFoundError) as err:
        ADE20KSegmentation(root, split="training")
    _assert_layout_message(err, "missing folder", str(root / "images" / "training"))
    (root / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ADE20KSegmentation(root, split="validation")
    _assert_layout_message(err, "ADE_val_00000001.png")


# ---------------------------------------------------------------------------------------------
# SegTransform
# ---------------------------------------------------------------------------------------------


def test_seg_transform_resizes_and_normalises():
    mean_colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    image = Image.new("RGB", (40, 20), mean_colour)
    mask = Image.fromarray(np.repeat(np.array([[0, 3, 255, 7]], dtype=np.uint8), 20, 0).repeat(10, 1))
    x, m = SegTransform((10, 8))(image, mask)
    assert x.shape == (3, 10, 8) and x.dtype == torch.float32
    assert x.abs().max() < 0.5 / 255 / min(IMAGENET_STD)  # mean colour -> ~0
    assert m.shape == (10, 8) and m.dtype == torch.int64
    assert m[0].tolist() == [0, 0, 3, 3, 255, 255, 7, 7]  # nearest: no blended label values

    x, m = SegTransform(16, normalize=False, mask_size=None)(image, mask)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    assert m.shape == (20, 40) and torch.equal(m, torch.from_numpy(np.array(mask, dtype=np.int64)))


@pytest.mark.parametrize("size", [(13, 17), (71, 53)])  # (h, w): downscale and upscale, non-integer factors
def test_seg_transform_mask_equals_pil_nearest(size):
    # The NeCo/Leopart references resize ground-truth masks with PIL NEAREST (not torch "nearest").
    labels = np.random.default_rng(0).integers(0, 21, size=(31, 37), dtype=np.uint8)  # (h, w)
    mask = Image.fromarray(labels)
    _, m = SegTransform(size)(Image.new("RGB", mask.size), mask)
    expected = np.array(mask.resize(size[::-1], Image.NEAREST), dtype=np.int64)
    assert m.shape == size and np.array_equal(m.numpy(), expected)


def test_seg_transform_train_mode():
    image = Image.new("RGB", (50, 40))
    mask = Image.fromarray(np.full((40, 50), 4, dtype=np.uint8))
    torch.manual_seed(0)
    x, m = SegTransform(24, train=True)(image, mask)
    assert x.shape == (3, 24, 24) and m.shape == (24, 24) and set(m.unique().tolist()) == {4}
    with pytest.raises(ValueError, match="mask_size='same'"):
        SegTransform(24, train=True, mask_size=None)
    with pytest.raises(ValueError, match="size must be"):
        SegTransform((24, 24, 3))


def test_seg_transform_train_crop_resizes_the_mask_as_pil_nearest():
    # NeCo's linear_finetuning_transforms crop the PIL target with NEAREST (= "nearest-exact"): the crop
    # (torchvision's RandomResizedCrop parameters, then p=0.5 flip) is read back from the same seed.
    import torchvision.transforms as T

    labels = np.random.default_rng(2).integers(0, 21, size=(45, 61), dtype=np.uint8)
    mask = Image.fromarray(labels)
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        _, m = SegTransform(29, train=True, crop_scale=(0.3, 1.0))(Image.new("RGB", mask.size), mask)
        torch.manual_seed(seed)
        i, j, h, w = T.RandomResizedCrop.get_params(torch.empty(1, 45, 61), (0.3, 1.0), (3 / 4, 4 / 3))
        flip = bool(torch.rand(()) < 0.5)
        expected = mask.crop((j, i, j + w, i + h)).resize((29, 29), Image.NEAREST)
        if flip:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        flips.add(flip)
        assert np.array_equal(m.numpy(), np.array(expected, dtype=np.int64)), seed
    assert flips == {True, False}


# ---------------------------------------------------------------------------------------------
# Data safety: the generator never replaces a folder it did not make
# ---------------------------------------------------------------------------------------------


def _voc_like_user_folder(root: Path) -> dict[str, str]:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "JPEGImages" / "2007_000032.jpg").write_bytes(b"the user's image")
    (root / "notes.txt").write_text("mine")
    return _tree_hash(root)


def test_ensure_synthetic_voc_refuses_a_users_folder_and_leaves_it_untouched(tmp_path):
    user = tmp_path / "VOC2012"
    before = _voc_like_user_folder(user)
    with pytest.raises(synthetic.ForeignFolderError, match=r"data\.root=.*VOC2012.*data=voc") as err:
        ensure_synthetic_voc(user, **SMALL)
    assert "Nothing was changed" in str(err.value)
    assert _tree_hash(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2012"]  # no temp folder left behind
    with pytest.raises(synthetic.ForeignFolderError):  # the writer itself refuses too
        make_synthetic_voc(user, **SMALL)
    assert _tree_hash(user) == before


def test_foreign_folder_with_matching_params_json_is_still_refused(tmp_path):
    """A params.json alone (e.g. a copy, or another tool's file) is not the generator's marker."""
    user = tmp_path / "data"
    user.mkdir()
    wanted = {**synthetic.DEFAULT_PARAMS, **SMALL, "version": synthetic.GENERATOR_VERSION}
    (user / "params.json").write_text(json.dumps(wanted))
    (user / "experiment.csv").write_text("1,2,3")
    before = _tree_hash(user)
    with pytest.raises(synthetic.ForeignFolderError, match="data=imagefolder"):
        ensure_synthetic_voc(user, **SMALL)
    assert _tree_hash(user) == before


def test_generated_folder_holding_a_users_files_is_not_regenerated(tmp_path):
    """The marker licenses replacing the generator's own files, not files a user added later."""
    root = tmp_path / "scenes"
    make_synthetic_voc(root, **SMALL)
    (root / "runs").mkdir()
    (root / "runs" / "my_run.ckpt").write_bytes(b"weights")
    (root / "JPEGImages" / "holiday.jpg").write_bytes(b"photo")
    before = _tree_hash(root)
    with pytest.raises(synthetic.ForeignFolderError, match=r"JPEGImages/holiday\.jpg.*runs/my_run\.ckpt"):
        ensure_synthetic_voc(root, **{**SMALL, "n_val": 3})
    assert _tree_hash(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]  # no temp folder left behind
    # The same parameters are reused as they are: nothing to replace, so nothing to refuse.
    assert ensure_synthetic_voc(root, **SMALL) == root and _tree_hash(root) == before


def test_generated_and_empty_folders_are_writable(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_synthetic_voc(empty, **SMALL) / synthetic.MARKER).is_file()
    # A folder written before the marker existed (params.json + our README.txt) is still ours.
    legacy = tmp_path / "legacy"
    make_synthetic_voc(legacy, **SMALL)
    (legacy / synthetic.MARKER).unlink()
    ensure_synthetic_voc(legacy, **{**SMALL, "n_val": 3})
    assert len(_read_split(legacy, "val")) == 3 and (legacy / synthetic.MARKER).is_file()
    with pytest.raises(synthetic.ForeignFolderError, match="is a file"):
        ensure_synthetic_voc(tmp_path / "empty" / "params.json", **SMALL)
