"""Real-data datasets (COCO / ImageNet-style folders, Pascal VOC 2012, ADE20K) with layout checks.

Every dataset checks its folder layout in ``__init__`` and raises ``FileNotFoundError`` with the
expected tree, what is missing and the config key to set, so a wrong path fails at start-up,
not hours into a run. See ``data/README.md`` for download and preparation steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision import tv_tensors

from densessl.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KSegmentation",
    "IGNORE_INDEX",
    "ImageFolderDataset",
    "SegTransform",
    "VOCSegmentation",
    "VOC_CLASSES",
    "read_image",
    "read_mask",
]

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The 150 SceneParsing classes in label order 1..150 (names as in mmsegmentation's ADE20KDataset).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop",
    "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

JointTransform = Callable[[Image.Image, Image.Image], tuple[torch.Tensor, torch.Tensor]]

_IMAGE_FOLDER_TREE = """\
<root>/                     flat (COCO):           or class subfolders (ImageNet):
|-- 000000000009.jpg        <root>/ = train2017/   <root>/n01440764/xxx.JPEG
|-- 000000000025.jpg                               <root>/n01443537/yyy.JPEG
`-- ...                     (searched recursively)"""

_VOC_TREE = """\
<root>/                        = VOCdevkit/VOC2012
|-- JPEGImages/                2007_000027.jpg ...
|-- SegmentationClass/         2007_000032.png ...  (splits train, val; palette PNG, 255 = ignore)
|-- SegmentationClassAug/      2007_000032.png ...  (split trainaug only; SBD masks, grey PNG)
`-- ImageSets/Segmentation/    train.txt, val.txt, trainaug.txt (one image id per line)"""

_ADE_TREE = """\
<root>/                        = ADEChallengeData2016
|-- images/
|   |-- training/              ADE_train_00000001.jpg ...
|   `-- validation/            ADE_val_00000001.jpg ...
`-- annotations/
    |-- training/              ADE_train_00000001.png ...  (0 = other, 1..150 = classes)
    `-- validation/            ADE_val_00000001.png ..."""


def _layout_error(
    dataset: str, problem: str, tree: str, config_key: str, example: str, hint: str = ""
) -> FileNotFoundError:
    lines = [f"{dataset}: {problem}"]
    if hint:
        lines.append(f"Hint: {hint}")
    lines += [
        "Expected layout:",
        tree,
        f"Set the dataset root with `{config_key}=/path/to/{example}` (see data/README.md).",
    ]
    return FileNotFoundError("\n".join(lines))


def read_image(path: str | Path) -> Image.Image:
    """Load an RGB PIL image; unreadable/corrupt files raise RuntimeError naming the path."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for bad/truncated files
        raise RuntimeError(f"cannot read image {path}: {err}") from err


def read_mask(path: str | Path) -> Image.Image:
    """Load a label PNG whose pixel values are class ids (PIL mode 'P' or 'L')."""
    try:
        with Image.open(path) as im:
            im.load()
            mask = im.copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise RuntimeError(f"cannot read image {path}: {err}") from err
    if mask.mode not in ("P", "L"):
        raise ValueError(
            f"mask {path} has PIL mode {mask.mode!r}; expected a palette ('P') or grey ('L') PNG "
            "whose values are class ids (colour-rendered masks are not label maps)"
        )
    return mask


def _check_dir(path: Path, dataset: str, tree: str, key: str, example: str, hint: str = "") -> None:
    if not path.is_dir():
        raise _layout_error(dataset, f"missing folder {path}", tree, key, example, hint)


def _check_root(root: Path, dataset: str, tree: str, key: str, example: str, marker: str | None = None,
                inner: Sequence[str] = ()) -> None:
    """``root`` must be a folder. If it lacks the ``marker`` folder but one of the ``inner`` subfolders
    has it (a download unpacked one level too high), the error names that subfolder."""
    if not root.is_dir():
        raise _layout_error(dataset, f"dataset root {root} does not exist or is not a folder", tree, key, example)
    if marker is not None and not (root / marker).is_dir():
        for sub in inner:
            if (root / sub / marker).is_dir():
                raise _layout_error(
                    dataset, f"{root} is not the {Path(sub).name} folder", tree, key, example,
                    hint=f"it contains the dataset one level down: set {key}={root / sub}",
                )


def _check_listed_files(
    paths: Sequence[Path], dataset: str, tree: str, key: str, example: str
) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n".join(f"  {p}" for p in missing[:5])
        raise _layout_error(
            dataset, f"{len(missing)} of {len(paths)} listed files are missing, e.g.\n{shown}",
            tree, key, example,
        )


class ImageFolderDataset(Dataset):
    """Unlabelled images found recursively under ``root`` (COCO train2017, ImageNet train, ...).

    Files are sorted by path, so indices are deterministic. ``__getitem__`` returns
    ``transform(image)`` for an RGB PIL image, or the PIL image when ``transform`` is None.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], object] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        config_key: str = "data.root",
    ) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        name, example = "ImageFolderDataset", "images"
        _check_root(self.root, name, _IMAGE_FOLDER_TREE, config_key, example)
        exts = tuple(e.lower() for e in extensions)
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file()
        )
        if not self.files:
            raise _layout_error(
                name, f"no files with extensions {exts} under {self.root} (searched recursively)",
                _IMAGE_FOLDER_TREE, config_key, example,
                hint="is the archive still zipped, or does the root point at an annotations folder?",
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = read_image(self.files[index])
        return self.transform(image) if self.transform is not None else image


class _SegmentationDataset(Dataset):
    """Pairs of (image path, mask path); subclasses fill ``images``/``masks``/``class_names``."""

    ignore_index = IGNORE_INDEX
    images: list[Path]
    masks: list[Path]
    class_names: tuple[str, ...]

    def __init__(self, transform: JointTransform | None) -> None:
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def _load_mask(self, index: int) -> Image.Image:
        return read_mask(self.masks[index])

    def __getitem__(self, index: int):
        """``(image, mask)``: PIL RGB + PIL label map, or ``transform(image, mask)``."""
        image, mask = read_image(self.images[index]), self._load_mask(index)
        if image.size != mask.size:
            raise ValueError(
                f"image {self.images[index]} is {image.size} but mask {self.masks[index]} is {mask.size}"
            )
        return self.transform(image, mask) if self.transform is not None else (image, mask)


class VOCSegmentation(_SegmentationDataset):
    """Pascal VOC 2012 semantic segmentation (21 classes, 255 = ignore).

    ``root`` is the VOC2012 folder (``VOCdevkit/VOC2012``). Splits: ``train`` and ``val`` read
    ``SegmentationClass/``; ``trainaug`` (10,582 images with the SBD extra masks) reads
    ``SegmentationClassAug/`` and ``ImageSets/Segmentation/trainaug.txt`` (``train_aug.txt`` is
    accepted too). The synthetic scenes (``densessl.data.synthetic``) use the same layout; when
    ``root/classes.txt`` exists it gives the class names (one per line).
    """

    SPLITS = ("train", "trainaug", "val")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: JointTransform | None = None,
        config_key: str = "data.root",
    ) -> None:
        super().__init__(transform)
        if split not in self.SPLITS:
            raise ValueError(f"VOCSegmentation split must be one of {self.SPLITS}, got {split!r}")
        self.root, self.split = Path(root).expanduser(), split
        name, tree, example = f"VOCSegmentation({split!r})", _VOC_TREE, "VOCdevkit/VOC2012"
        _check_root(self.root, name, tree, config_key, example, "JPEGImages", ("VOC2012", "VOCdevkit/VOC2012"))
        _check_dir(self.root / "JPEGImages", name, tree, config_key, example)
        mask_dir = self.root / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        _check_dir(
            mask_dir, name, tree, config_key, example,
            hint="trainaug needs the SBD masks (SegmentationClassAug.zip), see data/README.md"
            if split == "trainaug" else "",
        )
        split_dir = self.root / "ImageSets" / "Segmentation"
        names = ("trainaug.txt", "train_aug.txt") if split == "trainaug" else (f"{split}.txt",)
        split_file = next((split_dir / n for n in names if (split_dir / n).is_file()), None)
        if split_file is None:
            present = sorted(p.name for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
            raise _layout_error(
                name, f"missing split file {split_dir / names[0]} (found: {present or 'none'})",
                tree, config_key, example,
                hint="build trainaug.txt as described in data/README.md" if split == "trainaug" else "",
            )
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise _layout_error(name, f"split file {split_file} is empty", tree, config_key, example)
        self.images = [self.root / "JPEGImages" / f"{i}.jpg" for i in ids]
        self.masks = [mask_dir / f"{i}.png" for i in ids]
        _check_listed_files(self.images + self.masks, name, tree, config_key, example)
        classes_file = self.root / "classes.txt"
        self.class_names = (
            tuple(c.strip() for c in classes_file.read_text().splitlines() if c.strip())
            if classes_file.is_file()
            else VOC_CLASSES
        )


# 0 -> 255 (ignore), c -> c - 1, 255 stays ignore (as mmsegmentation's reduce_zero_label).
_REDUCE_ZERO_LUT = np.concatenate([[255], np.arange(255)]).astype(np.uint8)
_REDUCE_ZERO_LUT[255] = 255


class ADE20KSegmentation(_SegmentationDataset):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes.

    Raw labels are 0 = "other" (unlabelled) and 1..150. With ``reduce_zero_label=True`` (default,
    the mmsegmentation convention) masks are remapped 0 -> 255 (ignore) and c -> c - 1, giving
    ``num_classes = 150``; with False the raw ids are kept and "other" is class 0 (151 classes).
    ``split`` is ``training`` or ``validation`` (``train``/``val`` are accepted as aliases).
    """

    _ALIASES = {"train": "training", "val": "validation"}

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transform: JointTransform | None = None,
        reduce_zero_label: bool = True,
        config_key: str = "data.root",
    ) -> None:
        super().__init__(transform)
        split = self._ALIASES.get(split, split)
        if split not in ("training", "validation"):
            raise ValueError(
                f"ADE20KSegmentation split must be 'training' or 'validation', got {split!r}"
            )
        self.root, self.split = Path(root).expanduser(), split
        self.reduce_zero_label = reduce_zero_label
        name, tree, example = f"ADE20KSegmentation({split!r})", _ADE_TREE, "ADEChallengeData2016"
        _check_root(self.root, name, tree, config_key, example, "images", ("ADEChallengeData2016",))
        image_dir, mask_dir = self.root / "images" / split, self.root / "annotations" / split
        _check_dir(image_dir, name, tree, config_key, example)
        _check_dir(mask_dir, name, tree, config_key, example)
        self.images = sorted(image_dir.glob("*.jpg"))
        if not self.images:
            raise _layout_error(name, f"no .jpg images in {image_dir}", tree, config_key, example)
        self.masks = [mask_dir / f"{p.stem}.png" for p in self.images]
        _check_listed_files(self.masks, name, tree, config_key, example)
        self.class_names = ADE20K_CLASSES if reduce_zero_label else ("other", *ADE20K_CLASSES)

    def _load_mask(self, index: int) -> Image.Image:
        mask = read_mask(self.masks[index])
        if not self.reduce_zero_label:
            return mask
        return Image.fromarray(_REDUCE_ZERO_LUT[np.asarray(mask)], mode="L")


class SegTransform:
    """Joint image/mask transform for segmentation evaluation (and light training augmentation).

    ``transform(image: PIL RGB, mask: PIL label map) -> (image (3, h, w), mask (h', w') int64)``.
    The image is resized bilinearly (antialiased) to ``size``; the mask with nearest neighbour to
    ``mask_size`` ("same" = ``size``; None = keep the original resolution, as evaluators that
    upsample predictions to full resolution need). The image is float and ImageNet-normalised
    when ``normalize`` is True, else uint8. ``train=True`` replaces the resize with a joint
    RandomResizedCrop(scale=crop_scale) + horizontal flip (uses torch's global RNG, which
    DataLoader seeds per worker).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        normalize: bool = True,
        train: bool = False,
        mask_size: int | tuple[int, int] | str | None = "same",
        crop_scale: tuple[float, float] = (0.5, 1.0),
    ) -> None:
        self.size = self._pair(size)
        self.mask_size = self.size if mask_size == "same" else mask_size
        if self.mask_size is not None:
            self.mask_size = self._pair(self.mask_size)
        if train and self.mask_size != self.size:
            raise ValueError("SegTransform(train=True) crops image and mask jointly: use mask_size='same'")
        self.normalize, self.train = normalize, train
        self.augment = v2.Compose(
            [v2.RandomResizedCrop(self.size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip()]
        )

    @staticmethod
    def _pair(size: int | tuple[int, int] | str) -> tuple[int, int]:
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return (size[0], size[1])
        raise ValueError(f"size must be an int or an (h, w) pair of ints, got {size!r}")

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = tv_tensors.Image(TF.pil_to_tensor(image.convert("RGB")))
        msk = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.int64)))
        if self.train:
            img, msk = self.augment(img, msk)
        else:
            img = TF.resize(img, list(self.size), antialias=True)
            if self.mask_size is not None:
                msk = TF.resize(msk, list(self.mask_size))  # Mask -> nearest neighbour
        img, msk = img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)
        if self.normalize:
            img = TF.normalize(img.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        return img, msk
