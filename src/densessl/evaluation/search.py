"""Nearest-neighbour search over the Hummingbird memory: exact (faiss float32, or a bf16 candidate pass
with exact float32 re-scoring), or IVF in the manner of the reference's default ScaNN backend (8-bit
codes, or 4-bit product quantisation with fast-scan lookup tables, ScaNN's own design). Split from
retrieval.py, which re-exports these names."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from densessl.faiss_import import check_faiss_gpu, import_faiss

faiss = import_faiss()

__all__ = ["SEARCHES", "Bf16ExactSearch", "ExactSearch", "IVFPQ4Search", "IVFSearch", "bf16_matmul_is_fast",
           "make_search"]

logger = logging.getLogger(__name__)


@contextmanager
def _blas_settings(database_rows: int) -> Iterator[None]:
    """faiss's exact search for the block: BLAS for every query batch, memory rows scored in GEMM blocks of
    ``database_rows``. Process-wide faiss settings: restored after.

    BLAS always: with its default ``distance_compute_blas_threshold`` (128,000) faiss 1.15 searched 256
    queries of dimension 384 with a non-BLAS kernel (1,024 with BLAS), 16x slower on 100k rows, 1 thread
    (3.17 vs 0.19 s; 32 queries 0.39 vs 0.05 s; 4 queries 0.05 vs 0.03 s; 1,024 queries equal).
    Database block ``distance_compute_blas_database_bs`` (default 1024): 16384 was 1.2x faster for 1,024
    queries x 1.024M x 384 on 2 CPU cores (5.37 -> 4.33 s; 4096 and 65536 were within 3 %), same neighbours.
    """
    previous = faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = 0, database_rows
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = previous


class ExactSearch:
    """Exact maximum-inner-product search over the memory rows (faiss).

    CPU: ``faiss.knn`` on the memory buffer itself (the kernel of ``IndexFlatIP.search``, without
    copying the memory into an index); float16 memories are searched in float32 blocks of
    ``block_rows`` rows whose results are merged. gpu=True: a faiss ``GpuIndexFlatIP`` (float16
    storage if the memory is float16); needs faiss with GPU support, else a ValueError.
    """

    def __init__(self, features: Tensor, gpu: bool = False, block_rows: int = 1 << 20) -> None:
        if features.ndim != 2 or features.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"features must be (M, D) float32/float16, got {features.dtype} {tuple(features.shape)}")
        check_faiss_gpu(gpu)
        self.features, self.block_rows, self.index = features.contiguous(), block_rows, None
        if gpu:
            self._resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.useFloat16 = features.dtype == torch.float16
            self.index = faiss.GpuIndexFlatIP(self._resources, features.shape[1], config)
            for block in self.features.split(block_rows):
                self.index.add(block.float().numpy())

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """queries (Q, D) float32 -> (similarities (Q, k) float32, memory rows (Q, k) int64), best first."""
        if not 1 <= k <= len(self.features):
            raise ValueError(f"k={k} must be in [1, {len(self.features)}] (the memory size)")
        queries = queries.float().contiguous().numpy()
        if self.index is not None:
            sims, rows = self.index.search(queries, k)
            return torch.from_numpy(sims), torch.from_numpy(rows)
        step = len(self.features) if self.features.dtype == torch.float32 else self.block_rows
        best_sims = best_rows = None
        for start in range(0, len(self.features), step):
            block = self.features[start : start + step].float().numpy()  # a view for float32
            with _blas_settings(16384):
                sims, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            sims, rows = torch.from_numpy(sims), torch.from_numpy(rows) + start
            if best_sims is not None:
                sims, rows = torch.cat([best_sims, sims], 1), torch.cat([best_rows, rows], 1)
                sims, order = sims.topk(k, dim=1)
                rows = rows.gather(1, order)
            best_sims, best_rows = sims, rows
        return best_sims, best_rows


def bf16_matmul_is_fast() -> bool:
    """True when torch's CPU bfloat16 matmul runs on AMX tiles (oneDNN): 3.6x float32's speed on 1,024 x
    65,536 x 384 here (0.12 vs 0.43 s, 1 thread). AVX512-BF16 alone at most doubles the multiply rate,
    which the candidate selection would mostly use up (not measured), so search="exact_bf16" takes faiss
    float32 there."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own probe (no public one yet)
    mkldnn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return bool(mkldnn and amx is not None and amx())


class Bf16ExactSearch:
    """Exact maximum-inner-product search: a bfloat16 candidate pass, exact float32 re-scoring of the
    candidates, and for the queries where the candidates might miss a neighbour a second pass with 8x the
    candidates, then a faiss float32 fallback. It returns the rows and similarities of :class:`ExactSearch`
    (to float32 rounding; rows of equal score may come in another order).

    Memory: a bfloat16 copy of the features, (M, D), half the float32 size (as large as a float16
    memory), next to the features themselves (kept for the re-scoring and the fallback).

    Error bound. Write q' = q + dq, m' = m + dm for the bfloat16 roundings of a query and a memory row
    (|dq_i| <= 2^-8 |q_i|, so |dq| <= 2^-8 |q|), a for the bfloat16 score and s for the float32 score
    we rank by. The bf16 products are exact in float32 and summed in float32 (oneDNN/AMX), then rounded
    to a bfloat16 output. Then

        q'.m' - q.m = dq.m' + q.dm,  |dq.m'| <= |dq| |m'|,  |q.dm| <= |q| |dm|         (Cauchy-Schwarz)
        float32 sum of D terms:      error <= g |q'| |m'|,  g = D 2^-24 / (1 - D 2^-24)
        bfloat16 output rounding:    |a - t| <= 2^-8 |a|    (round to nearest, t the float32 sum)
        float32 re-scoring:          |s - q.m| <= g |q| |m|

    so |a - s| <= E + 2^-8 |a| with, per query, E = |dq| max|m'| + |q| max|dm| + g (|q'| max|m'| + |q| max|m|),
    times 1.01, plus 2^-20 |q| max|m| (denormals flushed by AMX, rounding of the bound itself). The
    norms |dq|, |dm| are measured, not the worst case 2^-8 |q|, 2^-8 |m|: on normalised random features
    they are ~2.3x smaller, which narrows the window below; max is over the memory rows.

    Window. Let tau be a query's k-th best bf16 score. Each of the k rows with a >= tau has
    s >= f(tau) = tau - 2^-8 |tau| - E (f increases), so the k-th best exact score S_k >= f(tau); a true
    top-k row has s >= S_k and a + 2^-8 |a| >= s - E, so a >= thr = h^-1(f(tau) - E) with h(x) = x + 2^-8 |x|.
    Each memory block of ``block_rows`` rows keeps its top-C bf16 scores, C = max(k, ``candidates`` /
    number of blocks) (64 for 1.024M rows; a small memory has few, wide blocks that need more); every
    row it drops scores <= its C-th kept score, so when that is < thr for all blocks the kept candidates
    with a >= thr hold every true neighbour; they are re-scored in float32 and the best k returned. A
    query with some block's C-th kept score >= thr might have lost a neighbour: it is searched again with
    8C candidates per block (``widened`` counts these queries), and if that too may have cut one, with
    :class:`ExactSearch` (``fallbacks``); both counters add up over calls.

    Cost per block of 1,024 queries x 131,072 rows x 384 (1 thread, a busy 2-core machine): the bf16
    matmul 0.23 s, the top-64 0.09 s via group maxima (max over ``group`` strided rows, the top-C groups,
    the top-C of their members: exact, as the top-C rows lie in the C groups of largest maxima; top-32
    0.07 s, top-512 0.26 s) where torch.topk(64) takes 0.21 s; faiss float32 takes 0.84 s. On 262,144
    rows, 65,536-row blocks were 1.0-1.4x slower than 131,072 and 32,768-row blocks 1.9x (the top-C
    costs more per row in small blocks); 262,144-row blocks keeping 64 left 64 % of the queries to the
    fallback, and a block's (Q, B) bf16 temporary is 256 MB here.
    """

    def __init__(self, features: Tensor, block_rows: int = 131072, candidates: int = 512, group: int = 16,
                 query_rows: int = 1024) -> None:
        if features.ndim != 2 or features.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"features must be (M, D) float32/float16, got {features.dtype} {tuple(features.shape)}")
        self.features = features.contiguous()
        self.block_rows, self.candidates, self.group, self.query_rows = block_rows, candidates, group, query_rows
        self.memory_bf16 = self.features.to(torch.bfloat16)  # (M, D)
        self.max_norm = self.max_rounded_norm = self.max_rounding = 0.0
        for start in range(0, len(features), block_rows):  # block by block: no (M, D) float32 temporary
            exact = self.features[start : start + block_rows].float()
            rounded = self.memory_bf16[start : start + block_rows].float()
            self.max_norm = max(self.max_norm, exact.norm(dim=1).max().item())
            self.max_rounded_norm = max(self.max_rounded_norm, rounded.norm(dim=1).max().item())
            self.max_rounding = max(self.max_rounding, (exact - rounded).norm(dim=1).max().item())
        self.widened = self.fallbacks = 0
        self._exact = ExactSearch(self.features)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """queries (Q, D) -> (similarities (Q, k) float32, memory rows (Q, k) int64), best first."""
        if not 1 <= k <= len(self.features):
            raise ValueError(f"k={k} must be in [1, {len(self.features)}] (the memory size)")
        blocks = math.ceil(len(self.features) / self.block_rows)
        keep = max(k, math.ceil(self.candidates / blocks))  # candidates per block
        chunks = queries.float().contiguous().split(self.query_rows)
        results = [self._search_chunk(chunk, k, keep, widen=True) for chunk in chunks]
        return torch.cat([s for s, _ in results]), torch.cat([r for _, r in results])

    def error_bound(self, queries: Tensor) -> Tensor:
        """queries (Q, D) float32 -> E (Q,): |bf16 score - float32 score| <= E + 2^-8 |bf16 score| for
        every memory row (class docstring)."""
        rounded = queries.to(torch.bfloat16).float()
        norm, rounded_norm = queries.norm(dim=1), rounded.norm(dim=1)
        g = queries.shape[1] * 2.0**-24 / (1 - queries.shape[1] * 2.0**-24)
        bound = ((queries - rounded).norm(dim=1) * self.max_rounded_norm + norm * self.max_rounding
                 + g * (rounded_norm * self.max_rounded_norm + norm * self.max_norm))
        return 1.01 * bound + 2.0**-20 * norm * self.max_norm

    def threshold(self, queries: Tensor, tau: Tensor) -> Tensor:
        """queries (Q, D) float32, tau (Q,) k-th best bf16 scores -> thr (Q,): every true top-k row has a
        bf16 score >= thr (class docstring)."""
        low = tau - 2.0**-8 * tau.abs() - 2 * self.error_bound(queries)  # f(tau) - E
        return torch.where(low >= 0, low / (1 + 2.0**-8), low / (1 - 2.0**-8))

    def _search_chunk(self, queries: Tensor, k: int, keep: int, widen: bool) -> tuple[Tensor, Tensor]:
        rounded = queries.to(torch.bfloat16)
        values, rows, cut = [], [], []
        for start in range(0, len(self.memory_bf16), self.block_rows):
            scores = rounded @ self.memory_bf16[start : start + self.block_rows].T  # (Q, B) bfloat16
            top, index, last = self._block_top(scores, keep)
            values.append(top)
            rows.append(index + start)
            cut.append(last)
        values, rows, cut = torch.cat(values, 1).float(), torch.cat(rows, 1), torch.stack(cut, 1)
        thr = self.threshold(queries, values.topk(k, dim=1).values[:, -1])
        inside = values >= thr[:, None]
        # Exact float32 re-scoring of the (query, row) pairs inside the window, 4,096 at a time (a 6 MB
        # product, multiplied in place: 4x faster than one (pairs, D) product here).
        exact = torch.full_like(values, -math.inf)
        qi, ci = inside.nonzero(as_tuple=True)
        for q, c in zip(qi.split(4096), ci.split(4096)):
            product = self.features.index_select(0, rows[q, c]).float()
            exact[q, c] = product.mul_(queries.index_select(0, q)).sum(1)
        sims, order = exact.topk(k, dim=1)
        rows = rows.gather(1, order)
        redo = (cut >= thr[:, None]).any(1).nonzero().squeeze(1)
        if len(redo) and widen:  # even with 8 x 64 candidates: 0.23 + 0.26 s per block vs faiss's 0.84 s
            sims[redo], rows[redo] = self._search_chunk(queries[redo], k, 8 * keep, widen=False)
            self.widened += len(redo)
        elif len(redo):
            sims[redo], rows[redo] = self._exact.search(queries[redo], k)
            self.fallbacks += len(redo)
        return sims, rows

    def _block_top(self, scores: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
        """scores (Q, B) -> (kept scores (Q, C'), their columns (Q, C'), the largest score dropped or tied
        with one dropped (Q,)): the top C = ``keep`` scores, plus the B mod ``group`` last columns kept whole;
        a block of at most C rows is kept whole (-inf: it cuts nothing)."""
        n, width = scores.shape
        if width <= keep:
            return scores, torch.arange(width).expand(n, -1), torch.full((n,), -math.inf, dtype=scores.dtype)
        stride = width // self.group
        if stride < keep:
            top, columns = scores.topk(keep, dim=1)
            return top, columns, top[:, -1]
        # Group j = columns j, j + stride, ...: a reduction over the middle axis is vectorised for
        # bfloat16 (0.02 s per 65,536-row block) where amax over the last axis is not (0.11 s).
        grouped = scores[:, : self.group * stride].view(n, self.group, stride)
        groups = grouped.amax(1).topk(keep, dim=1, sorted=False).indices  # (Q, C)
        members = grouped.gather(2, groups[:, None, :].expand(-1, self.group, -1))  # (Q, G, C)
        top, flat = members.reshape(n, -1).topk(keep, dim=1)
        columns = (torch.arange(self.group)[:, None] * stride + groups[:, None, :]).reshape(n, -1).gather(1, flat)
        rest = torch.arange(self.group * stride, width).expand(n, -1)  # fewer than ``group`` columns
        return torch.cat([top, scores[:, self.group * stride :]], 1), torch.cat([columns, rest], 1), top[:, -1]


def _check_ivf(features: Tensor, search: str, nlist: int, nprobe: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (M, D), got {tuple(features.shape)}")
    if not 1 <= nprobe <= nlist or len(features) < 39 * nlist:
        raise ValueError(
            f"search={search} with nlist={nlist}, nprobe={nprobe} needs 1 <= nprobe <= nlist and a memory of at "
            f"least 39 * nlist = {39 * nlist} rows (faiss k-means), got {len(features)}; lower nlist or use "
            "search=exact"
        )


def _train_and_add(index, features: Tensor, nlist: int, seed: int, block_rows: int) -> None:
    """Train a faiss IVF index on at most ``256 * nlist`` memory rows drawn with ``seed`` (faiss's own
    sample size), then add every row, ``block_rows`` at a time (float32 copies of one block only)."""
    index.cp.seed = seed
    sample = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[: 256 * nlist]
    index.train(features[sample.sort().values].float().numpy())
    for block in features.split(block_rows):
        index.add(block.float().contiguous().numpy())


def _rescore(features: Tensor, queries: Tensor, rows: Tensor, k: int, query_chunk: int = 256) -> tuple[Tensor, Tensor]:
    """features (M, D), queries (Q, D) float32, candidate rows (Q, R) int64 (-1: none) -> (exact
    similarities (Q, k), rows (Q, k)), best first; a missing candidate scores -inf (weight 0).

    float32 memory: faiss's ``fvec_inner_products_by_idx`` reads the rows in place, 7x faster than
    gathering them into a (Q, R, D) temporary and multiplying (1,024 x 120 candidates x 384: 0.033 vs
    0.23 s, 1 thread). Other dtypes: gathered and converted, ``query_chunk`` queries at a time."""
    if features.dtype == torch.float32 and features.is_contiguous():
        sims = torch.empty(rows.shape, dtype=torch.float32)
        faiss.fvec_inner_products_by_idx(  # row -1 gives -inf
            faiss.swig_ptr(sims.numpy()), faiss.swig_ptr(queries.numpy()), faiss.swig_ptr(features.numpy()),
            faiss.swig_ptr(rows.numpy()), features.shape[1], rows.shape[0], rows.shape[1])
    else:
        sims = torch.cat([
            torch.einsum("qd,qrd->qr", q, features[r.clamp_min(0)].float())
            for q, r in zip(queries.split(query_chunk), rows.split(query_chunk))
        ]).masked_fill(rows < 0, -math.inf)
    sims, order = sims.topk(k, dim=1)
    return sims, rows.gather(1, order)


class _RescoredIVF:
    """A faiss IVF index (lists from k-means on at most ``256 * nlist`` memory rows drawn with ``seed``,
    faiss's own sample size) that finds ``reorder`` candidates in ``nprobe`` of ``nlist`` lists, re-scored
    exactly against the memory rows: what :class:`IVFSearch` and :class:`IVFPQ4Search` share. Subclasses
    name the mode, check their own options and build the index."""

    name = ""

    def __init__(self, features: Tensor, nlist: int, nprobe: int, reorder: int, gpu: bool, block_rows: int,
                 seed: int) -> None:
        _check_ivf(features, self.name, nlist, nprobe)
        self.check(features, gpu)
        dim = features.shape[1]
        self.features, self.reorder = features.contiguous(), reorder
        self._quantizer = faiss.IndexFlatIP(dim)  # referenced by the index: keep it alive
        self.index = self.make_index(self._quantizer, dim, nlist)
        _train_and_add(self.index, features, nlist, seed, block_rows)
        self.index.nprobe = nprobe

    def check(self, features: Tensor, gpu: bool) -> None:
        """Raise for options this mode cannot take, before anything is built."""

    def make_index(self, quantizer: Any, dim: int, nlist: int) -> Any:
        raise NotImplementedError

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """queries (Q, D) -> (exact similarities (Q, k), memory rows (Q, k)), best first. When the visited
        lists hold fewer than k rows, the missing entries are row -1 with similarity -inf (weight 0)."""
        queries = queries.float().contiguous()
        _, rows = self.index.search(queries.numpy(), max(k, self.reorder))
        return _rescore(self.features, queries, torch.from_numpy(rows), k)


class IVFSearch(_RescoredIVF):
    """Approximate maximum-inner-product search in the manner of the reference's default ScaNN backend
    (hbird/nn/search_scann.py: 512 leaves, 32 searched, the best 120 re-scored exactly).

    faiss ``IndexIVFScalarQuantizer`` (8-bit codes: 1 byte per dimension, a quarter of the float32
    memory) finds the candidates (:class:`_RescoredIVF`), so the returned similarities are exact.
    gpu=True moves the index to GPU 0 (faiss with GPU support).
    """

    name = "ivf"

    def __init__(self, features: Tensor, nlist: int = 512, nprobe: int = 32, reorder: int = 120,
                 gpu: bool = False, block_rows: int = 1 << 20, seed: int = 0) -> None:
        super().__init__(features, nlist, nprobe, reorder, gpu, block_rows, seed)
        if gpu:
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, 0, self.index)

    def check(self, features: Tensor, gpu: bool) -> None:
        check_faiss_gpu(gpu)

    def make_index(self, quantizer: Any, dim: int, nlist: int) -> Any:
        return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                             faiss.METRIC_INNER_PRODUCT)


class IVFPQ4Search(_RescoredIVF):
    """Approximate maximum-inner-product search with the design of ScaNN's asymmetric hashing + reorder
    (the reference's default backend), on faiss's fast-scan kernels; CPU only.

    faiss ``IndexIVFPQFastScan``: k-means lists as :class:`IVFSearch` (``nlist``, ``nprobe``, ``seed``);
    each row's residual to its list centre is product-quantised in D/2 sub-vectors of 2 dimensions with
    4-bit codes (16 centroids each: D/4 bytes a row, 96 at D = 384, a sixteenth of float32). A query scores
    the rows of its ``nprobe`` lists through 16-entry lookup tables held in SIMD registers (faiss's fast
    scan; ScaNN's AH builds the same tables, the reference with 2 dimensions per block), and its best
    ``reorder`` candidates are re-scored exactly against the memory rows, so similarities are exact.

    ``reorder`` 240, twice ScaNN's 120: the 4-bit scan costs more than the re-scoring, so re-scoring more
    candidates buys recall cheaply. 1.024M x 384 synthetic memory, 1,024 queries, 512/32, 1 busy thread:
    re-score 120 -> 0.36 s, recall of the exact top-30 0.335; 240 -> 0.41 s, 0.358; 480 -> 0.49 s, 0.368
    (= exact scoring of the 32 lists); nprobe 48 with 240: 0.56 s, 0.426. D must be even.
    """

    name = "ivf_pq4"

    def __init__(self, features: Tensor, nlist: int = 512, nprobe: int = 32, reorder: int = 240,
                 gpu: bool = False, block_rows: int = 1 << 20, seed: int = 0) -> None:
        super().__init__(features, nlist, nprobe, reorder, gpu, block_rows, seed)

    def check(self, features: Tensor, gpu: bool) -> None:
        if gpu:
            raise ValueError("search=ivf_pq4 runs on the CPU only (faiss has no GPU fast-scan index); with gpu use "
                             "search=ivf or search=exact")
        if features.shape[1] % 2:
            raise ValueError(f"search=ivf_pq4 needs an even feature dimension (2 per sub-quantiser), got "
                             f"{features.shape[1]}")

    def make_index(self, quantizer: Any, dim: int, nlist: int) -> Any:
        return faiss.IndexIVFPQFastScan(quantizer, dim, nlist, dim // 2, 4, faiss.METRIC_INNER_PRODUCT)


SEARCHES = ("exact", "exact_bf16", "ivf", "ivf_pq4")


def make_search(features: Tensor, search: str = "exact", *, gpu: bool = False, nlist: int = 512,
                nprobe: int = 32, seed: int = 0) -> ExactSearch | Bf16ExactSearch | IVFSearch | IVFPQ4Search:
    """The memory's searcher: ``search="exact"`` (:class:`ExactSearch`), ``"exact_bf16"``
    (:class:`Bf16ExactSearch` on a CPU with AMX; the same answer, faster; :class:`ExactSearch` on a GPU
    or on other CPUs), ``"ivf"`` (:class:`IVFSearch`) or ``"ivf_pq4"`` (:class:`IVFPQ4Search`, CPU only:
    faster than the reference's ScaNN at a higher recall)."""
    if search == "exact_bf16" and not gpu:
        if bf16_matmul_is_fast():
            return Bf16ExactSearch(features)
        logger.info("search=exact_bf16: this CPU has no AMX (bfloat16 matmul not faster), using faiss float32")
    if search in ("exact", "exact_bf16"):
        return ExactSearch(features, gpu=gpu)
    if search == "ivf":
        return IVFSearch(features, nlist=nlist, nprobe=nprobe, gpu=gpu, seed=seed)
    if search == "ivf_pq4":
        return IVFPQ4Search(features, nlist=nlist, nprobe=nprobe, gpu=gpu, seed=seed)
    raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
