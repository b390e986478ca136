"""Overclustering evaluation of dense features (Leopart / NeCo protocol; docs/evaluation/overclustering.md).

Pipeline (NeCo experiments/overcluster/eval_overcluster.py + experiments/utils.py):
z-score every feature dimension -> faiss PCA to ``pca_dim`` -> faiss k-means per (K, seed) ->
cluster map nearest-upsampled to ``mask_size`` -> ignore pixels dropped -> Hungarian matching if
K == num_classes, else many-to-one (precision) -> mIoU, reported as mean and std over seeds.
The z-scored/PCA'd points and the masks at ``mask_size`` are computed once and shared by all K and
seeds; each (K, seed) costs one k-means plus one bincount confusion matrix. The protocol's options and
their defaults live in :class:`OverclusterOptions`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.evaluation.features import DenseFeatures
from densessl.evaluation.metrics import apply_matching, confusion_matrix, match_hungarian, match_many_to_one, miou
from densessl.evaluation.runtime import progress_bar
from densessl.faiss_import import check_faiss_gpu, faiss_threads, import_faiss
from densessl.options import with_overrides

faiss = import_faiss()

__all__ = [
    "OverclusterInputs",
    "OverclusterOptions",
    "OverclusterResult",
    "cluster_miou",
    "kmeans_labels",
    "overcluster",
    "prepare_overcluster_inputs",
    "resize_masks",
]

_CHUNK_ROWS = 32768  # rows per chunk when z-scoring/projecting: bounds the float64 temporaries to ~100 MB


@dataclass(frozen=True)
class OverclusterOptions:
    """Options of the overclustering protocol, the one home of their defaults: the offline protocol of
    NeCo/Leopart (448 px input, PCA 50, k-means with 100 iterations and 5 restarts per K and seed 0-4,
    masks at 100 px). configs/eval/overcluster.yaml (``eval.options``) and configs/train.yaml
    (``overcluster``) restate them, checked by tests/evaluation/test_overcluster.py. The in-training
    variant (Leopart's PredsmIoUKmeans) is upsample="features", niter=50.

    Attributes:
        image_size, batch_size, max_images: input side (px), feature-extraction batch and the first
            ``max_images`` images of the dataset (None: all); read by ``evaluate_overclustering`` only.
        ks, seeds: the numbers of clusters K and the k-means seeds; mIoU is reported per K over seeds.
        pca_dim: PCA dimension after z-scoring every feature dimension.
        niter, nredo: faiss k-means iterations and restarts (the best of nredo is kept).
        mask_size: side of the ground truth and the upsampled cluster maps.
        ignore_index: label of ignored pixels.
        spherical: faiss spherical k-means (normalised centroids).
        gpu: faiss on the GPU.
        upsample: "clusters" (tokens clustered, pixels take their token's cluster) or "features"
            (tokens bilinearly upsampled to mask_size, every pixel clustered).
        num_vis: images whose matched maps are kept for pictures (the first ones, first seed).
    """

    image_size: int = 448
    batch_size: int = 16
    max_images: int | None = None
    ks: tuple[int, ...] = (100, 300, 500)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    pca_dim: int = 50
    niter: int = 100
    nredo: int = 5
    mask_size: int = 100
    ignore_index: int = 255
    spherical: bool = False
    gpu: bool = False
    upsample: Literal["clusters", "features"] = "clusters"
    num_vis: int = 0

    def __post_init__(self) -> None:
        # Configs give lists; tuples keep the options immutable.
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))


@dataclass
class OverclusterInputs:
    """Everything shared by all (K, seed) runs.

    points: (N, pca_dim) float32, z-scored and PCA-projected rows (tokens, or pixels for upsample="features").
    Kept (non-ignore) pixels at mask resolution, grouped by (row of ``points`` they take their cluster
    from, class), so a confusion matrix costs O(pairs) ~ O(tokens) instead of O(pixels):
    pair_rows: (P,) int64, pair_classes: (P,) int64, pair_counts: (P,) int64 pixels per pair.
    rows_of_first: (m, S, S) int64 rows of all pixels of the first images (for pictures), m may be 0.
    """

    points: np.ndarray
    pair_rows: Tensor
    pair_classes: Tensor
    pair_counts: Tensor
    rows_of_first: Tensor


@dataclass
class OverclusterResult:
    """mIoU (fraction in [0, 1]) for each K, one value per seed, plus optional pictures and timings.

    matched_maps: K -> (m, S, S) uint8 class maps of the first m images under the first seed.
    vis_targets: (m, S, S) uint8 ground truth at mask resolution for the same images (255 = ignore).
    """

    num_classes: int
    seeds: tuple[int, ...]
    miou: dict[int, list[float]]
    matched_maps: dict[int, Tensor] = field(default_factory=dict)
    vis_targets: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def mean(self, k: int) -> float:
        return float(np.mean(self.miou[k]))

    def std(self, k: int) -> float:
        """Population std (ddof=0, numpy's default) over seeds."""
        return float(np.std(self.miou[k]))

    def table(self) -> str:
        lines = [f"{'K':>6} {'matching':>12} {'mIoU %':>8} {'std':>6}  per seed"]
        for k, values in self.miou.items():
            matching = "hungarian" if k == self.num_classes else "many-to-one"
            seeds = " ".join(f"{100 * v:.1f}" for v in values)
            lines.append(f"{k:>6} {matching:>12} {100 * self.mean(k):>8.2f} {100 * self.std(k):>6.2f}  {seeds}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, float]:
        """Flat figures for JSON/CSV logging: k{K}_miou_mean, k{K}_miou_std, k{K}_miou_seed{s}."""
        out: dict[str, float] = {}
        for k, values in self.miou.items():
            out[f"k{k}_miou_mean"] = self.mean(k)
            out[f"k{k}_miou_std"] = self.std(k)
            out.update({f"k{k}_miou_seed{s}": v for s, v in zip(self.seeds, values)})
        return out


def resize_masks(masks: Tensor, mask_size: int, image_size: tuple[int, int] | None = None) -> Tensor:
    """Ground truth at evaluation resolution: (n, H', W') uint8 -> (n, mask_size, mask_size) uint8.

    Reproduces the reference: its target transform resizes masks to the input size with PIL NEAREST
    (= torch "nearest-exact"), then its eval step downsamples with F.interpolate "nearest". Masks already
    at ``image_size`` (or image_size=None) skip the first step, as with densessl's segmentation datasets.
    """
    masks = masks[:, None]
    if image_size is not None and tuple(masks.shape[-2:]) != tuple(image_size):
        masks = F.interpolate(masks, size=tuple(image_size), mode="nearest-exact")
    if masks.shape[-2:] != (mask_size, mask_size):
        masks = F.interpolate(masks, size=(mask_size, mask_size), mode="nearest")
    return masks[:, 0]


def _nearest_source(src: int, dst: int) -> Tensor:
    # The exact source indices of F.interpolate(mode="nearest"), taken from torch itself so the
    # upsampled cluster maps match the reference's F.interpolate(clustering.float(), "nearest").
    ramp = torch.arange(src, dtype=torch.float32).view(1, 1, src)
    return F.interpolate(ramp, size=dst, mode="nearest").view(dst).long()


def _token_rows(num_images: int, grid: tuple[int, int], mask_size: int) -> Tensor:
    """(n, S, S) int64: the token row (image-major, row-major) that nearest upsampling gives each pixel."""
    h, w = grid
    ys, xs = _nearest_source(h, mask_size), _nearest_source(w, mask_size)
    per_image = (ys[:, None] * w + xs[None, :]).reshape(1, mask_size, mask_size)
    return torch.arange(num_images).mul_(h * w).view(-1, 1, 1) + per_image


def _faiss_pca_subset(num_rows: int, dim: int, max_points_per_d: int) -> Tensor:
    # faiss PCAMatrix.train keeps at most max_points_per_d * dim rows, drawn by rand_perm(seed 1234)
    # (faiss fvecs_maybe_subsample). Drawing the same rows here lets us z-score only that subset
    # instead of a full copy of the features, and gives bit-identical PCA matrices.
    limit = max_points_per_d * dim
    if num_rows <= limit:
        return torch.arange(num_rows)
    perm = np.empty(num_rows, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), num_rows, 1234)
    return torch.from_numpy(perm[:limit].astype(np.int64))


def _zscore_pca(chunks: Callable[[], Iterator[Tensor]], num_rows: int, dim: int, pca_dim: int) -> np.ndarray:
    """Per-dimension z-scoring then faiss PCA of rows streamed as (m, dim) float32 chunks -> (num_rows, pca_dim).

    ``chunks()`` must yield consecutive row blocks covering rows 0..num_rows-1 (called twice).
    Z-scoring is sklearn StandardScaler's (population variance, zero-variance dims left unscaled),
    hand-written to stream chunks: no full-size copy of the features is ever made.
    """
    pca = faiss.PCAMatrix(dim, pca_dim)
    subset = _faiss_pca_subset(num_rows, dim, pca.max_points_per_d)
    order = subset.argsort()
    sorted_rows = subset[order]
    train = torch.empty(len(subset), dim, dtype=torch.float32)
    # Pass 1: per-dimension sums of rows shifted by the first chunk's mean (so no catastrophic
    # cancellation in sum(x^2) - n mean^2), accumulated in float64; gather the PCA training rows.
    shift = sum1 = sum2 = None
    start = 0
    for chunk in chunks():
        if shift is None:
            shift = chunk.mean(0)
            sum1, sum2 = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
        centred = chunk - shift
        sum1 += centred.sum(0).double()
        sum2 += centred.square_().sum(0).double()
        lo, hi = torch.searchsorted(sorted_rows, torch.tensor([start, start + len(chunk)]))
        train[order[lo:hi]] = chunk[sorted_rows[lo:hi] - start]
        start += len(chunk)
    if start != num_rows:
        raise ValueError(f"chunks yielded {start} rows, expected {num_rows}")
    offset = sum1 / num_rows
    mean = shift.double() + offset
    std = (sum2 / num_rows - offset.square()).clamp_min(0).sqrt()
    std = std.where(std > 10 * torch.finfo(torch.float64).eps, torch.ones_like(std))
    pca.train(train.sub_(mean.float()).div_(std.float()).numpy())
    del train
    # Pass 2: faiss applies y = A z + b; with z = (x - mean) / std that is one GEMM per chunk,
    # y = x (A / std)^T + (b - A (mean / std)), written straight into the output (no temporaries).
    a = torch.from_numpy(faiss.vector_to_array(pca.A).reshape(pca_dim, dim)).double()
    b = torch.from_numpy(faiss.vector_to_array(pca.b)).double()
    weight, bias = (a / std).T.float().contiguous(), (b - a @ (mean / std)).float()
    out = np.empty((num_rows, pca_dim), dtype=np.float32)
    out_t = torch.from_numpy(out)
    start = 0
    for chunk in chunks():
        torch.addmm(bias, chunk, weight, out=out_t[start : start + len(chunk)])
        start += len(chunk)
    return out


def prepare_overcluster_inputs(
    features: DenseFeatures, options: OverclusterOptions | None = None, **overrides: Any
) -> OverclusterInputs:
    """Z-score + PCA the points once and index the kept ground-truth pixels (shared by all K and seeds).

    Reads pca_dim, mask_size, ignore_index, upsample and num_vis of ``options`` (default
    :class:`OverclusterOptions`; ``overrides`` replace single fields). upsample="clusters" (offline
    protocol): tokens are clustered, pixels take their token's cluster via nearest upsampling.
    upsample="features" (Leopart's in-training PredsmIoUKmeans): tokens are first bilinearly upsampled
    to mask_size and every pixel is clustered (N = n * mask_size**2 points).
    """
    options = with_overrides(OverclusterOptions, options, overrides)
    pca_dim, mask_size, upsample = options.pca_dim, options.mask_size, options.upsample
    n, (h, w), dim = features.num_images, features.grid, features.tokens.shape[-1]
    if not 1 <= pca_dim <= dim:
        raise ValueError(f"pca_dim must be in [1, {dim}] (the feature dimension), got {pca_dim}")
    if mask_size < 1:
        raise ValueError(f"mask_size must be >= 1, got {mask_size}")
    gt = resize_masks(features.masks, mask_size, features.image_size)
    tokens = features.tokens
    if upsample == "clusters":
        flat = tokens.reshape(-1, dim)
        num_rows = n * h * w

        def chunks() -> Iterator[Tensor]:
            yield from flat.split(_CHUNK_ROWS)

        rows = _token_rows(n, (h, w), mask_size)
    elif upsample == "features":
        per_chunk = max(1, _CHUNK_ROWS // mask_size**2)
        num_rows = n * mask_size**2

        def chunks() -> Iterator[Tensor]:
            for block in tokens.split(per_chunk):
                up = F.interpolate(block.permute(0, 3, 1, 2), size=(mask_size, mask_size), mode="bilinear")
                yield up.permute(0, 2, 3, 1).reshape(-1, dim)

        rows = torch.arange(num_rows).view(n, mask_size, mask_size)
    else:
        raise ValueError(f"upsample must be 'clusters' or 'features', got {upsample!r}")
    points = _zscore_pca(chunks, num_rows, dim, pca_dim)
    keep = gt != options.ignore_index
    # Masks are uint8, so row * 256 + class is a unique key for the (row, class) pair.
    pairs, counts = torch.unique(rows[keep] * 256 + gt[keep], return_counts=True)
    return OverclusterInputs(points, pairs // 256, pairs % 256, counts, rows[: options.num_vis].clone())


def kmeans_labels(
    points: np.ndarray, k: int, seed: int, options: OverclusterOptions | None = None, **overrides: Any
) -> Tensor:
    """faiss k-means on (N, d) float32 points, then nearest-centroid assignment -> (N,) int64 labels.

    Reads niter, nredo, spherical and gpu of ``options`` (default :class:`OverclusterOptions`;
    ``overrides`` replace single fields)."""
    options = with_overrides(OverclusterOptions, options, overrides)
    if k > len(points):
        raise ValueError(f"K={k} exceeds the number of points ({len(points)}): use fewer clusters or more images")
    check_faiss_gpu(options.gpu)
    kmeans = faiss.Kmeans(points.shape[1], k, niter=options.niter, nredo=options.nredo, seed=seed,
                          spherical=options.spherical, gpu=options.gpu)
    kmeans.train(points)
    return torch.from_numpy(kmeans.index.search(points, 1)[1].reshape(-1))


def cluster_miou(labels: Tensor, inputs: OverclusterInputs, k: int, num_classes: int) -> tuple[float, Tensor]:
    """mIoU of one clustering after matching -> (mIoU, (K,) cluster-to-class mapping).

    Hungarian if K == num_classes, otherwise many-to-one by precision (reference rule, also for K < C).
    """
    pred = labels[inputs.pair_rows]
    conf = confusion_matrix(pred, inputs.pair_classes, k, num_classes, ignore_index=None, weights=inputs.pair_counts)
    mapping = match_hungarian(conf) if k == num_classes else match_many_to_one(conf)
    return miou(apply_matching(conf, mapping, num_classes)), mapping


def overcluster(
    features: DenseFeatures,
    num_classes: int,
    options: OverclusterOptions | None = None,
    *,
    num_threads: int | None = None,
    progress: bool = False,
    **overrides: Any,
) -> OverclusterResult:
    """Overclustering mIoU for every K in ``options.ks``, over ``options.seeds`` (see module docstring).

    ``options``: :class:`OverclusterOptions` (default: the offline protocol); ``overrides`` replace single
    fields, e.g. ``overcluster(features, 21, ks=(21,))``. ``num_vis`` keeps the matched maps of the first
    images under the first seed. faiss uses ``num_threads`` OpenMP threads (default: torch's intra-op
    thread count, so both libraries respect one setting), restored afterwards. ``progress``: a tqdm bar
    over the (K, seed) k-means runs (stderr, terminals only).
    """
    options = with_overrides(OverclusterOptions, options, overrides)
    ks, seeds, num_vis = options.ks, options.seeds, options.num_vis
    if num_classes < 1 or not ks or min(ks) < 1 or not seeds:
        raise ValueError(f"need num_classes >= 1, at least one K >= 1 and one seed (got {num_classes}, {ks}, {seeds})")
    if len(set(ks)) != len(ks):
        raise ValueError(f"duplicate K in {ks}")
    check_faiss_gpu(options.gpu)
    num_threads = num_threads or torch.get_num_threads()
    timings: dict[str, float] = {}
    with faiss_threads(num_threads):
        start = time.perf_counter()
        inputs = prepare_overcluster_inputs(features, options)
        timings["prepare_s"] = time.perf_counter() - start
        results: dict[int, list[float]] = {}
        matched_maps: dict[int, Tensor] = {}
        for k in ks:
            timings[f"kmeans_k{k}_s"] = timings[f"metric_k{k}_s"] = 0.0
        runs = [(k, seed) for k in ks for seed in seeds]
        bar = progress_bar(runs, enabled=progress, desc="k-means (K, seed)", unit="run")
        for k, seed in bar:
            bar.set_postfix_str(f"K={k} seed={seed}")
            start = time.perf_counter()
            labels = kmeans_labels(inputs.points, k, seed, options)
            middle = time.perf_counter()
            value, mapping = cluster_miou(labels, inputs, k, num_classes)
            timings[f"kmeans_k{k}_s"] += middle - start
            timings[f"metric_k{k}_s"] += time.perf_counter() - middle
            results.setdefault(k, []).append(value)
            if seed == seeds[0] and num_vis:
                matched_maps[k] = mapping[labels[inputs.rows_of_first]].to(torch.uint8)
    vis_targets = resize_masks(features.masks[:num_vis], options.mask_size, features.image_size) if num_vis else None
    return OverclusterResult(num_classes, seeds, results, matched_maps, vis_targets, timings)
