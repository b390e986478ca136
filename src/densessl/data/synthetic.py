"""Synthetic "shapes and textures" scenes written in the Pascal VOC 2012 layout.

A small, fast, fully deterministic stand-in for VOC used by tests, smoke runs and CI. Each image
has a cluttered background (class 0) and 2-5 objects. An object's class is given by its SHAPE and
its TEXTURE together. Every scene, its background and every object are painted with the same four
colours, so colour says nothing about the class, nor about which object a patch belongs to, nor
about which image it comes from: only texture and shape do. (Version 2 drew three colours per scene
from a palette of twelve; those three identified the image, so even random-init tokens were image
codes, and instance-level objectives could separate images by colour alone.) Objects span several
16-px patches and their textures repeat every 12-20 px at 224 px (periods scale with ``size``), so
they survive the 2-3x downscaling of training crops.
Later objects occlude earlier ones; as in VOC, a band of 255 (ignore) surrounds every object
boundary in both the class and the instance masks.

Layout written under ``root`` (loadable with ``densessl.data.VOCSegmentation(root, split)``)::

    root/
    |-- JPEGImages/synth_00000.jpg ...
    |-- SegmentationClass/synth_00000.png ...   palette PNG, value = class id, 255 = ignore
    |-- SegmentationObject/synth_00000.png ...  palette PNG, value = instance id 1..k, 255 = ignore
    |-- ImageSets/Segmentation/{train,val}.txt
    |-- classes.txt                             one class name per line, line i = class id i
    |-- README.txt                              what each class looks like
    |-- params.json                             generation parameters
    `-- .densessl-synthetic                     marker (written last): densessl made this folder

Only a folder that carries the marker (or is empty, or does not exist) is ever written to or
replaced: any other folder at ``root`` is the user's, and :func:`ensure_synthetic_voc` refuses it.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFAULT_PARAMS",
    "ForeignFolderError",
    "SYNTHETIC_CLASSES",
    "default_cache_dir",
    "ensure_synthetic_voc",
    "make_synthetic_voc",
    "voc_colormap",
]

# Bump when the rendering changes so cached copies are regenerated.
GENERATOR_VERSION = 3
# Written last into every generated folder: the only licence to replace a folder's contents.
MARKER = ".densessl-synthetic"

# class id -> (name, texture); index 0 is the background.
_CLASS_SPECS: tuple[tuple[str, str], ...] = (
    ("background", "clutter: smooth colour field, soft blobs, wide soft stripes"),
    ("disc", "dots on a square grid, period ~20 px"),
    ("square", "checkerboard, cells ~12 px"),
    ("triangle", "stripes at 45 degrees, period ~18 px"),
    ("ring", "concentric rings around the object centre, period ~14 px"),
    ("cross", "horizontal stripes, period ~12 px"),
    ("star", "grid of thin lines, period ~20 px"),
)
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(name for name, _ in _CLASS_SPECS)

# The dataset-wide palette (RGB), shared by every scene, class and the background.
_PALETTE = np.array([[220, 40, 40], [40, 170, 60], [50, 80, 220], [235, 210, 40]], dtype=np.float32)

_IGNORE = 255
_MIN_VISIBLE_FRACTION = 0.4  # of an object's own area that must stay unoccluded
_MAX_LAYOUT_TRIES = 200
# Object radius as a fraction of the image side: at 224 px, diameters of 3.6-7 patches of 16 px.
_RADIUS_RANGE = (0.13, 0.25)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard Pascal VOC colour map (n, 3) uint8; index 255 is the cream ignore colour."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for bit in range(7, -1, -1):  # spread the bits of i over the high bits of r, g, b
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << bit
            c >>= 3
        cmap[i] = rgb
    return cmap


_VOC_PALETTE_BYTES = voc_colormap().flatten().tolist()


def default_cache_dir() -> Path:
    """``$DENSESSL_CACHE/synthetic_voc``, or ``~/.cache/densessl/synthetic_voc`` when unset."""
    base = os.environ.get("DENSESSL_CACHE") or "~/.cache/densessl"
    return Path(base).expanduser() / "synthetic_voc"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Inside-test of shape ``cls`` in object coordinates (u, v), unit = the object radius."""
    rho = np.hypot(u, v)
    if cls == 1:  # disc (mild ellipse)
        return (u / aspect) ** 2 + (v * aspect) ** 2 <= 1.0
    if cls == 2:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if cls == 3:  # equilateral triangle, circumradius 1.2
        normals = np.deg2rad([90.0, 210.0, 330.0])
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.6 for a in normals], axis=0)
    if cls == 4:  # ring
        return (rho >= 0.55) & (rho <= 1.0)
    if cls == 5:  # cross
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if cls == 6:  # five-pointed star
        t = (5.0 * np.arctan2(v, u) / (2.0 * np.pi)) % 1.0
        return rho <= 0.45 + 0.6 * np.abs(2.0 * t - 1.0)
    raise ValueError(f"unknown object class {cls}")


def _texture(cls: int, x: np.ndarray, y: np.ndarray, unit: float, rng: np.random.Generator) -> np.ndarray:
    """Binary class texture at pixel offsets (x, y) from the object centre (image axes).

    Periods are the class values below times 2 (version 2 doubled version 1's, so that 96 px training
    crops keep them) times ``unit`` (= size / 224), jittered per instance (+-15 %), as is the
    orientation (+-10 deg).
    """
    scale = 2.0 * unit * rng.uniform(0.85, 1.15)
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    phase = rng.uniform(0.0, 1.0, size=2)
    xr = x * np.cos(angle) + y * np.sin(angle)
    yr = -x * np.sin(angle) + y * np.cos(angle)
    if cls == 1:  # dots
        p = 10.0 * scale
        fx, fy = (xr / p + phase[0]) % 1.0 - 0.5, (yr / p + phase[1]) % 1.0 - 0.5
        return fx**2 + fy**2 <= 0.3**2
    if cls == 2:  # checkerboard
        p = 6.0 * scale
        return (np.floor(xr / p + phase[0]) + np.floor(yr / p + phase[1])) % 2 == 0
    if cls == 3:  # 45-degree stripes
        p = 9.0 * scale
        return ((xr + yr) / np.sqrt(2.0) / p + phase[0]) % 1.0 < 0.5
    if cls == 4:  # concentric rings (centred on the object, no phase)
        p = 7.0 * scale
        return (np.hypot(x, y) / p) % 1.0 < 0.5
    if cls == 5:  # horizontal stripes
        p = 6.0 * scale
        return (yr / p + phase[0]) % 1.0 < 0.5
    if cls == 6:  # grid of thin lines
        p = 10.0 * scale
        return ((xr / p + phase[0]) % 1.0 < 0.3) | ((yr / p + phase[1]) % 1.0 < 0.3)
    raise ValueError(f"unknown object class {cls}")


def _background(size: int, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cluttered background (size, size, 3) float32 in [0, 255] painted with the scene's ``colours`` (C, 3).

    All of it is low-frequency, so it is drawn at 1/4 resolution and upsampled (16x cheaper).
    """
    s = max(size // 4, 16)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    g = int(rng.integers(3, 7))
    coarse = colours[rng.integers(0, len(colours), size=(g, g))].astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((s, s), Image.BILINEAR), np.float32)
    for _ in range(int(rng.integers(3, 9))):  # soft elliptical blobs
        cy, cx = rng.uniform(0, s, size=2)
        sy, sx = rng.uniform(0.04, 0.15, size=2) * s
        alpha = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))[..., None]
        img = img * (1.0 - alpha) + colours[rng.integers(len(colours))] * alpha
    if rng.random() < 0.5:  # wide soft stripes: much longer period than any object texture
        angle = rng.uniform(0.0, np.pi)
        period = rng.uniform(0.15, 0.3) * s
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        alpha = (0.4 * wave)[..., None]
        img = img * (1.0 - alpha) + colours[rng.integers(len(colours))] * alpha
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float32).copy()


def _layout(
    size: int, num_classes: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> list[dict]:
    """Sample 2-5 objects such that each keeps >= 40 % of its area visible after occlusion."""
    for _ in range(_MAX_LAYOUT_TRIES):
        objects = []
        owner = np.zeros((size, size), dtype=np.int16)  # index+1 of the topmost object
        for k in range(int(rng.integers(2, 6))):
            cls = int(rng.integers(1, num_classes))
            r = rng.uniform(*_RADIUS_RANGE) * size
            cy, cx = rng.uniform(0.5 * r, size - 0.5 * r, size=2)
            theta = rng.uniform(0.0, 2.0 * np.pi)
            # Shapes fit in 1.25 r: only evaluate the bounding box.
            y0, y1 = max(0, int(cy - 1.3 * r)), min(size, int(cy + 1.3 * r) + 1)
            x0, x1 = max(0, int(cx - 1.3 * r)), min(size, int(cx + 1.3 * r) + 1)
            dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / r
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / r
            inside = _shape_mask(cls, u, v, aspect=rng.uniform(0.8, 1.25))
            owner[y0:y1, x0:x1][inside] = k + 1
            objects.append(dict(cls=cls, box=(y0, y1, x0, x1), inside=inside, cy=cy, cx=cx))
        visible = np.bincount(owner.ravel(), minlength=len(objects) + 1)[1:]
        areas = np.array([o["inside"].sum() for o in objects])
        if np.all(visible >= _MIN_VISIBLE_FRACTION * np.maximum(areas, 1)) and areas.min() > 0:
            return objects
    raise RuntimeError("could not place objects without heavy occlusion; increase `size`")


def _render(
    size: int, num_classes: int, ignore_width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: image (S, S, 3) uint8, class mask (S, S) uint8, instance mask (S, S) uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # All four colours. The shuffle changes nothing in distribution (every later pick is random); it keeps
    # the random stream, hence the exact scenes, that the README's results table was measured on.
    colours = _PALETTE[rng.choice(len(_PALETTE), size=len(_PALETTE), replace=False)]
    img = _background(size, colours, rng)
    objects = _layout(size, num_classes, rng, yy, xx)
    cls_mask = np.zeros((size, size), dtype=np.uint8)
    inst_mask = np.zeros((size, size), dtype=np.uint8)
    for k, o in enumerate(objects, start=1):  # painter's order: later objects occlude
        y0, y1, x0, x1 = o["box"]
        tex = _texture(o["cls"], xx[y0:y1, x0:x1] - o["cx"], yy[y0:y1, x0:x1] - o["cy"], size / 224, rng)
        c1, c2 = rng.choice(len(colours), size=2, replace=False)
        paint = np.where(tex[..., None], colours[c1], colours[c2]) * rng.uniform(0.8, 1.2)
        inside = o["inside"]
        img[y0:y1, x0:x1][inside] = paint[inside]
        cls_mask[y0:y1, x0:x1][inside] = o["cls"]
        inst_mask[y0:y1, x0:x1][inside] = k
    img += 8.0 * rng.standard_normal(img.shape, dtype=np.float32)
    if ignore_width > 0:
        # A pixel is ignored when its window straddles an instance boundary; window side
        # ignore_width + 1 gives a band ignore_width px thick (VOC marks boundaries alike).
        win = ignore_width + 1
        border = ndimage.maximum_filter(inst_mask, size=win) != ndimage.minimum_filter(
            inst_mask, size=win
        )
        cls_mask[border] = _IGNORE
        inst_mask[border] = _IGNORE
    return np.clip(img, 0, 255).astype(np.uint8), cls_mask, inst_mask


def _save_palette_png(mask: np.ndarray, path: Path) -> None:
    png = Image.fromarray(mask, mode="P")
    png.putpalette(_VOC_PALETTE_BYTES)
    png.save(path)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_params(n_train: int, n_val: int, size: int, num_classes: int, ignore_width: int) -> None:
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train}, {n_val}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px so objects span several patches, got {size}")
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(
            f"num_classes (background included) must be in 2..{len(SYNTHETIC_CLASSES)}, "
            f"got {num_classes}"
        )
    if ignore_width < 0:
        raise ValueError(f"ignore_width must be >= 0, got {ignore_width}")


def make_synthetic_voc(
    root: str | Path,
    n_train: int = 300,
    n_val: int = 100,
    size: int = 224,
    seed: int = 0,
    num_classes: int = len(SYNTHETIC_CLASSES),
    ignore_width: int = 3,
) -> Path:
    """Write the synthetic scenes in VOC 2012 layout under ``root`` and return ``root``.

    Deterministic: the same arguments give byte-identical files. Image i depends only on
    (seed, i, size, num_classes, ignore_width), so the first ``n_train`` images are the train
    split and the next ``n_val`` the val split.

    Args:
        num_classes: class count including background (2..7); object classes are the first
            ``num_classes - 1`` of disc, square, triangle, ring, cross, star.
        ignore_width: thickness in px of the 255 band around object boundaries (0 disables).
    """
    _check_params(n_train, n_val, size, num_classes, ignore_width)
    root = Path(root)
    _check_writable(root)
    dirs = {
        name: root / name
        for name in (
            "JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"
        )
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    names = [f"synth_{i:05d}" for i in range(n_train + n_val)]
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        img, cls_mask, inst_mask = _render(size, num_classes, ignore_width, rng)
        Image.fromarray(img).save(dirs["JPEGImages"] / f"{name}.jpg", quality=92)
        _save_palette_png(cls_mask, dirs["SegmentationClass"] / f"{name}.png")
        _save_palette_png(inst_mask, dirs["SegmentationObject"] / f"{name}.png")
    split_dir = dirs["ImageSets/Segmentation"]
    (split_dir / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (split_dir / "val.txt").write_text("\n".join(names[n_train:]) + "\n")
    specs = _CLASS_SPECS[:num_classes]
    (root / "classes.txt").write_text("\n".join(name for name, _ in specs) + "\n")
    (root / "README.txt").write_text(
        "Synthetic VOC-layout scenes (densessl.data.synthetic). Class = shape + texture; colours\n"
        "are random per instance from one shared palette. 255 = ignore (object boundaries).\n\n"
        + "\n".join(f"{i}: {name:<10} {tex}" for i, (name, tex) in enumerate(specs))
        + "\n"
    )
    params = dict(
        n_train=n_train, n_val=n_val, size=size, seed=seed, num_classes=num_classes,
        ignore_width=ignore_width, version=GENERATOR_VERSION,
    )
    (root / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    (root / MARKER).write_text("generated by densessl.data.synthetic; safe to delete with this folder\n")
    return root


DEFAULT_PARAMS: dict[str, int] = {
    name: p.default
    for name, p in inspect.signature(make_synthetic_voc).parameters.items()
    if name != "root"
}


def _read_params(root: Path) -> dict | None:
    try:
        return json.loads((root / "params.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


class ForeignFolderError(ValueError):
    """``data.root`` of the synthetic data points at a folder densessl did not generate."""


# What a foreign folder looks like -> the data config that reads it.
_LAYOUT_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("JPEGImages", "SegmentationClass"), "data=voc"),
    (("images/training", "annotations/training"), "data=ade20k"),
    (("ADEChallengeData2016",), "data=ade20k"),
    (("images/train2017",), "data=coco"),
    (("train2017",), "data=coco"),
    (("leftImg8bit",), "data=cityscapes"),
)


def _is_generated(root: Path) -> bool:
    if (root / MARKER).is_file():
        return True
    # Folders written before the marker existed: our params.json (all our keys) + our README.txt.
    params = _read_params(root)
    readme = root / "README.txt"
    return (isinstance(params, dict) and set(params) == {*DEFAULT_PARAMS, "version"}
            and readme.is_file() and readme.read_text().startswith("Synthetic VOC-layout scenes (densessl"))


# Every path the generator writes, relative to root: anything else in a marked folder is the user's.
_OWN_FILES = re.compile(
    r"(JPEGImages/synth_\d+\.jpg|Segmentation(Class|Object)/synth_\d+\.png|ImageSets/Segmentation/(train|val)\.txt"
    r"|classes\.txt|README\.txt|params\.json|" + re.escape(MARKER) + r")")


def _foreign_files(root: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` files under ``root`` that the generator did not write (symlinks count as foreign)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not _OWN_FILES.fullmatch(rel):
            found.append(rel)
            if len(found) == limit:
                break
    return found


def _check_writable(root: Path) -> None:
    """Refuse to replace a non-empty folder that densessl did not generate, or a generated one that
    has since received files of the user's: those are the user's data."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ForeignFolderError(f"data.root={root} is a file, not a folder; the synthetic scenes need a folder "
                                 f"of their own (leave data.root at its default or name a new folder).")
    if not any(root.iterdir()):
        return
    if _is_generated(root):
        foreign = _foreign_files(root)
        if not foreign:
            return
        raise ForeignFolderError(
            f"data.root={root} holds generated synthetic scenes that must be regenerated (other parameters), but "
            f"also files densessl did not write ({', '.join(foreign)}). Nothing was changed. Move those files out, "
            f"or point data.root at a new folder.")
    hint = next((opt for parts, opt in _LAYOUT_HINTS if all((root / p).exists() for p in parts)), None)
    looks = (f" It looks like a dataset read by {hint}: add {hint} to use it." if hint
             else " To train on your own images use data=imagefolder; see data/README.md for the dataset configs.")
    raise ForeignFolderError(
        f"data.root={root} is a non-empty folder that densessl did not generate (no {MARKER} marker), and "
        f"data=synthetic would replace it with generated scenes. Nothing was changed.{looks} For synthetic "
        f"scenes, leave data.root at its default or name an empty or new folder.")


def ensure_synthetic_voc(cache_dir: str | Path | None = None, **params) -> Path:
    """Return a synthetic VOC root under ``cache_dir``, generating it only when needed.

    ``cache_dir`` defaults to :func:`default_cache_dir`. ``params`` are those of
    :func:`make_synthetic_voc`. The folder is reused when its ``params.json`` matches, else it is
    regenerated, but only when it carries the generator's marker: a non-empty folder without it
    raises :class:`ForeignFolderError` and is left untouched. Safe when several processes call
    this at once: each builds in a private temp folder and publishes it with an atomic rename; a
    process that loses the race keeps the winner's copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise TypeError(
            f"unknown synthetic dataset parameters {sorted(unknown)}; valid: {sorted(DEFAULT_PARAMS)}"
        )
    wanted = {**DEFAULT_PARAMS, **params, "version": GENERATOR_VERSION}
    if _read_params(root) == wanted and _is_generated(root):
        return root
    _check_writable(root)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    make_synthetic_voc(tmp, **{k: v for k, v in wanted.items() if k != "version"})
    while True:
        try:
            os.rename(tmp, root)  # atomic; fails if root exists and is not empty
            return root
        except OSError:
            if _read_params(root) == wanted and _is_generated(root):  # another process published the same data first
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            try:  # checked again: the folder may have changed while we generated
                _check_writable(root)
            except ForeignFolderError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # Stale copy (other params): move it aside atomically, then delete it.
            stale = root.parent / f".{root.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(root, stale)
            except FileNotFoundError:  # someone else moved it already: retry publishing
                continue
            shutil.rmtree(stale, ignore_errors=True)
