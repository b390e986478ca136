"""COCO-Stuff 164k semantic segmentation with the coarse label sets of dense SSL evaluation.

One on-disk layout, the official downloads unpacked (``data/README.md``; ``data/convert_coco.py``
builds it from the stuff pixelmaps + panoptic annotations the Leopart/NeCo code reads, or from the
COCO json files). Masks hold the fine COCO-Stuff labels ``0..181`` (= COCO category id - 1,
``255`` = unlabeled); a 256-entry lookup table maps them to one of three coarse label sets:

* ``stuff27``: the 27 super-categories (12 thing + 15 stuff) of PiCIE/STEGO ("COCO-Stuff-27").
* ``stuff15``: the 15 stuff super-categories of Leopart/NeCo ("COCO-Stuff"); things -> 255 (the
  reference's stuff-only maps label them "other", which it ignores too).
* ``things12``: the 12 thing super-categories of Leopart/NeCo ("COCO-Things"); stuff -> 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from densessl.data.datasets import (
    IGNORE_INDEX,
    JointTransform,
    SegmentationDataset,
    check_dir,
    check_listed_files,
    check_root,
    layout_error,
    read_mask,
)

__all__ = [
    "COCO_MASK_DIR",
    "COCO_STUFF_CLASSES",
    "COCO_SUPERCATEGORIES",
    "COCOStuffSegmentation",
    "coco_stuff_lut",
]

# COCO category ids (1..90 things, 92..182 stuff) per super-category, as in the "supercategory"
# fields of the official instances/stuff/panoptic json files (nightrome/cocostuff labels.md).
# Thing ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 and 91 have no annotations in COCO.
COCO_SUPERCATEGORIES: dict[str, tuple[int, ...]] = {
    # things
    "person": (1,),
    "vehicle": (2, 3, 4, 5, 6, 7, 8, 9),
    "outdoor": (10, 11, 13, 14, 15),
    "animal": (16, 17, 18, 19, 20, 21, 22, 23, 24, 25),
    "accessory": (27, 28, 31, 32, 33),
    "sports": (34, 35, 36, 37, 38, 39, 40, 41, 42, 43),
    "kitchen": (44, 46, 47, 48, 49, 50, 51),
    "food": (52, 53, 54, 55, 56, 57, 58, 59, 60, 61),
    "furniture": (62, 63, 64, 65, 67, 70),
    "electronic": (72, 73, 74, 75, 76, 77),
    "appliance": (78, 79, 80, 81, 82),
    "indoor": (84, 85, 86, 87, 88, 89, 90),
    # stuff
    "textile": (92, 93, 104, 105, 109, 131, 137, 141, 152, 167, 168),
    "plant": (94, 97, 119, 124, 129, 134, 142, 163, 169),
    "building": (95, 96, 128, 151, 158, 166),
    "furniture-stuff": (98, 107, 108, 110, 112, 123, 130, 133, 156, 161, 165),
    "structural": (99, 113, 138, 146, 164),
    "raw-material": (100, 132, 139, 143),
    "floor": (101, 114, 115, 116, 117, 118),
    "ceiling": (102, 103),
    "sky": (106, 157),
    "ground": (111, 125, 126, 136, 140, 144, 145, 147, 149, 154, 159),
    "water": (120, 148, 155, 178, 179),
    "food-stuff": (121, 122, 153, 170),
    "solid": (127, 135, 150, 160, 162, 182),
    "wall": (171, 172, 173, 174, 175, 176, 177),
    "window": (180, 181),
}

# Class order of each label set (label i = name i).
COCO_STUFF_CLASSES: dict[str, tuple[str, ...]] = {
    # STEGO src/data.py (Coco.fine_to_coarse; names as its get_class_labels("cocostuff27"), with the
    # official "-stuff"/"raw-material" spelling): things 0..11, stuff 12..26.
    "stuff27": (
        "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
        "outdoor", "person", "sports", "vehicle",
        "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
        "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
    ),
    # Leopart/NeCo data/coco/coco_data_module.py: enumerate(sorted(stuff super-categories - "other")).
    "stuff15": (
        "building", "ceiling", "floor", "food-stuff", "furniture-stuff", "ground", "plant",
        "raw-material", "sky", "solid", "structural", "textile", "wall", "water", "window",
    ),
    # Same file: enumerate(sorted(super-categories of the isthing == 1 categories)), applied by Leopart
    # to masks of category ids (panoptic semantic PNGs). NeCo's copy of the file reads
    # annotations/{split}2017/ instead, where the COCO-Stuff README unzips these (id - 1) maps, with the
    # same id-keyed table, which would shift every thing class by one id; we follow Leopart.
    "things12": (
        "accessory", "animal", "appliance", "electronic", "food", "furniture", "indoor", "kitchen",
        "outdoor", "person", "sports", "vehicle",
    ),
}


def coco_stuff_lut(classes: str) -> np.ndarray:
    """(256,) uint8 table: fine label (COCO category id - 1) -> coarse label of ``classes``, else 255.

    Fine labels outside the label set (things for stuff15, stuff for things12), the ids without
    annotations and 255 map to 255.
    """
    if classes not in COCO_STUFF_CLASSES:
        raise ValueError(f"classes must be one of {tuple(COCO_STUFF_CLASSES)}, got {classes!r}")
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for coarse, name in enumerate(COCO_STUFF_CLASSES[classes]):
        lut[np.asarray(COCO_SUPERCATEGORIES[name]) - 1] = coarse
    return lut


_COCO_TREE = """\
<root>/                                   = the COCO folder
|-- images/
|   |-- train2017/                        000000000009.jpg ...  (118,287)
|   `-- val2017/                          000000000139.jpg ...  (5,000)
|-- annotations/stuffthingmaps_trainval2017/
|   |-- train2017/                        000000000009.png ...  (0..181 = COCO category id - 1, 255 = unlabeled)
|   `-- val2017/                          000000000139.png ...
`-- subsets/                              optional image lists: train_10pct.txt (data/convert_coco.py subset)"""

# Where the official stuffthingmaps_trainval2017.zip is unpacked, relative to the root.
COCO_MASK_DIR = Path("annotations") / "stuffthingmaps_trainval2017"


class COCOStuffSegmentation(SegmentationDataset):
    """COCO-Stuff 164k images with coarse labels ``classes`` = ``stuff27`` | ``stuff15`` | ``things12``.

    ``root`` holds ``images/{train2017,val2017}`` and the official stuff+thing maps in
    ``annotations/stuffthingmaps_trainval2017/{train2017,val2017}`` (tree above). ``split`` is
    ``train`` or ``val`` (every image of train2017/val2017), or the name of an image list
    ``<root>/subsets/<split>.txt`` whose lines are image paths relative to ``images/``
    (``train2017/000000000009.jpg``), e.g. ``train_10pct``, the seeded 10% of train2017 the linear
    protocol trains on (written by ``data/convert_coco.py subset``). Items are (PIL RGB image,
    PIL 'L' mask of coarse labels, 255 = ignore).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        classes: str = "stuff27",
        transform: JointTransform | None = None,
        config_key: str = "data.root",
        on_bad_image: str = "error",
    ) -> None:
        self.lut = coco_stuff_lut(classes)
        self.root, self.split, self.classes = Path(root).expanduser(), split, classes
        self.class_names = COCO_STUFF_CLASSES[classes]
        name, tree, example = f"COCOStuffSegmentation({split!r}, {classes!r})", _COCO_TREE, "coco"
        check_root(self.root, name, tree, config_key, example)
        if split in ("train", "val"):
            image_dir = self.root / "images" / f"{split}2017"
            self._check_folders(image_dir.name, name, config_key)
            self.images = sorted(image_dir.glob("*.jpg"))
            if not self.images:
                raise layout_error(name, f"no .jpg images in {image_dir}", tree, config_key, example)
        else:
            relative = self._read_subset(name, config_key)
            for folder in sorted({r.parts[0] for r in relative}):
                self._check_folders(folder, name, config_key)
            self.images = [self.root / "images" / r for r in relative]
        mask_root = self.root / COCO_MASK_DIR
        self.masks = [mask_root / p.parent.name / f"{p.stem}.png" for p in self.images]
        check_listed_files(self.images + self.masks, name, tree, config_key, example)
        super().__init__(transform, on_bad_image, config_key)

    def _read_subset(self, name: str, config_key: str) -> list[Path]:
        path = self.root / "subsets" / f"{self.split}.txt"
        if not path.is_file():
            raise layout_error(
                name,
                f"split {self.split!r} is neither 'train' nor 'val' nor an image list: missing {path}",
                _COCO_TREE, config_key, "coco",
                hint="write the 10% train2017 subset of the linear protocol with `python data/convert_coco.py "
                f"subset --root {self.root} --fraction 0.1` (-> subsets/train_10pct.txt)",
            )
        relative = [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
        bad = [str(r) for r in relative if len(r.parts) != 2 or r.parts[0] not in ("train2017", "val2017")]
        if not relative or bad:
            raise ValueError(
                f"{path}: expected one image path per line relative to images/, e.g. "
                f"'train2017/000000000009.jpg'; got {'an empty file' if not relative else bad[:3]}"
            )
        return relative

    def _check_folders(self, folder: str, name: str, config_key: str) -> None:
        tree, example = _COCO_TREE, "coco"
        image_dir, mask_dir = self.root / "images" / folder, self.root / COCO_MASK_DIR / folder
        hint = ""
        if not image_dir.is_dir() and any((self.root / folder).glob("*.jpg")):
            hint = f"the images sit directly in {self.root / folder}: move them to images/ " \
                   f"(cd {self.root} && mkdir -p images && mv {folder} images/)"
        check_dir(image_dir, name, tree, config_key, example, hint)
        if not mask_dir.is_dir():
            annotations = self.root / "annotations"
            if (annotations / folder).is_dir():
                # The COCO-Stuff README unzips the maps into annotations/ itself.
                target = COCO_MASK_DIR.name
                hint = (f"the stuff+thing maps sit in {annotations / folder}: move them with "
                        f"`cd {annotations} && mkdir -p {target} && mv train2017 val2017 {target}/`")
            elif any((annotations / d).is_dir() for d in ("stuff_annotations", "panoptic_annotations")):
                hint = "found the Leopart/NeCo stuff pixelmaps/panoptic layout: convert it with " \
                       "`python data/convert_coco.py pixelmaps ...` (data/README.md)"
            else:
                hint = "download and unzip stuffthingmaps_trainval2017.zip (data/README.md)"
        check_dir(mask_dir, name, tree, config_key, example, hint)

    def _load_mask(self, index: int) -> Image.Image:
        return Image.fromarray(self.lut[np.asarray(read_mask(self.masks[index]))])
