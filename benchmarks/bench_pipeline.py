"""Data pipeline throughput on one core: densessl's loader vs the reference repositories' per-image one.

    python benchmarks/bench_pipeline.py [--images 64] [--repeats 3] [--preset neco ibot]
                                        [--batch 16] [--gpu-images-per-s 150] [--cache DIR]

Images: ``--images`` COCO-like 640 x 480 JPEGs at quality 90, written once into ``--cache`` (default: a
folder in the system temp dir). Their content is "natural-looking noise + shapes" (not the synthetic
scene renderer, whose scenes are square): 1/f colour noise, which has a photograph's power spectrum,
under random filled ellipses, rectangles and polygons, plus sensor-like grain; files average
~140 kB, near COCO train2017's ~160 kB, so entropy decoding costs about what it costs on COCO.
Files are read from the page cache (a warm-up pass reads each once): disk throughput is not measured.

Everything runs in this process on one thread (``torch.set_num_threads(1)``), as in one DataLoader
worker. Per preset (views from ``configs/method/<name>.yaml``; NeCo with ``+experiment=neco_dinov2``'s
2 x 518 + 4 x 98 crops):

* ours, loader: ``UnlabeledImages(ImageFolderDataset)[(index, seed)]`` (read_image + the objective's
  view transform, seeded per item as in training) + its collate into batches of ``--batch``;
* ours, colour: ``ColorAugment`` on the collated uint8 batches, on the CPU here. It runs on the
  training device (the GPU in a GPU run), so it is its own column and not part of the loader's rate;
* reference: what vpariza/NeCo and bytedance/ibot do per image in the worker, on PIL: per crop
  RandomResizedCrop -> ColorJitter (p 0.8) -> RandomGrayscale (0.2) -> PIL GaussianBlur with sigma
  U(0.1, 2) -> ToTensor -> Normalize (iBOT: bicubic, flips, blur p 1.0 / 0.1 / 0.5 for global 1 /
  global 2 / locals, solarisation p 0.2 on global 2, and its masks), then the default collate of float
  tensors. Same crop counts, sizes and scales as ours.

Images/s are medians over ``--repeats`` passes over all images. "total" is one core doing both parts
(1 / (1 / loader + 1 / colour)); the ratio column compares loader rates, i.e. what a GPU run asks of its
CPU workers.

CPU cores one A100 needs for ``+experiment=neco_dinov2`` (batch 64, colour on the GPU)::

    cores = (GPU images/s at batch 64) / (ours, loader images/s/core)

The GPU rate is a parameter (``--gpu-images-per-s``). Its default, 150 images/s, is an estimate for
ViT-S/14 at 2 x 518 + 4 x 98 with bf16: ~0.77 TFLOP per image (student forward + backward on all crops,
teacher forward on the globals) at ~40 % of the A100's 312 TFLOP/s gives ~160, rounded down; measure
it with a GPU run's steps/s x 64 and pass it in. Give the loader ceil(cores) workers
(``data.num_workers``) and the main process a core of its own (pinned-memory copies, logging).

Also printed: how often JPEG reduced-size decoding (``Image.draft``: DCT scaling by 2, 4 or 8) could
apply, i.e. how many images have every crop at >= 2x its output size on both axes. At 640 x 480 that
is no NeCo image (its 518 px globals upsample) and < 1 % of iBOT's, so the loader does not draft.
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torchvision import transforms as T

from densessl.constants import IMAGENET_MEAN, IMAGENET_STD
from densessl.data import ImageFolderDataset
from densessl.data.datamodule import UnlabeledImages
from densessl.methods.ibot import IBOTViews, collate_ibot
from densessl.transforms import ColorAugment, MultiCropWithBoxes, collate_multicrop
from densessl.transforms.masks import MaskSampler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WIDTH, HEIGHT, QUALITY = 640, 480, 90
CONTENT_VERSION = 1  # bump when the image content changes: the cache folder is keyed by it


# ---------------------------------------------------------------------- images
def natural_image(seed: int) -> Image.Image:
    """1/f colour noise + random filled shapes + grain, 640 x 480 RGB."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(HEIGHT)[:, None], np.fft.rfftfreq(WIDTH)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / WIDTH)  # 1/f: a photograph's spectrum
    mix = rng.normal(size=(3, 3)) + 2 * np.eye(3)  # correlated channels, as in natural colour
    noise = []
    for _ in range(3):
        spectrum = amplitude * (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape))
        channel = np.fft.irfft2(spectrum, s=(HEIGHT, WIDTH))
        noise.append((channel - channel.mean()) / channel.std())
    pixels = np.einsum("ij,jhw->hwi", mix, np.stack(noise)) * 30 + rng.uniform(60, 190, 3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 20))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y, r = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(10, 150)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r], fill=colour)
        elif kind == 1:
            draw.rectangle([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            draw.polygon([(x + r * np.cos(a), y + r * np.sin(a)) for a in angles], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(0.7))  # soft edges, as a lens gives
    grain = rng.normal(0, 7, (HEIGHT, WIDTH, 1)) + rng.normal(0, 3.5, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))


def write_images(folder: Path, n: int) -> list[Path]:
    """The first ``n`` images (image i from seed i), written once."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            natural_image(i).save(tmp, "JPEG", quality=QUALITY)
            tmp.rename(path)
    return paths


# ---------------------------------------------------------------------- presets
def method_config(name: str) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "method" / f"{name}.yaml"), resolve=True)
    if name == "neco":  # +experiment=neco_dinov2's crop sizes
        experiment = OmegaConf.load(CONFIGS / "experiment" / "neco_dinov2.yaml")
        cfg["crops"].update(OmegaConf.to_container(experiment.method.crops))
    return cfg


def ours(preset: str, cfg: dict[str, Any], ibot_grid: int) -> tuple[Callable, Callable, Callable]:
    """(view transform, collate, colour on a collated batch) as the objective trains."""
    crops = MultiCropWithBoxes(**cfg["crops"])
    if preset == "neco":  # SSLMethod.on_after_batch_transfer: one ColorAugment for every crop
        color = ColorAugment(**cfg["color"])
        return crops, collate_multicrop, lambda batch: [color(c) for c in batch["crops"]]
    views = IBOTViews(crops, MaskSampler(**cfg["masking"]), ibot_grid, cfg["flip_p"])
    # IBOT.prepare_views: per-view overrides for the two globals, the base settings for locals
    augs = [ColorAugment(**{**cfg["color"], **o}) for o in cfg["global_color"]] + [ColorAugment(**cfg["color"])]
    return views, collate_ibot, lambda batch: [augs[min(i, 2)](c) for i, c in enumerate(batch["crops"])]


class PILBlur:
    """The references' GaussianBlur: PIL's, radius U(0.1, 2), with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class PILSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


def reference(preset: str, cfg: dict[str, Any], ibot_grid: int) -> tuple[Callable, Callable]:
    """(per-image transform on the PIL image, collate) of the reference repositories."""
    c, crops = cfg["color"], cfg["crops"]
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[
        crops.get("interpolation", "bilinear")]
    jitter = T.RandomApply([T.ColorJitter(c["brightness"], c["contrast"], c["saturation"], c["hue"])], p=c["jitter_p"])
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]

    def view(size: int, scale: list[float], extra: list[Callable]) -> T.Compose:
        return T.Compose([T.RandomResizedCrop(size, scale=tuple(scale), interpolation=mode), *extra, *tail])

    n_global, n_local = crops["n_global"], crops["n_local"]
    if preset == "neco":
        colour = [jitter, T.RandomGrayscale(c["grayscale_p"]), PILBlur(c["blur_p"])]
        views = [view(crops["global_size"], crops["global_scale"], colour)] * n_global
        views += [view(crops["local_size"], crops["local_scale"], colour)] * n_local
        return (lambda image: [v(image) for v in views]), torch.utils.data.default_collate
    flip_jitter = [T.RandomHorizontalFlip(cfg["flip_p"]), jitter, T.RandomGrayscale(c["grayscale_p"])]
    settings = [{**c, **o} for o in cfg["global_color"]]
    views = [view(crops["global_size"], crops["global_scale"], flip_jitter + [PILBlur(s["blur_p"])]
                  + ([PILSolarize(s["solarize_p"])] if s.get("solarize_p", 0) > 0 else [])) for s in settings]
    views += [view(crops["local_size"], crops["local_scale"], flip_jitter + [PILBlur(c["blur_p"])])] * n_local
    masks = MaskSampler(**cfg["masking"])  # iBOT's ImageFolderMask draws them in the worker too

    def transform(image: Image.Image) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [v(image) for v in views], torch.stack([masks(ibot_grid, ibot_grid) for _ in range(2)])

    return transform, torch.utils.data.default_collate


def draftable(crops: MultiCropWithBoxes, n: int = 2000) -> float:
    """Fraction of images whose every crop is >= 2x its output size on both axes (seeded box draws)."""
    rng, sizes = random.Random(0), [s.size for s in crops.specs for _ in range(s.count)]
    hits = 0
    for _ in range(n):
        boxes = crops.sample_boxes(WIDTH, HEIGHT, rng)
        hits += all(min(b[2] - b[0], b[3] - b[1]) >= 2 * s for b, s in zip(boxes, sizes))
    return hits / n


# ---------------------------------------------------------------------- timing
def batches(load: Callable[[int], Any], n: int, batch: int, collate: Callable) -> tuple[list[Any], float]:
    """Collated batches of ``load(i)`` for i < n (the tail that does not fill a batch is dropped, as
    drop_last) and the seconds it took."""
    out, samples = [], []
    start = time.perf_counter()
    for i in range(n):
        samples.append(load(i))
        if len(samples) == batch:
            out.append(collate(samples))
            samples = []
    return out, time.perf_counter() - start


def run_preset(preset: str, paths: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = method_config(preset)
    if preset == "ibot" and args.ibot_local_crops is not None:
        cfg["crops"]["n_local"] = args.ibot_local_crops
    grid = cfg["crops"]["global_size"] // 16  # ibot_coco's ViT-S/16
    n = len(paths) // args.batch * args.batch
    transform, collate, colour = ours(preset, cfg, grid)
    dataset = UnlabeledImages(ImageFolderDataset(paths[0].parent), transform)
    ref_transform, ref_collate = reference(preset, cfg, grid)

    def ours_item(i: int) -> Any:
        return dataset[(i, i)]

    def ref_item(i: int) -> Any:
        random.seed(i)  # the worker's seeded random module
        torch.manual_seed(i)  # torchvision's v1 transforms draw from torch
        with Image.open(paths[i]) as im:  # torchvision's pil_loader
            return ref_transform(im.convert("RGB"))

    rates: dict[str, list[float]] = {"ours": [], "colour": [], "reference": []}
    for r in range(args.repeats + 1):  # pass 0 warms the page cache, allocator and kornia
        out, seconds = batches(ours_item, n, args.batch, collate)
        start = time.perf_counter()
        with torch.no_grad():
            for b in out:
                colour(b)
        colour_seconds = time.perf_counter() - start
        del out
        _, ref_seconds = batches(ref_item, n, args.batch, ref_collate)
        if r > 0:
            rates["ours"].append(n / seconds)
            rates["colour"].append(n / colour_seconds)
            rates["reference"].append(n / ref_seconds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    crops = cfg["crops"]
    views = (f"{crops['n_global']}x{crops['global_size']} + {crops['n_local']}x{crops['local_size']}"
             f" {crops.get('interpolation', 'bilinear')}")
    total = 1 / (1 / med["ours"] + 1 / med["colour"])
    return [
        {"preset": preset, "views": views, "pipeline": "densessl", "loader": med["ours"], "colour": med["colour"],
         "total": total, "ratio": f"{med['ours'] / med['reference']:.2f} (total {total / med['reference']:.2f})",
         "draft": draftable(transform if preset == "neco" else transform.crops)},
        {"preset": preset, "views": views, "pipeline": "reference (per-image PIL)", "loader": med["reference"],
         "colour": None, "total": med["reference"], "ratio": "1.00"},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", nargs="+", choices=["neco", "ibot"], default=["neco", "ibot"])
    parser.add_argument("--batch", type=int, default=16, help="collate batch (the runs use 64 per GPU)")
    parser.add_argument("--ibot-local-crops", type=int, default=None,
                        help="iBOT local crops (default: configs/method/ibot.yaml's n_local; iBOT ImageNet: 10)")
    parser.add_argument("--gpu-images-per-s", type=float, default=150.0,
                        help="one A100's training rate for +experiment=neco_dinov2 at batch 64 (estimate)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "densessl_bench_pipeline")
    args = parser.parse_args()
    if args.images < args.batch:
        parser.error(f"--images ({args.images}) must be at least --batch ({args.batch})")
    torch.set_num_threads(1)

    paths = write_images(args.cache / f"v{CONTENT_VERSION}_{WIDTH}x{HEIGHT}_q{QUALITY}", args.images)
    kb = statistics.mean(p.stat().st_size for p in paths) / 1e3
    print(f"{len(paths)} JPEGs {WIDTH}x{HEIGHT} q{QUALITY}, mean {kb:.0f} kB (COCO train2017: ~160 kB), in "
          f"{paths[0].parent}")
    print(f"torch {torch.__version__} (threads {torch.get_num_threads()}), torchvision {torchvision.__version__}, "
          f"Pillow {Image.__version__}, {platform.processor() or platform.machine()}, batch {args.batch}, "
          f"median of {args.repeats}\n")

    rows = [row for preset in args.preset for row in run_preset(preset, paths, args)]
    print("| preset | views | pipeline | loader images/s/core | colour-aug images/s (ours, batched, CPU) "
          "| total images/s/core | ratio ours/reference (loader) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        colour = f"{r['colour']:.1f}" if r["colour"] is not None else "in loader"
        print(f"| {r['preset']} | {r['views']} | {r['pipeline']} | {r['loader']:.1f} | {colour} | {r['total']:.1f} "
              f"| {r['ratio']} |")
    print()
    for r in rows:
        if "draft" in r:
            print(f"{r['preset']}: JPEG draft (every crop >= 2x its size) would apply to {100 * r['draft']:.1f} % "
                  f"of {WIDTH}x{HEIGHT} images")
    neco = {r["pipeline"]: r["loader"] for r in rows if r["preset"] == "neco"}
    if neco:
        gpu = args.gpu_images_per_s
        print(f"\nCPU cores per A100 for +experiment=neco_dinov2 = GPU images/s / loader images/s/core = "
              f"{gpu:g} / {neco['densessl']:.1f} = {math.ceil(gpu / neco['densessl'] * 10) / 10:.1f} "
              f"(reference pipeline: {gpu:g} / {neco['reference (per-image PIL)']:.1f} = "
              f"{math.ceil(gpu / neco['reference (per-image PIL)'] * 10) / 10:.1f}); --gpu-images-per-s {gpu:g}")


if __name__ == "__main__":
    main()
