"""Real-data datasets (COCO / ImageNet-style folders, Pascal VOC 2012, ADE20K) with layout checks.

Every dataset checks its folder layout in ``__init__`` and raises ``FileNotFoundError`` with the
expected tree, what is missing and the config key to set, so a wrong path fails at start-up,
not hours into a run. See ``data/README.md`` for download and preparation steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from torchvision import tv_tensors

from densessl.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KSegmentation",
    "BadImageError",
    "IGNORE_INDEX",
    "ImageFolderDataset",
    "SegTransform",
    "SegmentationDataset",
    "VOCSegmentation",
    "VOC_CLASSES",
    "check_dir",
    "check_listed_files",
    "check_root",
    "layout_error",
    "read_image",
    "read_mask",
    "skipped_files",
]

log = logging.getLogger("densessl")

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

_SUBDIR_TREE = """\
<root>/                     = the dataset folder, e.g. coco/
`-- {subdir:<24}000000000009.jpg ...  (searched recursively)"""

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


def layout_error(
    dataset: str, problem: str, tree: str, config_key: str, example: str, hint: str = ""
) -> FileNotFoundError:
    """The FileNotFoundError for a dataset folder that does not match ``tree``, naming ``config_key``."""
    lines = [f"{dataset}: {problem}"]
    if hint:
        lines.append(f"Hint: {hint}")
    lines += [
        "Expected layout:",
        tree,
        f"Set the dataset root with `{config_key}=/path/to/{example}` (see data/README.md).",
    ]
    return FileNotFoundError("\n".join(lines))


class BadImageError(ValueError):
    """An image or mask file that does not decode (truncated, corrupt, not an image)."""


# PIL modes of high-bit-depth greyscale (16-bit PNG/TIFF: I;16*, 32-bit int: I, float: F), which
# PIL's convert("RGB") clips at 255 instead of scaling (a 16-bit image comes out nearly white).
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth greyscale -> 'L': 16-bit values / 257 (I and F are read as 16-bit values;
    F images within [0, 1] as fractions of white)."""
    values = np.asarray(im).astype(np.float64)
    if im.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 65535.0
    return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")


def read_image(path: str | Path) -> Image.Image:
    """Load an RGB PIL image (high-bit-depth greyscale scaled to 8 bits); files that do not decode
    raise BadImageError naming the path."""
    try:
        with Image.open(path) as im:
            im.load()
            im = _to_8bit(im) if im.mode in _HIGH_BIT_MODES else im
            # An RGB file is returned as decoded: convert("RGB") would only copy it.
            return im if im.mode == "RGB" else im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for bad/truncated files
        raise BadImageError(f"cannot read image {path}: {err}") from err


def read_mask(path: str | Path) -> Image.Image:
    """Load a label PNG whose pixel values are class ids (PIL mode 'P' or 'L')."""
    try:
        with Image.open(path) as im:
            im.load()
            mask = im.copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"cannot read mask {path}: {err}") from err
    if mask.mode not in ("P", "L"):
        raise ValueError(
            f"mask {path} has PIL mode {mask.mode!r}; expected a palette ('P') or grey ('L') PNG "
            "whose values are class ids (colour-rendered masks are not label maps)"
        )
    return mask


def check_dir(path: Path, dataset: str, tree: str, key: str, example: str, hint: str = "") -> None:
    """Raise :func:`layout_error` unless ``path`` is a folder."""
    if not path.is_dir():
        raise layout_error(dataset, f"missing folder {path}", tree, key, example, hint)


def check_root(root: Path, dataset: str, tree: str, key: str, example: str, marker: str | None = None,
               inner: Sequence[str] = ()) -> None:
    """``root`` must be a folder. If it lacks the ``marker`` folder but one of the ``inner`` subfolders
    has it (a download unpacked one level too high), the error names that subfolder."""
    if not root.is_dir():
        raise layout_error(dataset, f"dataset root {root} does not exist or is not a folder", tree, key, example)
    if marker is not None and not (root / marker).is_dir():
        for sub in inner:
            if (root / sub / marker).is_dir():
                raise layout_error(
                    dataset, f"{root} is not the {Path(sub).name} folder", tree, key, example,
                    hint=f"it contains the dataset one level down: set {key}={root / sub}",
                )


def check_listed_files(
    paths: Sequence[Path], dataset: str, tree: str, key: str, example: str
) -> None:
    """Raise :func:`layout_error` naming the first missing files if any of ``paths`` is not a file."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n".join(f"  {p}" for p in missing[:5])
        raise layout_error(
            dataset, f"{len(missing)} of {len(paths)} listed files are missing, e.g.\n{shown}",
            tree, key, example,
        )


class _FileDataset(Dataset):
    """Items read from files, with the ``data.on_bad_image`` policy for files that do not decode.

    ``error`` raises naming the file and the option; ``skip`` logs the file once (logger "densessl"),
    marks it and serves the next readable item instead, so a long run survives a few corrupt files.
    Subclasses fill their file lists before calling ``__init__`` and implement ``_item``/``_path``.
    """

    def __init__(self, on_bad_image: str, config_key: str) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.on_bad_image, self.config_key = on_bad_image, config_key
        # (len,) bool in shared memory: DataLoader workers mark what they skip where the main process
        # reads it (skipped_files).
        self._skipped = torch.zeros(len(self), dtype=torch.bool).share_memory_() if on_bad_image == "skip" else None

    def _item(self, index: int):
        raise NotImplementedError

    def _path(self, index: int) -> Path:
        raise NotImplementedError

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                return self._item(i)
            except BadImageError as err:
                if self._skipped is None:
                    raise BadImageError(f"{err}. Replace or delete that file, or set data.on_bad_image=skip to "
                                        f"skip files that do not decode (each is logged and counted)") from err
                if not self._skipped[i]:
                    self._skipped[i] = True
                    log.warning("data.on_bad_image=skip: %s; skipped, the next image is used instead (%d skipped so "
                                "far)", err, int(self._skipped.sum()))
        raise BadImageError(f"no file under {self.config_key} decodes; every item was skipped")


def skipped_files(dataset: object) -> list[Path]:
    """The files ``dataset`` skipped under ``data.on_bad_image=skip`` so far, in any DataLoader worker
    (wrappers with a ``.dataset``, such as Subset, are unwrapped)."""
    while not isinstance(dataset, _FileDataset) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    marks = getattr(dataset, "_skipped", None)
    return [] if marks is None else [dataset._path(int(i)) for i in marks.nonzero().flatten()]


def _subdir_hint(root: Path, subdir: Path, key: str) -> str:
    """Why ``root / subdir`` is missing, for the usual mistakes (root inside the dataset, images one
    level up, images not unpacked)."""
    for k in range(len(subdir.parts), 0, -1):  # root is images/ or images/train2017 itself
        if root.parts[-k:] == subdir.parts[:k]:
            return f"{root} is inside the dataset folder: set {key}={root.parents[k - 1]}"
    if root.name == subdir.name:
        return f"{root} is the image folder itself: set {key}={root.parent}, with the images in {subdir}/ below it"
    if (root / subdir.name).is_dir():
        return (f"the images sit in {root / subdir.name}: move them with `cd {root} && mkdir -p {subdir.parent} "
                f"&& mv {subdir.name} {subdir.parent}/`")
    return f"unpack the images into {root / subdir} (COCO: unzip train2017.zip -d {root / subdir.parent})"


class ImageFolderDataset(_FileDataset):
    """Unlabelled images found recursively under ``root`` (or ``root/subdir``: COCO's
    ``images/train2017``), e.g. COCO train2017 or ImageNet train.

    Files are sorted by path, so indices are deterministic. ``__getitem__`` returns
    ``transform(image)`` for an RGB PIL image, or the PIL image when ``transform`` is None.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], object] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        config_key: str = "data.root",
        subdir: str | None = None,
        on_bad_image: str = "error",
    ) -> None:
        name, example, tree = "ImageFolderDataset", "images", _IMAGE_FOLDER_TREE
        root = Path(root).expanduser()
        if subdir is not None:
            example, tree = "coco", _SUBDIR_TREE.format(subdir=f"{subdir}/")
            check_root(root, name, tree, config_key, example)
            check_dir(root / subdir, name, tree, config_key, example, _subdir_hint(root, Path(subdir), config_key))
            root = root / subdir
        self.root, self.transform = root, transform
        check_root(self.root, name, tree, config_key, example)
        exts = tuple(e.lower() for e in extensions)
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file()
        )
        if not self.files:
            raise layout_error(
                name, f"no files with extensions {exts} under {self.root} (searched recursively)",
                tree, config_key, example,
                hint="is the archive still zipped, or does the root point at an annotations folder?",
            )
        super().__init__(on_bad_image, config_key)

    def __len__(self) -> int:
        return len(self.files)

    def _path(self, index: int) -> Path:
        return self.files[index]

    def _item(self, index: int):
        image = read_image(self.files[index])
        return self.transform(image) if self.transform is not None else image


class SegmentationDataset(_FileDataset):
    """Pairs of (image path, mask path); subclasses fill ``root``/``split``/``images``/``masks``/
    ``class_names`` before calling ``__init__``."""

    ignore_index = IGNORE_INDEX
    root: Path
    split: str
    images: list[Path]
    masks: list[Path]
    class_names: tuple[str, ...]

    def __init__(self, transform: JointTransform | None, on_bad_image: str, config_key: str) -> None:
        self.transform = transform
        super().__init__(on_bad_image, config_key)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def _path(self, index: int) -> Path:
        return self.images[index]

    def _load_mask(self, index: int) -> Image.Image:
        return read_mask(self.masks[index])

    def _item(self, index: int):
        """``(image, mask)``: PIL RGB + PIL label map, or ``transform(image, mask)``."""
        image, mask = read_image(self.images[index]), self._load_mask(index)
        if image.size != mask.size:
            raise ValueError(
                f"image {self.images[index]} is {image.size} but mask {self.masks[index]} is {mask.size}"
            )
        self._check_labels(np.asarray(mask), index)
        return self.transform(image, mask) if self.transform is not None else (image, mask)

    def _check_labels(self, labels: np.ndarray, index: int) -> None:
        """Class ids outside [0, num_classes) other than the ignore label: a clear error here, naming the
        file, instead of an index error deep in an evaluator."""
        c = self.num_classes
        if labels.size == 0 or labels.max() < c:
            return
        bad = np.unique(labels[(labels >= c) & (labels != self.ignore_index)])
        if bad.size:
            raise ValueError(
                f"mask {self.masks[index]} holds class ids {bad[:8].tolist()} outside 0..{c - 1} (and not the "
                f"ignore label {self.ignore_index}), but the data config's dataset {type(self).__name__}"
                f"({self.split!r}) at {self.config_key}={self.root} has num_classes={c}. Fix or remove that "
                f"mask, or choose the data= config (and data.classes) of the label set these masks use "
                f"(data/README.md)."
            )


class VOCSegmentation(SegmentationDataset):
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
        on_bad_image: str = "error",
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"VOCSegmentation split must be one of {self.SPLITS}, got {split!r}")
        self.root, self.split = Path(root).expanduser(), split
        name, tree, example = f"VOCSegmentation({split!r})", _VOC_TREE, "VOCdevkit/VOC2012"
        check_root(self.root, name, tree, config_key, example, "JPEGImages", ("VOC2012", "VOCdevkit/VOC2012"))
        check_dir(self.root / "JPEGImages", name, tree, config_key, example)
        mask_dir = self.root / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        check_dir(
            mask_dir, name, tree, config_key, example,
            hint="trainaug needs the SBD masks (SegmentationClassAug.zip), see data/README.md"
            if split == "trainaug" else "",
        )
        split_dir = self.root / "ImageSets" / "Segmentation"
        names = ("trainaug.txt", "train_aug.txt") if split == "trainaug" else (f"{split}.txt",)
        split_file = next((split_dir / n for n in names if (split_dir / n).is_file()), None)
        if split_file is None:
            present = sorted(p.name for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
            raise layout_error(
                name, f"missing split file {split_dir / names[0]} (found: {present or 'none'})",
                tree, config_key, example,
                hint="build trainaug.txt as described in data/README.md" if split == "trainaug" else "",
            )
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise layout_error(name, f"split file {split_file} is empty", tree, config_key, example)
        self.images = [self.root / "JPEGImages" / f"{i}.jpg" for i in ids]
        self.masks = [mask_dir / f"{i}.png" for i in ids]
        check_listed_files(self.images + self.masks, name, tree, config_key, example)
        classes_file = self.root / "classes.txt"
        self.class_names = (
            tuple(c.strip() for c in classes_file.read_text().splitlines() if c.strip())
            if classes_file.is_file()
            else VOC_CLASSES
        )
        super().__init__(transform, on_bad_image, config_key)


# 0 -> 255 (ignore), c -> c - 1, 255 stays ignore (as mmsegmentation's reduce_zero_label).
_REDUCE_ZERO_LUT = np.concatenate([[255], np.arange(255)]).astype(np.uint8)
_REDUCE_ZERO_LUT[255] = 255


class ADE20KSegmentation(SegmentationDataset):
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
        on_bad_image: str = "error",
    ) -> None:
        split = self._ALIASES.get(split, split)
        if split not in ("training", "validation"):
            raise ValueError(
                f"ADE20KSegmentation split must be 'training' or 'validation', got {split!r}"
            )
        self.root, self.split = Path(root).expanduser(), split
        self.reduce_zero_label = reduce_zero_label
        name, tree, example = f"ADE20KSegmentation({split!r})", _ADE_TREE, "ADEChallengeData2016"
        check_root(self.root, name, tree, config_key, example, "images", ("ADEChallengeData2016",))
        image_dir, mask_dir = self.root / "images" / split, self.root / "annotations" / split
        check_dir(image_dir, name, tree, config_key, example)
        check_dir(mask_dir, name, tree, config_key, example)
        self.images = sorted(image_dir.glob("*.jpg"))
        if not self.images:
            raise layout_error(name, f"no .jpg images in {image_dir}", tree, config_key, example)
        self.masks = [mask_dir / f"{p.stem}.png" for p in self.images]
        check_listed_files(self.masks, name, tree, config_key, example)
        self.class_names = ADE20K_CLASSES if reduce_zero_label else ("other", *ADE20K_CLASSES)
        super().__init__(transform, on_bad_image, config_key)

    def _load_mask(self, index: int) -> Image.Image:
        mask = read_mask(self.masks[index])
        if not self.reduce_zero_label:
            return mask
        return Image.fromarray(_REDUCE_ZERO_LUT[np.asarray(mask)], mode="L")


_MASK_INTERPOLATION = ("pil", "nearest")


class SegTransform:
    """Joint image/mask transform for segmentation evaluation (and light training augmentation).

    ``transform(image: PIL RGB, mask: PIL label map) -> (image (3, h, w), mask (h', w') int64)``.
    The image is resized bilinearly (antialiased) to ``size``; the mask with nearest neighbour to
    ``mask_size`` ("same" = ``size``; None = keep the original resolution, as evaluators that upsample
    predictions to full resolution need): by PIL's ``Image.NEAREST`` itself (``mask_interpolation="pil"``,
    as the NeCo/Leopart target transforms; torch "nearest-exact" is the same rule but can pick a
    neighbouring pixel where PIL's coordinate rounding differs), or by torch "nearest" (``"nearest"``, as
    open-hummingbird-eval, which resizes its targets as tensors; it picks other pixels). The image is
    float and ImageNet-normalised when ``normalize`` is True, else uint8. ``train=True`` replaces the
    resize with a joint RandomResizedCrop(scale=crop_scale) + horizontal flip, the mask cut and resized
    by the same rule (uses torch's global RNG, which DataLoader seeds per worker).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        normalize: bool = True,
        train: bool = False,
        mask_size: int | tuple[int, int] | str | None = "same",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        mask_interpolation: str = "pil",
    ) -> None:
        if mask_interpolation not in _MASK_INTERPOLATION:
            raise ValueError(f"mask_interpolation must be one of {_MASK_INTERPOLATION}, got {mask_interpolation!r}")
        self.mask_interpolation = mask_interpolation
        self.size = self._pair(size)
        self.mask_size = self.size if mask_size == "same" else mask_size
        if self.mask_size is not None:
            self.mask_size = self._pair(self.mask_size)
        if train and self.mask_size != self.size:
            raise ValueError("SegTransform(train=True) crops image and mask jointly: use mask_size='same'")
        self.normalize, self.train = normalize, train
        self.crop_scale = tuple(crop_scale)

    @staticmethod
    def _pair(size: int | tuple[int, int] | str) -> tuple[int, int]:
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return (size[0], size[1])
        raise ValueError(f"size must be an int or an (h, w) pair of ints, got {size!r}")

    def _resize_mask(self, mask: Image.Image, msk: torch.Tensor, size: tuple[int, int],
                     box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """The label map ``msk`` (= ``mask`` as int64) cut to ``box`` (top, left, height, width), at ``size``."""
        if self.mask_interpolation == "pil" and isinstance(mask, Image.Image):
            if box is not None:
                top, left, height, width = box
                mask = mask.crop((left, top, left + width, top + height))
            mask = mask.resize((size[1], size[0]), Image.NEAREST)
            return tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.int64)))
        if box is not None:
            msk = TF.crop(msk, *box)
        mode = InterpolationMode.NEAREST if self.mask_interpolation == "nearest" else InterpolationMode.NEAREST_EXACT
        return TF.resize(msk, list(size), interpolation=mode)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = tv_tensors.Image(TF.pil_to_tensor(image.convert("RGB")))
        msk = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.int64)))
        if self.train:
            # torchvision's RandomResizedCrop parameters and a p=0.5 flip, done by hand so the mask is
            # resized by ``mask_interpolation`` (v2's resized_crop always uses torch "nearest" for masks)
            i, j, h, w = T.RandomResizedCrop.get_params(img, self.crop_scale, (3 / 4, 4 / 3))
            img = TF.resized_crop(img, i, j, h, w, list(self.size), antialias=True)
            msk = self._resize_mask(mask, msk, self.size, (i, j, h, w))
            if torch.rand(()) < 0.5:
                img, msk = TF.horizontal_flip(img), TF.horizontal_flip(msk)
        else:
            img = TF.resize(img, list(self.size), antialias=True)
            if self.mask_size is not None:
                msk = self._resize_mask(mask, msk, self.mask_size)
        img, msk = img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)
        if self.normalize:
            img = TF.normalize(img.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        return img, msk
