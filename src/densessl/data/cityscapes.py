"""Cityscapes semantic segmentation (fine annotations, the 19 evaluation classes)."""

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

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_LABEL_TO_TRAIN", "CityscapesSegmentation"]

# Train ids 0..18 in order (cityscapesScripts helpers/labels.py, trainId column).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)

# (256,) uint8: labelId (0..33) -> trainId, everything else (void classes such as ego vehicle,
# parking, guard rail, caravan, trailer) -> 255. The evaluated labelIds are those of
# cityscapesScripts helpers/labels.py and of NeCo data/cityscapes/cityscapes_data.py (valid_classes).
_EVALUATED_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
CITYSCAPES_LABEL_TO_TRAIN[_EVALUATED_LABEL_IDS] = np.arange(19)

_CITYSCAPES_TREE = """\
<root>/                                  = the cityscapes folder
|-- leftImg8bit/                         (leftImg8bit_trainvaltest.zip)
|   |-- train/aachen/aachen_000000_000019_leftImg8bit.png ...          (2,975 in 18 cities)
|   `-- val/frankfurt/frankfurt_000000_000294_leftImg8bit.png ...      (500 in 3 cities)
`-- gtFine/                              (gtFine_trainvaltest.zip)
    |-- train/aachen/aachen_000000_000019_gtFine_labelIds.png ...      (labelIds 0..33)
    `-- val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png ..."""


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes ``train`` (2,975) or ``val`` (500) with the 19 train-id classes, 255 = ignore.

    Reads ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` and the matching
    ``gtFine/{split}/<city>/*_gtFine_labelIds.png``, mapped labelId -> trainId with one table lookup
    (``CITYSCAPES_LABEL_TO_TRAIN``). The test split has no public labels. Items are (PIL RGB image,
    PIL 'L' mask of train ids).
    """

    SPLITS = ("train", "val")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: JointTransform | None = None,
        config_key: str = "data.root",
        on_bad_image: str = "error",
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"CityscapesSegmentation split must be one of {self.SPLITS}, got {split!r}")
        self.root, self.split = Path(root).expanduser(), split
        name, tree, example = f"CityscapesSegmentation({split!r})", _CITYSCAPES_TREE, "cityscapes"
        check_root(self.root, name, tree, config_key, example, "leftImg8bit", ("cityscapes",))
        image_dir, mask_dir = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        check_dir(image_dir, name, tree, config_key, example, hint="unzip leftImg8bit_trainvaltest.zip here")
        check_dir(mask_dir, name, tree, config_key, example, hint="unzip gtFine_trainvaltest.zip here")
        self.images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise layout_error(
                name, f"no <city>/*_leftImg8bit.png images in {image_dir}", tree, config_key, example
            )
        suffix = len("_leftImg8bit.png")
        self.masks = [mask_dir / p.parent.name / f"{p.name[:-suffix]}_gtFine_labelIds.png" for p in self.images]
        check_listed_files(self.masks, name, tree, config_key, example)
        self.class_names = CITYSCAPES_CLASSES
        super().__init__(transform, on_bad_image, config_key)

    def _load_mask(self, index: int) -> Image.Image:
        return Image.fromarray(CITYSCAPES_LABEL_TO_TRAIN[np.asarray(read_mask(self.masks[index]))])
