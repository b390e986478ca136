"""DSE (Dense representation Structure Estimator) as batched tensor code.

Re-implements the official metric (EldercatSAM/SSL-Degradation, ``estimator.py``) and
regularizer (``DSE_regularizer.py``) of Dai et al., NeurIPS 2025 (arXiv 2510.17299); see
docs/dse.md. The reference loops over images, groups and clusters with a Python k-means; here
the k-means problems of a kind run as batched Lloyd iterations over
cache-sized chunks, all singular-value work runs as batched LAPACK calls, and chunks are spread
over one single-threaded worker per core. Where the time goes at (1024, 196, 384) on 2 cores
(``benchmarks/bench_dse.py``): the eigenvalues of the Gram matrices for M_dim and css (float32
Grams, float64 only for spectra float32 does not resolve: ``spectra.singular_values``), then the
k-means GEMMs and k-means++ seeding, then normalising and centring.

Terms of one batch ``Z`` of shape ``(B, N, D)`` (code variant, all distance terms divided by
``s`` = mean distance of a token to the batch-mean token):

* ``intra_img``  -- per image, k-means with ``local_clusters``; mean centred singular-value
  sum (css) over its clusters with >= 2 members; mean over images.
* ``inter``      -- per group of ``group_size`` consecutive images, k-means with
  ``global_clusters`` on the pooled tokens; mean over tokens of the Euclidean distance to
  the nearest *other* centroid; mean over groups.
* ``intra_batch`` -- css over all group clusters with >= 2 members, pooled over groups.
* ``dim``        -- one random token per image gives a ``(B, D)`` matrix per draw; mean
  normalised effective rank over ``N`` draws.
* ``value`` = inter + dim - (intra_img + intra_batch) / 2.

This module holds the terms, the metric (:func:`dse`, :func:`dse_over_batches`), its options
(:class:`DSEOptions`, the one home of their defaults) and rules and the regularizer. The lambda step across checkpoints is in ``densessl.metrics.selection``, the
batched k-means in ``densessl.metrics.kmeans`` and the singular-value spectra in ``densessl.metrics.spectra``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from densessl.amp import autocast_off
from densessl.metrics.kmeans import Seeding, kmeanspp_seed, lloyd, sq_dist
from densessl.metrics.spectra import centered_singular_sum, effective_rank, erank, singular_values
from densessl.options import with_overrides

__all__ = [
    "DSEOptions",
    "DSEResult",
    "centered_singular_sum",
    "dse",
    "dse_over_batches",
    "dse_regularizer",
    "effective_rank",
]

Variant = Literal["code", "paper"]

# Work is split into chunks of about this many bytes, processed by one single-threaded worker
# per core (``_parallel_map``). A chunk stays in the 32 MB L3 cache shared by two workers while
# k-means makes its ~45 passes over it: measured 39 GB/s per core from cache against 8 GB/s
# from DRAM for 32 MB chunks. Single-threaded workers on independent chunks also avoid an
# OpenMP fork/join per op, which on a shared machine can wait a scheduler slice each time.
_CHUNK_BYTES = 8 * 2**20
# css gathers clusters into zero-padded batches; sizes are rounded up to this multiple so a
# batch holds many clusters (zero rows add only zero singular values, so this is exact) while
# the eigenvalue cost, ~n^3, grows by only ~10% for clusters of ~65 tokens.
_PAD_MULTIPLE = 4
# Relative spread s / rms token norm below which the metric centres in float64: float32 rounding of
# the normalised tokens then adds relative errors of up to ~6e-8 / 1e-2 = 6e-6 to y.
_FLOAT32_SPREAD = 1e-2
# Relative spread s / rms token norm below which the features count as collapsed.
_COLLAPSE_RATIO = 1e-4

T = TypeVar("T")
R = TypeVar("R")


def _parallel_map(fn: Callable[[T], R], items: Iterable[T], device: torch.device) -> list[R]:
    """``[fn(i) for i in items]``, on one Python thread per torch thread for CPU work without autograd.

    Each worker runs single-threaded torch ops on its own chunk (torch releases the GIL inside
    ops); torch's thread count is restored afterwards. With autograd (the regularizer), on GPU
    or with one thread, items run in order on the calling thread. Results keep item order, and
    every random draw comes from a per-item generator, so the output does not depend on timing.
    """
    items = list(items)
    threads = torch.get_num_threads()
    if threads == 1 or len(items) < 2 or device.type != "cpu" or torch.is_grad_enabled():
        return [fn(i) for i in items]

    def run(item: T) -> R:
        with torch.no_grad():  # grad mode is per thread
            return fn(item)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(items))) as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(threads)


def _generators(generator: torch.Generator, count: int) -> list[torch.Generator]:
    """``count`` generators seeded from ``generator``: one per work item, so parallel items draw
    the same numbers whatever order they run in."""
    seeds = torch.randint(2**62, (count,), generator=generator, device=generator.device).tolist()
    return [torch.Generator(generator.device).manual_seed(s) for s in seeds]


@dataclass(frozen=True)
class DSEOptions:
    """Options of the DSE metric and regularizer; the defaults are the official README's.

    Config blocks (``dse.regularizer``, ``callbacks.dse``, ``eval.options``) are read into this
    object, so a misspelt key fails naming itself; the functions below also take single fields as
    keywords, e.g. ``dse(x, seed=3)``.

    Attributes:
        local_clusters: k of the per-image k-means (README: 3).
        global_clusters: k of the per-group k-means (README: 24).
        group_size: images per group; None: ``global_clusters // local_clusters`` (= 8).
        normalize: L2-normalise every token first (README: on).
        rank_draws: metric only: number of per-position draws for M_dim; None: all N (reference).
            Each draw costs one float64 eigen-solve of size min(B, D), the largest single cost at
            B=1024; fewer draws trade M_dim noise for time.
        variant: "code" (official code) or "paper" (equations as reported by secondary summaries:
            no division by s, css / (n - 1), squared cluster-balanced inter, un-normalised
            effective rank; unverified).
        seeding: k-means++ weights "d" (distance, as the reference) or "d2" (standard, lightly).
        kmeans_iters, tol: Lloyd iterations and early-stop threshold on the centroid shift.
        seed: seed of the private generator (the global RNG is never touched).
    """

    local_clusters: int = 3
    global_clusters: int = 24
    group_size: int | None = None
    normalize: bool = True
    rank_draws: int | None = None
    variant: Variant = "code"
    seeding: Seeding = "d"
    kmeans_iters: int = 20
    tol: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in ("code", "paper"):
            raise ValueError(f"variant must be 'code' or 'paper', got {self.variant!r}")
        if self.seeding not in ("d", "d2"):
            raise ValueError(f"seeding must be 'd' (reference) or 'd2' (standard k-means++), got {self.seeding!r}")
        if self.local_clusters < 1 or self.global_clusters < 2:
            raise ValueError(f"need local_clusters >= 1 and global_clusters >= 2, got {self.local_clusters}, "
                             f"{self.global_clusters}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 (or None for global // local), got {self.group_size}")


@dataclass(frozen=True)
class DSEResult:
    """The DSE of one batch (or the equal-weight mean over batches) and its four terms."""

    value: float
    inter: float
    intra_img: float
    intra_batch: float
    dim: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix + field: value}`` mapping for loggers."""
        return {prefix + name: v for name, v in asdict(self).items()}


@dataclass(frozen=True)
class _Rules:
    """Where the official metric (estimator.py) and regularizer (DSE_regularizer.py) differ.

    The first two fields are what ``kmeans.lloyd`` reads (``kmeans.LloydRules``).
    """

    reseed_empty: bool  # empty cluster: re-initialise at a random token (reg.) / keep (metric)
    reassign: bool  # labels from the final centroids (reg.) / from the last assignment (metric)
    reduce_k: bool  # k = min(k, #points) (reg.); the metric rejects such input instead
    eps: float  # added to s and to sum(sigma) in er (reg. 1e-12); 0 = clamp s and warn (metric)
    all_token_dim: bool  # M_dim = er of all B*N tokens (reg.) / mean er over per-position draws
    img_default: float | None  # a_b of an image without a >=2-member cluster (None: skip image)
    batch_default_scaled: bool  # "no cluster" intra_batch default 1 is divided by s (metric)


_METRIC = _Rules(False, False, False, 0.0, False, 1.0, True)
_REGULARIZER = _Rules(True, True, True, 1e-12, True, None, False)


# ----------------------------------------------------------------------------- terms


def _cluster_css(
    x: Tensor, labels: Tensor, k: int, variant: Variant, work: torch.dtype
) -> tuple[Tensor, Tensor]:
    """css of every cluster with >= 2 members.

    x: (P, M, D) tokens, labels: (P, M) in [0, k) -> (css (P, k), valid (P, k) bool); css is 0
    where not valid. Clusters are gathered into zero-padded batches of similar size.
    """
    P, M, D = x.shape
    counts = F.one_hot(labels, k).sum(1)  # (P, k)
    order = labels.argsort(dim=1, stable=True)  # token indices grouped by cluster
    starts = counts.cumsum(1) - counts
    valid = counts >= 2
    prob, clus = valid.nonzero(as_tuple=True)
    size = counts[prob, clus]
    padded = (size + _PAD_MULTIPLE - 1) // _PAD_MULTIPLE * _PAD_MULTIPLE
    values = x.new_zeros(len(size), dtype=work)
    for m in padded.unique().tolist():
        rows = torch.arange(m, device=x.device)
        for sel in (padded == m).nonzero().squeeze(1).split(max(1, _CHUNK_BYTES // (m * D * 8))):
            pos = (starts[prob[sel], clus[sel], None] + rows).clamp_max(M - 1)
            pts = x[prob[sel, None], order[prob[sel, None], pos]]  # (C, m, D), rows >= size are padding
            sigma_sum = singular_values(pts, rows < size[sel, None], centre=True).sum(-1).to(work)
            n = size[sel].to(work)
            # code: / sqrt(max(n - 1, D)); paper (secondary summaries): / (n - 1)
            denom = (n - 1).clamp_min(D).sqrt() if variant == "code" else n - 1
            values = values.index_put((sel,), sigma_sum / denom)
    css = values.new_zeros(P, k).index_put((prob, clus), values)
    return css, valid


def _inter(x: Tensor, centroids: Tensor, labels: Tensor, variant: Variant) -> Tensor:
    """Per-problem distance to the nearest other centroid. x: (P, M, D) -> (P,)."""
    d2 = sq_dist(x, centroids)
    own = F.one_hot(labels, centroids.shape[1]).bool()
    nearest_other = d2.masked_fill(own, math.inf).amin(-1)  # (P, M)
    if variant == "code":
        # zero gradient (not NaN) at a zero distance, as cdist in the reference regularizer
        positive = nearest_other > 0
        dist = torch.where(positive, nearest_other, torch.ones_like(nearest_other)).sqrt()
        return torch.where(positive, dist, torch.zeros_like(dist)).mean(-1)
    # paper (secondary summaries): squared, averaged per cluster, then over non-empty clusters
    one_hot = own.to(x.dtype)
    counts = one_hot.sum(1)
    per_cluster = (one_hot * nearest_other[..., None]).sum(1) / counts.clamp_min(1)
    return (per_cluster * (counts > 0)).sum(-1) / (counts > 0).sum(-1)


def _clusters(
    x: Tensor,
    k: int,
    *,
    with_inter: bool,
    options: DSEOptions,
    work: torch.dtype,
    rules: _Rules,
    generator: torch.Generator,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """k-means, (optionally) inter and css per chunk of problems, chunks in parallel.

    x: (P, M, D) -> (inter (P,) or None, css (P, k'), valid (P, k')), k' = k or fewer points.
    k-means runs without gradient; distances use the detached centroids (reference).
    """
    P, M, D = x.shape
    if k > M:
        if not rules.reduce_k:
            raise ValueError(
                f"k-means needs at least {k} tokens per problem but got {M}; lower "
                "local_clusters/global_clusters or use more tokens per image/group"
            )
        k = M
    step = max(1, _CHUNK_BYTES // (M * D * x.element_size()))
    chunks = x.split(step)

    def run(item: tuple[Tensor, torch.Generator]) -> tuple[Tensor | None, Tensor, Tensor]:
        chunk, gen = item
        with torch.no_grad():
            centroids = kmeanspp_seed(chunk, k, options.seeding, gen)
            centroids, labels = lloyd(chunk, centroids, iters=options.kmeans_iters, tol=options.tol, rules=rules,
                                      generator=gen)
        # in the k-means dtype: distances between batch-centred tokens and centroids of size ~s carry
        # a relative error ~eps, so float64 (a 2x slower GEMM) would add nothing
        inter = _inter(chunk, centroids, labels, options.variant).to(work) if with_inter else None
        return (inter, *_cluster_css(chunk, labels, k, options.variant, work))

    out = _parallel_map(run, zip(chunks, _generators(generator, len(chunks))), x.device)
    inter = torch.cat([o[0] for o in out]) if with_inter else None
    return inter, torch.cat([o[1] for o in out]), torch.cat([o[2] for o in out])


def _centre(
    features: Tensor, normalize: bool, work: torch.dtype, store: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-centred tokens. features: (B, N, D) -> (y (B, N, D) in store, mean (D,), |y| (B, N)).

    ``y`` and ``mean`` carry no gradient through the mean (``y + mean`` has the gradient of the
    normalised tokens); ``|y|`` does.

    Normalising, centring and |y| are computed in ``work`` over chunks of images, so a
    float64 pass never materialises a float64 copy of the whole batch.
    """
    B, N, D = features.shape
    if work == store and not (torch.is_grad_enabled() and features.requires_grad):
        return _centre_in_place(features, normalize, work)
    chunks = features.split(max(1, _CHUNK_BYTES // (N * D * 8)))

    def scaled(f: Tensor) -> Tensor:  # as F.normalize: f / max(|f|, 1e-12), in work
        if not normalize:
            return f.to(work)
        return f.to(work) / torch.linalg.vector_norm(f, dim=-1, dtype=work).clamp_min(1e-12)[..., None]

    mean = sum(_parallel_map(lambda f: scaled(f).sum((0, 1)), chunks, features.device)) / (B * N)

    # Centring is numerical only: the reference computes every term on the uncentred tokens, so no
    # gradient may flow through the mean used to centre ``y`` (the inter term's distances to the detached
    # centroids would otherwise add one constant vector to every token's gradient; css is translation
    # invariant and M_dim adds the detached mean back). Only |y| (for s) is, as the reference's avg_l2,
    # the distance to the mean with its gradient.
    fixed = mean.detach()

    def centre(f: Tensor) -> tuple[Tensor, Tensor]:
        x = scaled(f)
        return (x - fixed).to(store), torch.linalg.vector_norm(x - mean, dim=-1)

    ys, norms = zip(*_parallel_map(centre, chunks, features.device))
    return torch.cat(ys), fixed, torch.cat(norms)


def _centre_in_place(features: Tensor, normalize: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_centre` without autograd and with work == store: each chunk is normalised straight into
    the output and centred there, allocating no chunk-sized temporaries (their fresh pages cost as much
    as the arithmetic). features: (B, N, D) -> (y (B, N, D) in dtype, mean (D,), |y| (B, N))."""
    B, N, D = features.shape
    y = torch.empty(B, N, D, dtype=dtype, device=features.device)
    chunks = y.split(max(1, _CHUNK_BYTES // (N * D * y.element_size())))
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]]).tolist()

    def scale(item: tuple[int, Tensor]) -> Tensor:  # as F.normalize: f / max(|f|, 1e-12)
        start, out = item
        out.copy_(features[start : start + len(out)])
        if normalize:
            out.div_(torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min_(1e-12))
        return out.sum((0, 1))

    mean = sum(_parallel_map(scale, zip(starts, chunks), features.device)) / (B * N)
    norms = _parallel_map(lambda out: torch.linalg.vector_norm(out.sub_(mean), dim=-1), chunks, features.device)
    return y, mean, torch.cat(norms)


def _terms(
    features: Tensor,
    rules: _Rules,
    options: DSEOptions,
    *,
    work: torch.dtype,
    store: torch.dtype,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """The four DSE terms of one batch. features: (B, N, D) -> 0-dim tensors in ``work``.

    Every term but M_dim is translation invariant, so k-means and distances use
    batch-centred tokens ``y`` (stored in ``store``, float32 for the metric): distances stay
    exact even when all tokens nearly coincide. Terms are evaluated in ``work``, with autocast
    off: under bf16-mixed its matmuls would run the k-means distances and the regularizer's
    backward in bfloat16 (measured: gradients off by ~25 % of their largest entry).
    """
    with autocast_off(features.device):
        B, N, D = features.shape
        G = options.group_size or max(options.global_clusters // options.local_clusters, 1)
        variant = options.variant

        # Float32 tokens are normalised and centred in float32 (a quarter of the float64 time), unless
        # the spread is so small that float32 rounding of the normalised tokens (~6e-8 rms) shows in y.
        fast = store == torch.float32 and work == torch.float64
        y, mean, norms = _centre(features, options.normalize, store if fast else work, store)
        if not torch.isfinite(mean).all():  # any NaN/inf token reaches the mean
            raise ValueError("DSE got non-finite features (NaN/inf); check the backbone output")
        mean, norms = mean.to(work), norms.to(work)
        if fast and norms.mean() < _FLOAT32_SPREAD * (norms.square().mean() + mean.square().sum()).sqrt():
            y, mean, norms = _centre(features, options.normalize, work, store)
        s = norms.mean()
        if rules.eps:
            s = s + rules.eps
        else:
            rms = (norms.square().mean() + mean.square().sum()).sqrt()
            if s <= _COLLAPSE_RATIO * rms:  # also all-zero features
                warnings.warn(
                    f"DSE: features are (nearly) collapsed: mean distance to the batch-mean token is "
                    f"{(s / rms).item():.2e} x the rms token norm, so the s-normalised terms mostly "
                    "measure noise",
                    RuntimeWarning,
                    stacklevel=4,
                )
            s = s.clamp_min(1e-12 * rms + torch.finfo(s.dtype).tiny)
        scale = s if variant == "code" else torch.ones_like(s)  # paper: no division by s
        run = dict(options=options, work=work, rules=rules, generator=generator)

        # M_intra_img: one k-means per image.
        _, css, valid = _clusters(y, options.local_clusters, with_inter=False, **run)
        has = valid.any(1)
        per_image = css.sum(1) / valid.sum(1).clamp_min(1)
        if rules.img_default is not None:
            intra_img = torch.where(has, per_image, rules.img_default).mean() / scale
        else:
            intra_img = per_image[has].mean() / scale if has.any() else s.new_zeros(())

        # M_inter and M_intra_batch: one k-means per group of G consecutive images.
        full = B // G * G
        groups = [y[:full].reshape(B // G, G * N, D)] if full else []
        if full < B:
            groups.append(y[full:].reshape(1, (B - full) * N, D))
        inter, css_all = [], []
        for x in groups:
            group_inter, css, valid = _clusters(x, options.global_clusters, with_inter=True, **run)
            inter.append(group_inter)
            css_all.append(css[valid])
        inter = torch.cat(inter).mean() / scale
        css_all = torch.cat(css_all)
        if len(css_all):
            intra_batch = css_all.mean() / scale
        else:
            intra_batch = s.new_ones(()) / (scale if rules.batch_default_scaled else 1)

        normalise_er = variant == "code"  # paper: Erank not divided by min(n, d)
        if rules.all_token_dim:
            dim = erank((y.to(work) + mean).reshape(B * N, D), sum_eps=rules.eps, normalise=normalise_er)
        else:
            # Row b of draw n is token perm_b(n) of image b: one i.i.d. token per image.
            perm = torch.rand(B, N, generator=generator, device=y.device).argsort(1)[:, : options.rank_draws or N]
            rows = torch.arange(B, device=y.device)
            ers = _parallel_map(  # draws: (n, B) token indices -> (n, B, D) contiguous matrices
                lambda draws: erank(y[rows, draws].add_(mean.to(y.dtype)), normalise=normalise_er),
                perm.mT.split(max(1, _CHUNK_BYTES // (B * D * y.element_size()))),
                y.device,
            )
            dim = torch.cat(ers).mean()

        return {"inter": inter, "intra_img": intra_img, "intra_batch": intra_batch, "dim": dim}


def _combine(inter: Tensor, intra_img: Tensor, intra_batch: Tensor, dim: Tensor) -> Tensor:
    return inter + dim - (intra_img + intra_batch) / 2


def _check(features: Tensor, rank_draws: int | None) -> None:
    """Input checks that need the features (the options check themselves in ``DSEOptions``)."""
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(
            f"DSE expects non-empty features of shape (B, N, D), got {tuple(features.shape)}; "
            "flatten CNN maps with x.flatten(2).transpose(1, 2)"
        )
    if not features.is_floating_point():
        raise ValueError(f"DSE expects floating-point features, got {features.dtype}")
    if rank_draws is not None and not 1 <= rank_draws <= features.shape[1]:
        raise ValueError(
            f"rank_draws must be in [1, N={features.shape[1]}] (or None for all), got {rank_draws}"
        )


# ----------------------------------------------------------------------------- public API


def dse(features: Tensor, options: DSEOptions | None = None, **overrides: Any) -> DSEResult:
    """DSE of one batch of dense features, as the official ``estimator.compute_DSE``.

    Args:
        features: (B, N, D) patch tokens of B images, any float dtype. k-means runs on
            float32 batch-centred tokens, every term in float64 but the Gram matrices of
            resolved spectra (float32, see ``spectra.singular_values``).
        options: :class:`DSEOptions` (default: the README's); ``overrides`` replace single fields.

    Returns:
        DSEResult with value = inter + dim - (intra_img + intra_batch) / 2.
    """
    return dse_over_batches([features], options, **overrides)


def dse_over_batches(
    feature_batches: Iterable[Tensor], options: DSEOptions | None = None, **overrides: Any
) -> DSEResult:
    """Mean of each DSE term over batches with equal weight (reference ``get_DSE.py``).

    Options as for :func:`dse`; one private generator seeded with ``options.seed`` serves all
    batches, so the result is deterministic and the global RNG is never touched.
    """
    options = with_overrides(DSEOptions, options, overrides)
    generator = None
    totals: list[dict[str, Tensor]] = []
    with torch.no_grad():
        for features in feature_batches:
            _check(features, options.rank_draws)
            if generator is None:
                generator = torch.Generator(features.device).manual_seed(options.seed)
            # k-means runs on float32 tokens, every term in float64 (accuracy near collapse).
            store = torch.promote_types(features.dtype, torch.float32)
            totals.append(_terms(features, _METRIC, options, work=torch.float64, store=store, generator=generator))
    if not totals:
        raise ValueError("dse_over_batches got no feature batches")
    terms = {name: torch.stack([t[name] for t in totals]).mean() for name in totals[0]}
    return DSEResult(value=_combine(**terms).item(), **{k: v.item() for k, v in terms.items()})


def dse_regularizer(
    features: Tensor,
    options: DSEOptions | None = None,
    *,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> Tensor:
    """Differentiable DSE, as the official ``DSERegularizer.compute_DSE_loss``.

    Returns DSE itself (higher is better); the caller adds ``-beta * DSE`` to its loss
    (paper: beta = 0.001). Gradients flow through the normalisation, s, the singular values
    of css and er, and the distances to the (detached) centroids; k-means runs without
    gradient. Differences from :func:`dse` follow DSE_regularizer.py: M_dim is the effective
    rank of all B*N tokens over min(B*N, D), an empty cluster is re-initialised at a random
    token, labels come from the final centroids, k shrinks when a group has fewer points,
    1e-12 is added to s and to sum(sigma), and the defaults without terms are intra_img 0 and
    intra_batch 1. Computed in float32 (float64 for float64 input), with autocast off.

    Args:
        features: (B, N, D) tokens (with gradient).
        options: :class:`DSEOptions` (``rank_draws`` must stay None); ``overrides`` replace single fields.
        generator: private RNG for k-means; default a fresh one seeded ``options.seed`` per call
            (the reference reseeds too, but the global RNG, so augmentations repeat).
    """
    options = with_overrides(DSEOptions, options, overrides)
    if options.rank_draws is not None:
        raise ValueError("rank_draws is an option of the DSE metric only: the regularizer's M_dim is the "
                         "effective rank of all B*N tokens")
    _check(features, None)
    if generator is None:
        generator = torch.Generator(features.device).manual_seed(options.seed)
    work = torch.promote_types(features.dtype, torch.float32)  # no half-precision svdvals
    return _combine(**_terms(features, _REGULARIZER, options, work=work, store=work, generator=generator))
