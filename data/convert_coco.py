"""Build the COCO-Stuff layout ``COCOStuffSegmentation`` reads, and the seeded train subsets.

The simplest route needs no conversion: unzip the official stuff+thing maps (data/README.md)

    wget http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip
    unzip -q stuffthingmaps_trainval2017.zip -d COCO/annotations/stuffthingmaps_trainval2017

Otherwise the ``pixelmaps`` and ``json`` modes write, for every image of COCO/images/<split>2017,
COCO/annotations/stuffthingmaps_trainval2017/<split>2017/<image>.png with the same convention
(fine labels 0..181 = COCO category id - 1, 255 = unlabeled):

  # Leopart/NeCo layout: stuff pixelmaps + things from the panoptic annotations (no extra package)
  python data/convert_coco.py pixelmaps --root COCO --split val \\
      --stuff-pixelmaps COCO/annotations/stuff_annotations/stuff_val2017_pixelmaps \\
      --panoptic-json COCO/annotations/panoptic_annotations/panoptic_val2017.json \\
      --panoptic-pngs COCO/annotations/panoptic_annotations/panoptic_val2017
  #   or --thing-maps DIR instead of the two panoptic options: PNGs of COCO category ids with
  #   0 = unlabeled (Leopart's panoptic_annotations/semantic_segmentation_val2017)

  # COCO json files only (needs pycocotools)
  python data/convert_coco.py json --root COCO --split val \\
      --stuff-json COCO/annotations/stuff_val2017.json --instances-json COCO/annotations/instances_val2017.json

  # the seeded 10% of train2017 the linear protocol trains on -> COCO/subsets/train_10pct.txt
  python data/convert_coco.py subset --root COCO --fraction 0.1 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.data.coco import COCO_MASK_DIR, COCO_SUPERCATEGORIES
from densessl.data.datasets import read_mask

THING_IDS = sorted(i for ids in COCO_SUPERCATEGORIES.values() for i in ids if i < 92)
STUFF_IDS = list(range(92, 183))

# Stuff pixelmaps (stuff_{split}2017_pixelmaps): 92..182 stuff ids -> id - 1; 0 and 183 ('other',
# which covers the thing pixels in the stuff-only annotations) carry no stuff class -> 255.
STUFF_PIXELMAP_LUT = np.full(256, 255, dtype=np.uint8)
STUFF_PIXELMAP_LUT[STUFF_IDS] = np.asarray(STUFF_IDS) - 1
# Maps of COCO category ids (panoptic semantic PNGs): thing ids -> id - 1; unlabeled (0) and the
# panoptic stuff ids (92..200, some merged) -> 255, the stuff comes from the pixelmaps.
THING_ID_LUT = np.full(256, 255, dtype=np.uint8)
THING_ID_LUT[THING_IDS] = np.asarray(THING_IDS) - 1


def _fail(message: str) -> SystemExit:
    return SystemExit(f"convert_coco.py: {message}")


def _images(root: Path, split: str) -> list[Path]:
    image_dir = root / "images" / f"{split}2017"
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise _fail(f"no .jpg images in {image_dir}: unzip {split}2017.zip into {root / 'images'} first")
    return images


def _require_files(paths: Iterable[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n".join(f"  {p}" for p in missing[:5])
        raise _fail(f"{len(missing)} {what} are missing, e.g.\n{shown}")


def _panoptic_category_map(png: Path, segments: list[dict]) -> np.ndarray:
    """(H, W) uint8 COCO category id of every panoptic segment, 0 where there is none."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint32)
    segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # panopticapi rgb2id
    categories = np.zeros(segment_ids.shape, dtype=np.uint8)
    for segment in segments:
        categories[segment_ids == segment["id"]] = segment["category_id"]
    return categories


def _convert_pixelmap(job: tuple[Path, Path, Path, list[dict] | None]) -> None:
    """Stuff from the pixelmap, things painted over it from the panoptic PNG or category-id map."""
    stuff_path, thing_path, out_path, segments = job
    label = STUFF_PIXELMAP_LUT[np.asarray(read_mask(stuff_path))]
    if segments is not None:
        categories = _panoptic_category_map(thing_path, segments)
    else:
        categories = np.asarray(read_mask(thing_path))
    if categories.shape != label.shape:
        raise ValueError(f"{thing_path} is {categories.shape[::-1]} but {stuff_path} is {label.shape[::-1]}")
    things = THING_ID_LUT[categories]
    Image.fromarray(np.where(things != 255, things, label)).save(out_path)


def convert_pixelmaps(args: argparse.Namespace) -> int:
    images = _images(args.root, args.split)
    out_dir = args.root / COCO_MASK_DIR / f"{args.split}2017"
    stuff = [args.stuff_pixelmaps / f"{p.stem}.png" for p in images]
    _require_files(stuff, f"stuff pixelmaps in {args.stuff_pixelmaps}")
    if args.thing_maps is not None:
        things = [args.thing_maps / f"{p.stem}.png" for p in images]
        segments: list[list[dict] | None] = [None] * len(images)
    else:
        panoptic = json.loads(args.panoptic_json.read_text())["annotations"]
        annotations = {Path(a["file_name"]).stem: a for a in panoptic}
        absent = [p.name for p in images if p.stem not in annotations]
        if absent:
            raise _fail(f"{len(absent)} images have no annotation in {args.panoptic_json}, e.g. {absent[:3]}")
        things = [args.panoptic_pngs / annotations[p.stem]["file_name"] for p in images]
        segments = [annotations[p.stem]["segments_info"] for p in images]
    _require_files(things, "thing masks")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(s, t, out_dir / f"{p.stem}.png", g) for s, t, p, g in zip(stuff, things, images, segments)]
    if args.workers <= 1:
        for job in jobs:
            _convert_pixelmap(job)
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            for _ in pool.map(_convert_pixelmap, jobs, chunksize=64):
                pass
    return len(jobs)


def convert_json(args: argparse.Namespace) -> int:
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise _fail(
            "the json mode needs pycocotools (pip install pycocotools) to rasterise the polygons/RLEs. "
            "Without it, unzip the official stuffthingmaps_trainval2017.zip, or use the pixelmaps mode "
            "(the stuff and panoptic zips that hold these json files also hold the PNGs; data/README.md)"
        ) from None
    images = _images(args.root, args.split)
    stuff, things = COCO(str(args.stuff_json)), COCO(str(args.instances_json))
    image_ids = {info["file_name"]: info["id"] for info in stuff.loadImgs(stuff.getImgIds())}
    absent = [p.name for p in images if p.name not in image_ids]
    if absent:
        raise _fail(f"{len(absent)} images are not in {args.stuff_json}, e.g. {absent[:3]}")
    out_dir = args.root / COCO_MASK_DIR / f"{args.split}2017"
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = ((stuff, set(STUFF_IDS)), (things, set(THING_IDS)))
    for path in images:
        info = stuff.loadImgs([image_ids[path.name]])[0]
        label = np.full((info["height"], info["width"]), 255, dtype=np.uint8)
        # Stuff first, then things (crowd regions included) in annotation order, later ones on top;
        # the official maps may resolve overlapping instances differently.
        for coco, categories in wanted:
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
                if ann["category_id"] in categories:
                    label[coco.annToMask(ann) == 1] = ann["category_id"] - 1
        Image.fromarray(label).save(out_dir / f"{path.stem}.png")
    return len(images)


def write_subset(args: argparse.Namespace) -> int:
    if not 0 < args.fraction <= 1:
        raise _fail(f"--fraction must be in (0, 1], got {args.fraction}")
    mask_dir = args.root / COCO_MASK_DIR / f"{args.split}2017"
    names = [p.name for p in _images(args.root, args.split) if (mask_dir / f"{p.stem}.png").is_file()]
    if not names:
        raise _fail(f"no image of {args.split}2017 has a mask in {mask_dir}: unzip or convert the maps first")
    count = int(len(names) * args.fraction)  # floor, as NeCo's file_list[:int(len(file_list) * 0.1)]
    if count == 0:
        raise _fail(f"--fraction {args.fraction} of {len(names)} images selects none")
    chosen = sorted(random.Random(args.seed).sample(names, count))
    name = args.name or f"{args.split}_{args.fraction * 100:g}pct"
    out = args.root / "subsets" / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{args.split}2017/{n}\n" for n in chosen))
    print(f"split={name}: {count} of {len(names)} {args.split}2017 images (seed {args.seed}) -> {out}")
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    def add_mode(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = modes.add_parser(name, help=help)
        sub.set_defaults(run=run)
        sub.add_argument("--root", type=Path, required=True, help="the COCO folder holding images/<split>2017")
        sub.add_argument("--split", choices=("train", "val"), default="train" if name == "subset" else "val")
        return sub

    pixelmaps = add_mode("pixelmaps", convert_pixelmaps, "stuff pixelmaps + panoptic things -> stuff+thing maps")
    pixelmaps.add_argument("--stuff-pixelmaps", type=Path, required=True, help="the stuff_<split>2017_pixelmaps")
    source = pixelmaps.add_mutually_exclusive_group(required=True)
    source.add_argument("--panoptic-json", type=Path, help="panoptic_<split>2017.json (with --panoptic-pngs)")
    source.add_argument("--thing-maps", type=Path, help="PNGs of COCO category ids, 0 = unlabeled")
    pixelmaps.add_argument("--panoptic-pngs", type=Path, help="folder of the panoptic_<split>2017 PNGs")
    pixelmaps.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (1: no pool)")
    coco_json = add_mode("json", convert_json, "COCO json files -> stuff+thing maps (needs pycocotools)")
    coco_json.add_argument("--stuff-json", type=Path, required=True, help="stuff_<split>2017.json")
    coco_json.add_argument("--instances-json", type=Path, required=True, help="instances_<split>2017.json")
    subset = add_mode("subset", write_subset, "seeded random image list -> <root>/subsets/<name>.txt")
    subset.add_argument("--fraction", type=float, default=0.1)
    subset.add_argument("--seed", type=int, default=0)
    subset.add_argument("--name", help="split name (default <split>_<percent>pct, e.g. train_10pct)")
    args = parser.parse_args(argv)
    if args.mode == "pixelmaps" and (args.panoptic_json is None) != (args.panoptic_pngs is None):
        parser.error("--panoptic-json and --panoptic-pngs go together")
    start = time.perf_counter()
    count = args.run(args)
    if args.mode != "subset":
        out = args.root / COCO_MASK_DIR / f"{args.split}2017"
        print(f"wrote {count} stuff+thing maps to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
