"""Nearest-neighbour search over the Hummingbird memory (faiss): exact, or IVF in the manner of the
reference's default ScaNN backend. Split from retrieval.py, which re-exports these names."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from densessl.faiss_import import check_faiss_gpu, import_faiss

faiss = import_faiss()

__all__ = ["SEARCHES", "ExactSearch", "IVFSearch", "make_search"]


@contextmanager
def _blas_database_block(rows: int) -> Iterator[None]:
    """faiss's exact search scores memory rows in GEMM blocks of ``distance_compute_blas_database_bs``
    (default 1024): 16384 was 1.2x faster for 1,024 queries x 1.024M x 384 on 2 CPU cores (5.37 -> 4.33 s;
    4096 and 65536 were within 3 %), same neighbours. A process-wide faiss setting: restored after."""
    previous = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = rows
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous


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
            with _blas_database_block(16384):
                sims, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            sims, rows = torch.from_numpy(sims), torch.from_numpy(rows) + start
            if best_sims is not None:
                sims, rows = torch.cat([best_sims, sims], 1), torch.cat([best_rows, rows], 1)
                sims, order = sims.topk(k, dim=1)
                rows = rows.gather(1, order)
            best_sims, best_rows = sims, rows
        return best_sims, best_rows


class IVFSearch:
    """Approximate maximum-inner-product search in the manner of the reference's default ScaNN backend
    (hbird/nn/search_scann.py: 512 leaves, 32 searched, the best 120 re-scored exactly).

    faiss ``IndexIVFScalarQuantizer`` (8-bit codes: 1 byte per dimension, a quarter of the float32
    memory) finds ``reorder`` candidates in ``nprobe`` of ``nlist`` lists; their exact inner products
    with the memory rows pick the best k, so the returned similarities are exact. The lists come from
    k-means on at most ``256 * nlist`` memory rows drawn with ``seed`` (faiss's own sample size).
    gpu=True moves the index to GPU 0 (faiss with GPU support).
    """

    def __init__(self, features: Tensor, nlist: int = 512, nprobe: int = 32, reorder: int = 120,
                 gpu: bool = False, block_rows: int = 1 << 20, seed: int = 0) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be (M, D), got {tuple(features.shape)}")
        if not 1 <= nprobe <= nlist or len(features) < 39 * nlist:
            raise ValueError(
                f"search=ivf with nlist={nlist}, nprobe={nprobe} needs 1 <= nprobe <= nlist and a memory of at "
                f"least 39 * nlist = {39 * nlist} rows (faiss k-means), got {len(features)}; lower nlist or use "
                "search=exact"
            )
        check_faiss_gpu(gpu)
        dim = features.shape[1]
        self.features, self.reorder = features, reorder
        self._quantizer = faiss.IndexFlatIP(dim)  # referenced by the index: keep it alive
        index = faiss.IndexIVFScalarQuantizer(self._quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[: 256 * nlist]
        index.train(features[sample.sort().values].float().numpy())
        for block in features.split(block_rows):
            index.add(block.float().contiguous().numpy())
        index.nprobe = nprobe
        if gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        self.index = index

    def search(self, queries: Tensor, k: int, query_chunk: int = 256) -> tuple[Tensor, Tensor]:
        """queries (Q, D) -> (exact similarities (Q, k), memory rows (Q, k)), best first. When the visited
        lists hold fewer than k rows, the missing entries are row -1 with similarity -inf (weight 0)."""
        queries = queries.float().contiguous()
        _, rows = self.index.search(queries.numpy(), max(k, self.reorder))
        rows = torch.from_numpy(rows)
        sims = torch.cat([  # exact re-scoring, a (chunk, reorder, D) float32 temporary at a time
            torch.einsum("qd,qrd->qr", q, self.features[r.clamp_min(0)].float())
            for q, r in zip(queries.split(query_chunk), rows.split(query_chunk))
        ]).masked_fill(rows < 0, -math.inf)
        sims, order = sims.topk(k, dim=1)
        return sims, rows.gather(1, order)


SEARCHES = ("exact", "ivf")


def make_search(features: Tensor, search: str = "exact", *, gpu: bool = False, nlist: int = 512,
                nprobe: int = 32, seed: int = 0) -> ExactSearch | IVFSearch:
    """The memory's searcher: ``search="exact"`` (:class:`ExactSearch`) or ``"ivf"`` (:class:`IVFSearch`)."""
    if search == "exact":
        return ExactSearch(features, gpu=gpu)
    if search == "ivf":
        return IVFSearch(features, nlist=nlist, nprobe=nprobe, gpu=gpu, seed=seed)
    raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
