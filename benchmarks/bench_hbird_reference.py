"""Hummingbird search against the reference's own code: ScaNN with open-hummingbird-eval's settings next to
densessl's searches, on one memory and one set of queries in one process.

Searches: (i) ScaNN exactly as hbird/nn/search_scann.py builds and calls it (builder(memory, 30,
"dot_product").tree(num_leaves=512, num_leaves_to_search=32, training_sample_size=len(memory))
.score_ah(2, anisotropic_quantization_threshold=0.2, dimensions_per_block=4).reorder(120).build(), then
search_batched: ScaNN's serial search, the reference's call); (ii) search=exact (faiss.knn float32);
(iii) search=exact_bf16 (bfloat16 candidates + float32 re-scoring, densessl.evaluation.search.Bf16ExactSearch);
(iv) search=ivf (faiss IVF 512/32/120, 8-bit codes); (v) search=ivf_pq4 (faiss IVF 512/32 with 4-bit
PQ fast scan, 240 re-scored: ScaNN's design). With --threads > 1 ScaNN's search_batched_parallel is timed too.

Data: bench_retrieval.py's synthetic class-prototype tokens (D=384, 21 classes, 32 x 32 tokens per image,
masks at 448 px), L2-normalised; a memory of --memory-rows rows (ceil(rows / 1024) train images x 2
epochs, rare-class-first sampling, densessl's build_memory) and --queries tokens of the first val images
(row-major, whole token rows: a multiple of 32). The memory holds duplicate rows (the same patch drawn
in both epochs, no augmentation), so exact ties occur. Per search: build s, search s (median of
--repeats), search speed vs ScaNN, recall of the exact top-30 (faiss float32), the fraction of queries
given the exact neighbours (rows tied with the 30th aside), the Hummingbird mIoU of the queries' tokens
(densessl's transfer_labels, bilinear upsampling to the masks, one confusion matrix, Hungarian matching:
evaluate_memory's steps, checked against evaluate_memory when the queries are whole images), the
fraction of pixels predicted as with exact search, and the resident memory the index adds (VmRSS after
its build - before).

    PYTHONPATH=src python benchmarks/bench_hbird_reference.py [--memory-rows 1024000] [--queries 1024] \\
        [--threads 1] [--repeats 3]

ScaNN is not a densessl dependency: pip install scann (or pip install -e ".[bench]"); without it the
ScaNN rows are skipped with that message.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_retrieval import C, D, GRID, PATCH, class_prototypes, synthetic_batch  # noqa: E402

from densessl.evaluation.metrics import apply_matching, confusion_matrix, match_hungarian, miou  # noqa: E402
from densessl.evaluation.retrieval import Memory, build_memory, evaluate_memory, transfer_labels  # noqa: E402
from densessl.evaluation.search import (  # noqa: E402
    Bf16ExactSearch,
    ExactSearch,
    IVFPQ4Search,
    IVFSearch,
    bf16_matmul_is_fast,
)
from densessl.faiss_import import faiss_threads  # noqa: E402

K, EPOCHS, TEMPERATURE = 30, 2, 0.02


def rss_gb() -> float:
    """Resident memory of this process in GB (Linux /proc; nan elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return math.nan
    return pages * 4096 / 1e9


def make_memory(rows: int, batch: int = 50) -> Memory:
    images = math.ceil(rows / (GRID * GRID))
    prototypes = class_prototypes()

    def batches():
        for _ in range(EPOCHS):  # the same images each epoch, as bench_retrieval.py
            for first in range(0, images, batch):
                yield synthetic_batch(first, min(batch, images - first), prototypes)

    return build_memory(batches(), total_images=images * EPOCHS, num_classes=C, memory_size=rows)


def make_queries(count: int) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(queries (Q, D) normalised, masks of the rows they cover, whole val images as evaluate_memory batches)."""
    if count % GRID or count < GRID:
        raise SystemExit(f"--queries must be a positive multiple of {GRID} (whole token rows), got {count}")
    prototypes = class_prototypes()
    val = [synthetic_batch(10**5 + i, 1, prototypes) for i in range(math.ceil(count / (GRID * GRID)))]
    tokens = torch.cat([t.reshape(-1, D) for t, _ in val])[:count]
    masks, left = [], count // GRID  # token rows still to cover
    for _, mask in val:
        rows = min(GRID, left)
        masks.append(mask[0, : rows * PATCH])
        left -= rows
    return F.normalize(tokens, dim=1), masks, val


def hummingbird_miou(sims: torch.Tensor, rows: torch.Tensor, memory: Memory,
                     masks: list[torch.Tensor]) -> tuple[float, torch.Tensor, torch.Tensor]:
    """evaluate_memory's label transfer and metric on precomputed neighbours -> (mIoU, confusion (C, C),
    predicted classes of every pixel, flattened)."""
    dist = transfer_labels(sims, rows, memory.labels, TEMPERATURE)
    conf = torch.zeros(C, C, dtype=torch.int64)
    preds, start = [], 0
    for mask in masks:
        token_rows = mask.shape[0] // PATCH
        image = dist[start : start + token_rows * GRID].view(1, token_rows, GRID, C).permute(0, 3, 1, 2)
        pred = F.interpolate(image, size=tuple(mask.shape), mode="bilinear").argmax(dim=1)
        conf += confusion_matrix(pred, mask[None].long(), C, C, 255)
        preds.append(pred.flatten())
        start += token_rows * GRID
    return miou(apply_matching(conf, match_hungarian(conf), C)), conf, torch.cat(preds)


def same_neighbours(rows: torch.Tensor, exact_sims: torch.Tensor, exact_rows: torch.Tensor, memory: Memory,
                    queries: torch.Tensor) -> float:
    """Fraction of queries whose k neighbours are the exact ones, up to rows tied with the k-th exact score
    (within 1e-6: the synthetic memory holds duplicate rows, the same patch drawn in both epochs)."""
    same = 0
    for q, found, ref, kth in zip(queries, rows.tolist(), exact_rows.tolist(), exact_sims[:, -1].tolist()):
        swapped = sorted(set(found) ^ set(ref))
        scores = memory.features[swapped].float() @ q if swapped else torch.zeros(0)
        same += bool(((scores - kth).abs() <= 1e-6).all())
    return same / len(queries)


def timed_search(search: Callable[[], tuple], repeats: int) -> tuple[float, tuple]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = search()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def scann_rows(memory: Memory, queries: torch.Tensor, threads: int, repeats: int) -> list[dict]:
    try:
        import scann
    except ImportError:
        print("ScaNN is not installed, its rows are skipped: pip install scann (or pip install -e \".[bench]\")")
        return []
    data = memory.features.float().numpy()
    before = rss_gb()
    start = time.perf_counter()
    builder = scann.scann_ops_pybind.builder(data, K, "dot_product")
    builder.set_n_training_threads(threads)
    searcher = (builder.tree(num_leaves=512, num_leaves_to_search=32, training_sample_size=len(data))
                .score_ah(2, anisotropic_quantization_threshold=0.2, dimensions_per_block=4).reorder(120).build())
    build = time.perf_counter() - start
    extra = rss_gb() - before
    config = searcher.config()
    dims = config.split("num_dims_per_block:")[1].split()[0] if "num_dims_per_block:" in config else "?"
    print(f"ScaNN {importlib.metadata.version('scann')} index built with num_dims_per_block {dims} (the reference "
          "passes 2 positionally and dimensions_per_block=4; the config shows which one ScaNN used)")
    queries_np = queries.numpy()

    def to_torch(found):
        rows, sims = found
        return torch.from_numpy(np.asarray(sims, dtype=np.float32)), torch.from_numpy(np.asarray(rows, dtype=np.int64))

    out = []
    seconds, (sims, rows) = timed_search(lambda: to_torch(searcher.search_batched(queries_np)), repeats)
    common = dict(build=build, extra=extra)
    out.append(dict(key="scann", name="ScaNN (reference: search_batched)", search=seconds, sims=sims, rows=rows,
                    **common))
    if threads > 1:
        searcher.set_num_threads(threads)
        seconds, (sims, rows) = timed_search(lambda: to_torch(searcher.search_batched_parallel(queries_np)), repeats)
        out.append(dict(key="scann_parallel", name=f"ScaNN search_batched_parallel ({threads} threads)",
                        search=seconds, sims=sims, rows=rows, **common))
    return out


def densessl_row(key: str, name: str, build_index: Callable[[], object], queries: torch.Tensor, repeats: int) -> dict:
    before = rss_gb()
    start = time.perf_counter()
    index = build_index()
    build = time.perf_counter() - start
    extra = rss_gb() - before
    seconds, (sims, rows) = timed_search(lambda: index.search(queries, K), repeats)
    return dict(key=key, name=name, build=build, search=seconds, sims=sims, rows=rows, extra=extra, index=index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-rows", type=int, default=1024 * 10**3)
    parser.add_argument("--queries", type=int, default=GRID * GRID, help="tokens of the first val images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="search timings: median of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    memory = make_memory(args.memory_rows)
    queries, masks, val = make_queries(args.queries)
    print(f"memory {len(memory):,} rows x {D} float32 ({memory.features.nbytes / 1e9:.2f} GB), {C} classes; "
          f"{len(queries):,} queries from {len(masks)} val image(s); k={K}; threads {args.threads}; "
          f"AMX bf16 matmul: {bf16_matmul_is_fast()}; data built in {time.perf_counter() - start:.1f} s")

    with faiss_threads(args.threads):
        results = scann_rows(memory, queries, args.threads, args.repeats)
        features = memory.features
        results.append(densessl_row("exact", "densessl search=exact (faiss float32)", lambda: ExactSearch(features),
                                    queries, args.repeats))
        results.append(densessl_row("exact_bf16", "densessl search=exact_bf16 (bf16 + float32 re-scoring)",
                                    lambda: Bf16ExactSearch(features), queries, args.repeats))
        if len(memory) >= 39 * 512:
            results.append(densessl_row("ivf", "densessl search=ivf (faiss IVF 512/32/120)",
                                        lambda: IVFSearch(features, nlist=512, nprobe=32), queries, args.repeats))
            results.append(densessl_row("ivf_pq4", "densessl search=ivf_pq4 (IVF 512/32, 4-bit PQ fast scan, 240)",
                                        lambda: IVFPQ4Search(features, nlist=512, nprobe=32), queries, args.repeats))
        else:
            print(f"search=ivf and ivf_pq4 skipped: nlist 512 needs at least {39 * 512} memory rows")
        whole_images = args.queries % (GRID * GRID) == 0
        check = evaluate_memory(memory, val, num_classes=C, k=K).confusion if whole_images else None

    exact = next(r for r in results if r["key"] == "exact")
    scann_search = results[0]["search"] if results[0]["key"] == "scann" else None
    print(f"\n| search | build s | search s | s per 1,024 queries | search speed vs ScaNN | recall of exact top-{K} "
          "| queries with the exact neighbours | mIoU % | mIoU - exact's, points | pixels as exact's % | index RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    exact_miou, _, exact_pred = hummingbird_miou(exact["sims"], exact["rows"], memory, masks)
    for r in results:
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(r["rows"].tolist(), exact["rows"].tolist())])
        same = same_neighbours(r["rows"], exact["sims"], exact["rows"], memory, queries)
        value, conf, pred = hummingbird_miou(r["sims"], r["rows"], memory, masks)
        agree = (pred == exact_pred).float().mean().item()
        if r is exact and check is not None:
            assert torch.equal(conf, check), "the benchmark's metric path differs from evaluate_memory"
        ratio = f"{scann_search / r['search']:.2f}x" if scann_search else "n/a"
        print(f"| {r['name']} | {r['build']:.2f} | {r['search']:.3f} | {r['search'] * 1024 / len(queries):.3f} | "
              f"{ratio} | {recall:.3f} | {same:.3f} | {100 * value:.2f} | {100 * (value - exact_miou):+.2f} | "
              f"{100 * agree:.2f} | "
              f"{r['extra']:.2f} |")
    bf16 = next(r for r in results if r["key"] == "exact_bf16")
    diff = (bf16["sims"] - exact["sims"]).abs().max().item()
    index, searched = bf16["index"], len(queries) * args.repeats
    print(f"\nexact_bf16: max |similarity - faiss float32| {diff:.1e}; of {searched} queries ({args.repeats} runs) "
          f"{index.widened} were searched again with 8x the bf16 candidates and {index.fallbacks} in float32; "
          f"its bf16 copy of the memory is {index.memory_bf16.nbytes / 1e9:.2f} GB (half the float32 features)")
    print("search speed vs ScaNN = ScaNN's search_batched time / this search's time (> 1: faster than ScaNN); "
          "recall counts rows tied with the 30th as misses; mIoU is the protocol's (absent classes count 0, so "
          "a few images give low figures); pixels as exact's = pixels predicted as with exact search; index RSS = "
          "resident memory added by building the index (the memory itself excluded).")
    if check is not None:
        print("metric path checked: the exact search's confusion matrix equals evaluate_memory's")
    if scann_search is None:
        print("no ScaNN rows: ScaNN is not installed (pip install scann, or pip install -e \".[bench]\")")


if __name__ == "__main__":
    main()
