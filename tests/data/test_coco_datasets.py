"""COCO-Stuff/Things and Cityscapes datasets on tiny fake trees: label mappings, layout errors,
data/convert_coco.py, the data configs and one evaluation CLI run."""
import importlib.util
import json
import os
import types
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densessl.data import (
    COCO_STUFF_CLASSES,
    CityscapesSegmentation,
    COCOStuffSegmentation,
    coco_stuff_lut,
)

ROOT = Path(__file__).resolve().parents[2]
MASKS = Path("annotations/stuffthingmaps_trainval2017")

# Fine labels (COCO category id - 1) and their coarse labels, by hand from the COCO super-categories
# and the class orders of STEGO (stuff27) and Leopart/NeCo (sorted names: stuff15, things12).
#        person car cat chair banner road sky-other wood unused(id 12) unlabeled
FINE = [0, 2, 16, 61, 91, 148, 156, 181, 11, 255]
EXPECTED = {
    "stuff27": [9, 11, 7, 3, 17, 21, 23, 24, 255, 255],
    "stuff15": [255, 255, 255, 255, 11, 5, 8, 9, 255, 255],
    "things12": [9, 11, 1, 5, 255, 255, 255, 255, 255, 255],
}


def write_image(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def stripes(values: list[int], size: int = 32) -> np.ndarray:
    """(size, size) mask whose row i holds values[i % len(values)]."""
    return np.asarray(values, dtype=np.uint8)[np.arange(size) % len(values)][:, None].repeat(size, 1)


def make_coco(root: Path, split: str, masks: dict[str, np.ndarray]) -> Path:
    for i, (stem, mask) in enumerate(masks.items()):
        write_image(root / "images" / f"{split}2017" / f"{stem}.jpg", mask.shape[::-1], seed=i)
        write_mask(root / MASKS / f"{split}2017" / f"{stem}.png", mask)
    return root


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco", "val", {"000000000139": stripes(FINE)})


@pytest.mark.parametrize("classes", ["stuff27", "stuff15", "things12"])
def test_fine_ids_map_to_the_coarse_classes(coco, classes):
    dataset = COCOStuffSegmentation(coco, "val", classes)
    image, mask = dataset[0]
    assert image.mode == "RGB" and image.size == (32, 32) and mask.mode == "L"
    rows = np.asarray(mask)[: len(FINE), 0].tolist()
    assert rows == EXPECTED[classes]
    assert (np.asarray(mask) == np.asarray(mask)[:, :1]).all()  # whole rows mapped alike


def test_class_counts_and_names(coco):
    counts = {c: COCOStuffSegmentation(coco, "val", c).num_classes for c in COCO_STUFF_CLASSES}
    assert counts == {"stuff27": 27, "stuff15": 15, "things12": 12}
    assert COCO_STUFF_CLASSES["stuff27"][9] == COCO_STUFF_CLASSES["things12"][9] == "person"
    assert COCO_STUFF_CLASSES["stuff15"][8] == COCO_STUFF_CLASSES["stuff27"][23] == "sky"
    with pytest.raises(ValueError, match="stuff27"):
        COCOStuffSegmentation(coco, "val", "stuff171")


def test_lookup_tables_are_consistent_across_label_sets():
    lut27, lut15, lut12 = (coco_stuff_lut(c) for c in ("stuff27", "stuff15", "things12"))
    names27, names15, names12 = (COCO_STUFF_CLASSES[c] for c in ("stuff27", "stuff15", "things12"))
    # 80 thing + 91 stuff fine classes; the 11 COCO ids without annotations and 182..255 are ignored
    assert ((lut27 != 255).sum(), (lut15 != 255).sum(), (lut12 != 255).sum()) == (171, 91, 80)
    assert (lut15[:91] == 255).all() and (lut12[91:] == 255).all() and (lut27[182:] == 255).all()
    assert sorted(set(lut27[lut27 != 255].tolist())) == list(range(27))
    for fine in np.flatnonzero(lut27 != 255):
        other = (names12, lut12) if fine < 91 else (names15, lut15)
        assert names27[lut27[fine]] == other[0][other[1][fine]]
    # STEGO's fine_to_coarse (src/data.py) at a few points: stuff starts at coarse 12
    assert [lut27[f] for f in (0, 9, 43, 71, 77, 83, 100, 101, 119, 170, 179)] == [9, 8, 5, 0, 1, 4, 13, 12, 26, 18, 19]


def test_train_split_and_subset_list(tmp_path):
    root = make_coco(tmp_path / "coco", "train", {f"{i:012d}": stripes([i, 255]) for i in range(1, 4)})
    assert len(COCOStuffSegmentation(root, "train")) == 3
    (root / "subsets").mkdir()
    (root / "subsets" / "tiny.txt").write_text("train2017/000000000003.jpg\ntrain2017/000000000001.jpg\n")
    subset = COCOStuffSegmentation(root, "tiny", "stuff27")
    assert [p.name for p in subset.masks] == ["000000000003.png", "000000000001.png"]
    assert np.asarray(subset[0][1])[0, 0] == 11  # fine 3 = motorcycle -> vehicle
    (root / "subsets" / "bad.txt").write_text("000000000003.jpg\n")
    with pytest.raises(ValueError, match="relative to images/"):
        COCOStuffSegmentation(root, "bad")


def test_coco_layout_errors_name_the_folder_and_the_key(tmp_path, coco):
    with pytest.raises(FileNotFoundError, match="data.root"):
        COCOStuffSegmentation(tmp_path / "nowhere", "val")
    with pytest.raises(FileNotFoundError) as err:
        COCOStuffSegmentation(coco, "train", config_key="data.coco_root")
    assert "images/train2017" in str(err.value) and "data.coco_root=" in str(err.value)
    # the COCO-Stuff README unzips the maps into annotations/ itself: the hint says how to move them
    (coco / MASKS).rename(coco / "annotations" / "maps")
    (coco / "annotations" / "maps" / "val2017").rename(coco / "annotations" / "val2017")
    with pytest.raises(FileNotFoundError) as err:
        COCOStuffSegmentation(coco, "val")
    text = str(err.value)
    assert "missing folder" in text and "stuffthingmaps_trainval2017/val2017" in text
    assert "mv train2017 val2017 stuffthingmaps_trainval2017/" in text and "data.root=" in text
    with pytest.raises(FileNotFoundError, match="convert_coco.py subset"):
        COCOStuffSegmentation(coco, "train_10pct")


def test_coco_missing_mask_file_is_reported(coco):
    write_image(coco / "images" / "val2017" / "000000000285.jpg")
    with pytest.raises(FileNotFoundError, match="1 of 4 listed files are missing"):
        COCOStuffSegmentation(coco, "val")


def make_cityscapes(root: Path, split: str, city: str, label_ids: np.ndarray) -> Path:
    stem = f"{city}_000000_000019"
    write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", label_ids.shape[::-1])
    write_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
    return root


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    #          road sidewalk car bicycle unlabeled ego-vehicle parking caravan person sky building
    label_ids = [7, 8, 26, 33, 0, 1, 9, 29, 24, 23, 11]
    root = make_cityscapes(tmp_path / "cityscapes", "val", "frankfurt", stripes(label_ids))
    dataset = CityscapesSegmentation(root, "val")
    assert len(dataset) == 1 and dataset.num_classes == 19 and dataset.class_names[13] == "car"
    image, mask = dataset[0]
    assert image.size == mask.size == (32, 32)
    assert np.asarray(mask)[: len(label_ids), 0].tolist() == [0, 1, 13, 18, 255, 255, 255, 255, 11, 10, 2]


def test_cityscapes_layout_errors(tmp_path):
    root = make_cityscapes(tmp_path / "data" / "cityscapes", "val", "lindau", stripes([7]))
    with pytest.raises(FileNotFoundError) as err:
        CityscapesSegmentation(tmp_path / "data", "val")
    assert f"data.root={root}" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        CityscapesSegmentation(root, "train")
    assert "missing folder" in str(err.value) and "leftImg8bit/train" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        CityscapesSegmentation(root, "test")


def run_convert(*args: str) -> subprocess.CompletedProcess:
    """data/convert_coco.py as a user runs it (a few seconds: the import of torch dominates)."""
    return subprocess.run([sys.executable, str(ROOT / "data" / "convert_coco.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def convert():
    """data/convert_coco.py's main(argv), in this process."""
    spec = importlib.util.spec_from_file_location("convert_coco", ROOT / "data" / "convert_coco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda *args: module.main([str(a) for a in args])


# Stuff pixelmap rows: sky-other (157), road (149), 'other' (183, thing pixels), unlabeled (0), wood (182).
PIXELMAP = [157, 149, 183, 0, 182]
# The stuff+thing maps expected once the things (a person over the 'other' row, a car on the
# unlabeled row) are painted in: fine = id - 1, 255 where nothing is labelled.
CONVERTED = [156, 148, 0, 2, 181]


def thing_rows(size: int = 32) -> np.ndarray:
    """COCO category ids: person (1) on row 2 of every 5, car (3) on row 3, sky-other-merged (187) on row 0."""
    return stripes([187, 0, 1, 3, 0], size)


def test_convert_pixelmaps_with_panoptic_things(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "images" / "val2017" / "000000000139.jpg")
    write_mask(tmp_path / "pixelmaps" / "000000000139.png", stripes(PIXELMAP))
    # panoptic PNG: segment id = R + 256 G + 256^2 B; ids 300 (sky, stuff), 5 (person), 7 (car)
    segments = {0: 0, 187: 300, 1: 5, 3: 7}
    ids = np.vectorize(segments.get)(thing_rows()).astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    (tmp_path / "panoptic").mkdir()
    Image.fromarray(rgb).save(tmp_path / "panoptic" / "000000000139.png")
    info = [{"id": 300, "category_id": 187}, {"id": 5, "category_id": 1}, {"id": 7, "category_id": 3}]
    annotations = {"annotations": [{"file_name": "000000000139.png", "image_id": 139, "segments_info": info}]}
    (tmp_path / "panoptic.json").write_text(json.dumps(annotations))
    proc = run_convert("pixelmaps", "--root", str(root), "--split", "val", "--stuff-pixelmaps",
                       str(tmp_path / "pixelmaps"), "--panoptic-json", str(tmp_path / "panoptic.json"),
                       "--panoptic-pngs", str(tmp_path / "panoptic"), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 stuff+thing maps" in proc.stdout
    fine = np.asarray(Image.open(root / MASKS / "val2017" / "000000000139.png"))
    assert fine[:5, 0].tolist() == CONVERTED and fine[5:10, 0].tolist() == CONVERTED
    mask = np.asarray(COCOStuffSegmentation(root, "val", "stuff27")[0][1])
    assert mask[:5, 0].tolist() == [23, 21, 9, 11, 24]  # sky, ground, person, vehicle, solid


def test_convert_pixelmaps_with_thing_maps(tmp_path, convert):
    root = tmp_path / "coco"
    write_image(root / "images" / "val2017" / "000000000139.jpg")
    write_mask(tmp_path / "pixelmaps" / "000000000139.png", stripes(PIXELMAP))
    write_mask(tmp_path / "things" / "000000000139.png", thing_rows())
    args = ("pixelmaps", "--root", root, "--stuff-pixelmaps", tmp_path / "pixelmaps", "--thing-maps",
            tmp_path / "things", "--workers", "1")
    convert(*args)
    fine = np.asarray(Image.open(root / MASKS / "val2017" / "000000000139.png"))
    assert fine[:5, 0].tolist() == CONVERTED
    mask = np.asarray(COCOStuffSegmentation(root, "val", "things12")[0][1])
    assert mask[:5, 0].tolist() == [255, 255, 9, 11, 255]
    # a stuff pixelmap missing for an image: the script fails naming it
    write_image(root / "images" / "val2017" / "000000000285.jpg")
    with pytest.raises(SystemExit, match="000000000285.png"):
        convert(*args)


FAKE_PYCOCOTOOLS = '''
import json
import numpy as np


class COCO:
    """The five calls convert_coco.py makes; a segmentation here is a box [x0, y0, x1, y1]."""

    def __init__(self, path):
        data = json.load(open(path))
        self.imgs = {i["id"]: i for i in data["images"]}
        self.anns = {a["id"]: a for a in data["annotations"]}

    def getImgIds(self):
        return list(self.imgs)

    def loadImgs(self, ids):
        return [self.imgs[i] for i in ids]

    def getAnnIds(self, imgIds):
        return [k for k, a in self.anns.items() if a["image_id"] in imgIds]

    def loadAnns(self, ids):
        return [self.anns[i] for i in ids]

    def annToMask(self, ann):
        image = self.imgs[ann["image_id"]]
        mask = np.zeros((image["height"], image["width"]), np.uint8)
        x0, y0, x1, y1 = ann["segmentation"]
        mask[y0:y1, x0:x1] = 1
        return mask
'''


def test_convert_json_rasterises_stuff_then_things(tmp_path, convert, monkeypatch):
    root = tmp_path / "coco"
    write_image(root / "images" / "val2017" / "000000000139.jpg", (8, 4))
    image = [{"id": 139, "file_name": "000000000139.jpg", "width": 8, "height": 4}]
    stuff = [{"id": 1, "image_id": 139, "category_id": 157, "segmentation": [0, 0, 8, 2]},  # sky-other
             {"id": 2, "image_id": 139, "category_id": 149, "segmentation": [0, 2, 8, 4]},  # road
             {"id": 3, "image_id": 139, "category_id": 183, "segmentation": [0, 0, 2, 4]}]  # 'other': skipped
    things = [{"id": 9, "image_id": 139, "category_id": 1, "segmentation": [1, 1, 3, 3]}]  # person on top
    (tmp_path / "stuff.json").write_text(json.dumps({"images": image, "annotations": stuff}))
    (tmp_path / "instances.json").write_text(json.dumps({"images": image, "annotations": things}))
    args = ("json", "--root", root, "--stuff-json", tmp_path / "stuff.json", "--instances-json",
            tmp_path / "instances.json")
    # without pycocotools the mode fails with the way out
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(SystemExit) as err:
        convert(*args)
    assert "pip install pycocotools" in str(err.value) and "stuffthingmaps_trainval2017.zip" in str(err.value)
    fake = types.ModuleType("pycocotools.coco")
    exec(FAKE_PYCOCOTOOLS, fake.__dict__)
    monkeypatch.setitem(sys.modules, "pycocotools", types.ModuleType("pycocotools"))
    monkeypatch.setitem(sys.modules, "pycocotools.coco", fake)
    convert(*args)
    fine = np.asarray(Image.open(root / MASKS / "val2017" / "000000000139.png"))
    assert fine.tolist() == [[156] * 8,
                             [156, 0, 0] + [156] * 5,
                             [148, 0, 0] + [148] * 5,
                             [148] * 8]


def test_subset_is_seeded_and_readable(tmp_path, convert):
    root = make_coco(tmp_path / "coco", "train", {f"{i:012d}": stripes([i % 80]) for i in range(1, 41)})
    write_image(root / "images" / "train2017" / "000000000999.jpg")  # no mask: never drawn
    proc = run_convert("subset", "--root", str(root), "--fraction", "0.1", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    listed = (root / "subsets" / "train_10pct.txt").read_text().splitlines()
    assert len(listed) == 4 and listed == sorted(listed)
    assert all(line.startswith("train2017/") and "999" not in line for line in listed)
    assert "split=train_10pct: 4 of 40 train2017 images" in proc.stdout
    convert("subset", "--root", root, "--fraction", "0.1", "--seed", "3")
    assert (root / "subsets" / "train_10pct.txt").read_text().splitlines() == listed
    convert("subset", "--root", root, "--fraction", "0.1", "--seed", "4", "--name", "other")
    assert (root / "subsets" / "other.txt").read_text().splitlines() != listed
    dataset = COCOStuffSegmentation(root, "train_10pct", "things12")
    assert [f"train2017/{p.name}" for p in dataset.images] == listed and len(dataset) == 4


def test_data_configs_instantiate_val_and_the_train_split(tmp_path, coco, convert):
    import hydra
    from hydra import compose, initialize_config_dir

    make_coco(coco, "train", {f"{i:012d}": stripes([i]) for i in range(1, 11)})
    convert("subset", "--root", coco)
    city = make_cityscapes(make_cityscapes(tmp_path / "cityscapes", "train", "aachen", stripes([26])),
                           "val", "lindau", stripes([7]))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for data, root, classes in (("coco_stuff", coco, 15), ("coco_things", coco, 12), ("cityscapes", city, 19)):
            cfg = compose(config_name="evaluate_linear", overrides=[f"data={data}", f"data.root={root}"])
            val = hydra.utils.instantiate(cfg.data.val)
            train = hydra.utils.instantiate(cfg.data.val, split=cfg.data.seg_train_split)
            assert val.num_classes == train.num_classes == classes
            assert (len(val), len(train)) == (1, 1)  # coco: 10% of 10 train images
        cfg = compose(config_name="evaluate", overrides=["data=coco_stuff", f"data.root={coco}", "data.classes=stuff27"])
        assert hydra.utils.instantiate(cfg.data.val).num_classes == 27
        assert len(hydra.utils.instantiate(cfg.data.train)) == 10  # SSL images: images/train2017


def test_overcluster_cli_on_coco_stuff(tmp_path):
    rng = np.random.default_rng(0)
    # quadrants of sky, road, person (ignored in stuff15) and banner, shuffled per image
    quadrants = [156, 148, 0, 91]
    masks = {}
    for i in range(6):
        q = rng.permutation(quadrants)
        masks[f"{i:012d}"] = np.block([[np.full((16, 16), q[0]), np.full((16, 16), q[1])],
                                       [np.full((16, 16), q[2]), np.full((16, 16), q[3])]]).astype(np.uint8)
    root = make_coco(tmp_path / "coco", "val", masks)
    out = tmp_path / "eval"
    cmd = [sys.executable, str(ROOT / "evaluation" / "overcluster.py"), f"hydra.run.dir={out}", "backbone=vit_tiny",
           "backbone.weights=none", "++backbone.model_kwargs.depth=1", "data=coco_stuff", f"data.root={root}",
           "data.num_workers=0", "eval.options.ks=[15,20]", "eval.options.seeds=[0]", "eval.options.image_size=64",
           "eval.options.mask_size=64", "eval.options.pca_dim=8", "eval.options.niter=5", "eval.options.nredo=1",
           "eval.options.num_vis=2"]
    env = {**os.environ, "DENSESSL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((out / "overcluster.json").read_text())
    assert 0.0 <= figures["k15_miou_mean"] <= 1.0 and 0.0 <= figures["k20_miou_mean"] <= 1.0
    # K = 15 = COCO-Stuff-15 classes -> Hungarian matching, so num_classes reached the evaluator
    assert any(line.split()[:2] == ["15", "hungarian"] for line in proc.stdout.splitlines())
