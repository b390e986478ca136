"""Hummingbird retrieval evaluator cost per stage at a realistic size, against straightforward loops.

Synthetic cached features (no backbone): --n-train images (default 1,000) x 2 augmentation epochs of
32 x 32 tokens at D=384 (a /14 backbone at 448 px), a bounded memory of 1024 x 10^3 patches (512 per
image pass), 21 classes. Tokens are class prototypes + Gaussian noise; masks are background with 1-3
rectangles of other classes at the token grid, nearest-upsampled to 448 px.

Stages (ours): memory build (histograms, rare-class-first sampling, normalisation, writing the
preallocated buffers; token generation excluded), then per validation image (median of --val-images
calls): exact search (faiss.knn over the whole memory, all 1,024 queries of the image at once), label
transfer, metric (upsampling + argmax + confusion). Two straightforward references on the same data:
(1) the per-query loop (memory @ q, top-30, softmax, labels) on --loop-queries queries, extrapolated
to 1,024 queries per image, with the label distributions compared to ours; (2) the reference's patch
sampler (get_class_frequency/get_patch_scores loops with unique() per patch) on 5 images.

    PYTHONPATH=src python benchmarks/bench_retrieval.py [--n-train 1000] [--val-images 5] [--loop-queries 64] \
        [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from densessl.evaluation.metrics import apply_matching, match_hungarian, miou
from densessl.evaluation.retrieval import (
    ExactSearch,
    IVFSearch,
    build_memory,
    evaluate_memory,
    patch_label_counts,
    transfer_labels,
)
from densessl.evaluation.runtime import timed_iter
from densessl.faiss_import import faiss_threads

C, D, GRID, PATCH = 21, 384, 32, 14
SIZE = GRID * PATCH


def class_prototypes() -> torch.Tensor:
    """(C, D) class means of the synthetic tokens (norm ~16 against noise of norm ~29)."""
    return 2 * torch.randn(C, D, generator=torch.Generator().manual_seed(0)) / D**0.5 * 8


def synthetic_batch(first: int, count: int, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images first..first+count-1 (deterministic per index): tokens (B, 32, 32, D), masks (B, 448, 448)."""
    classes = torch.zeros(count, GRID, GRID, dtype=torch.int64)
    for i in range(count):
        gen = torch.Generator().manual_seed(first + i)
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            y0, x0 = torch.randint(0, GRID - 4, (2,), generator=gen).tolist()
            h, w = torch.randint(4, GRID // 2, (2,), generator=gen).tolist()
            classes[i, y0 : y0 + h, x0 : x0 + w] = int(torch.randint(1, C, (1,), generator=gen))
    gen = torch.Generator().manual_seed(10**6 + first)
    tokens = prototypes[classes] + 1.5 * torch.randn(count, GRID, GRID, D, generator=gen)
    masks = classes.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    return tokens, masks


def per_query_loop(memory, queries: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, list[float]]:
    """One query at a time: the straightforward implementation. Returns distributions and per-query times."""
    out, times = [], []
    for q in queries:
        start = time.perf_counter()
        sims, rows = (memory.features @ q).topk(k)
        weights = torch.softmax(sims / temperature, dim=0)
        out.append(weights @ memory.labels[rows].float())
        times.append(time.perf_counter() - start)
    return torch.stack(out), times


def reference_sampler_scores(gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """open-hummingbird-eval get_class_frequency + get_patch_scores: gt (h, w, p*p) -> (h, w) scores."""
    frequency = torch.zeros(num_classes)
    for i in range(gt.shape[0]):
        for j in range(gt.shape[1]):
            frequency[gt[i, j].unique()] += 1
    scores = torch.zeros(gt.shape[:2])
    for i in range(gt.shape[0]):
        for j in range(gt.shape[1]):
            scores[i, j] = frequency[gt[i, j].unique()].sum()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--memory-size", type=int, default=1024 * 10**3)
    parser.add_argument("--val-images", type=int, default=5)
    parser.add_argument("--loop-queries", type=int, default=64)
    parser.add_argument("--batch", type=int, default=50)
    # 1 thread by default: on a shared, oversubscribed machine OpenMP spin-waits make 2-thread torch
    # ops on 448 px masks ~50x slower (measured: 180 ms vs 3 ms per image for the sampler scores).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prototypes = class_prototypes()

    def train_batches():
        for _ in range(args.epochs):  # the same images each epoch (no augmentation on cached features)
            for first in range(0, args.n_train, args.batch):
                yield synthetic_batch(first, min(args.batch, args.n_train - first), prototypes)

    with faiss_threads(args.threads):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        memory = build_memory(timed_iter(train_batches(), timings, "generate"), total_images=args.n_train * args.epochs,
                              num_classes=C, memory_size=args.memory_size)
        build = time.perf_counter() - start - timings["generate"]
        rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

        val = [synthetic_batch(10**5 + i, 1, prototypes) for i in range(args.val_images)]
        stages = {"search_s": [], "label_transfer_s": [], "metric_s": []}
        conf = torch.zeros(C, C, dtype=torch.int64)
        for tokens, masks in val:
            result = evaluate_memory(memory, [(tokens, masks)], num_classes=C)
            for key in stages:
                stages[key].append(result.timings[key])
            conf += result.confusion

        # Approximate search (search="ivf", the reference's default ScaNN setting 512/32/120) on the same
        # memory and queries: build cost, search per val image, recall of the exact 30 neighbours.
        start = time.perf_counter()
        ivf = IVFSearch(memory.features, nlist=512, nprobe=32)
        ivf_build = time.perf_counter() - start
        exact = ExactSearch(memory.features)
        ivf_times, recalls = [], []
        for tokens, masks in val:
            queries = F.normalize(tokens.reshape(-1, D), dim=1)
            start = time.perf_counter()
            _, ivf_rows = ivf.search(queries, 30)
            ivf_times.append(time.perf_counter() - start)
            _, exact_rows = exact.search(queries, 30)
            recalls.append(np.mean([len(set(a) & set(b)) / 30 for a, b in zip(ivf_rows.tolist(), exact_rows.tolist())]))
        ivf_conf = evaluate_memory(memory, val, num_classes=C, search="ivf").confusion

        # Reference 1: per-query loop on the first queries of the first validation image.
        tokens = val[0][0].reshape(-1, D)[: args.loop_queries]
        queries = F.normalize(tokens, dim=1)
        loop_dist, loop_times = per_query_loop(memory, queries, 30, 0.02)
        sims, rows = ExactSearch(memory.features).search(queries, 30)
        ours_dist = transfer_labels(sims, rows, memory.labels, 0.02)
        max_diff = (loop_dist - ours_dist).abs().max().item()

    # Reference 2: the reference's per-patch unique() loops vs our histogram + vectorised scores.
    tokens, masks = synthetic_batch(0, 5, prototypes)
    ref_times, our_times = [], []
    for mask in masks:
        gt = mask.reshape(GRID, PATCH, GRID, PATCH).permute(0, 2, 1, 3).reshape(GRID, GRID, PATCH * PATCH)
        start = time.perf_counter()
        ref_scores = reference_sampler_scores(gt, C)
        ref_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        counts = patch_label_counts(mask[None], (GRID, GRID), C)
        present = counts > 0
        scores = (present * present.sum(1, keepdim=True)).sum(2).float()
        our_times.append(time.perf_counter() - start)
        assert torch.equal(scores.view(GRID, GRID), ref_scores)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    med = statistics.median
    search, loop_query = med(stages["search_s"]), med(loop_times)
    n_rows = len(memory)
    print(f"memory: {n_rows:,} rows x {D} (fp32) + {C} labels (fp16) = {memory.nbytes / 1e9:.2f} GB; "
          f"{args.n_train} images x {args.epochs} epochs x {n_rows // (args.n_train * args.epochs)} patches; "
          f"threads {args.threads}")
    print(f"{'stage':<44}{'ours':>12}{'loop ref':>12}{'ratio':>8}")
    print(f"{'memory build (s, excl. token generation)':<44}{build:>12.2f}")
    print(f"{'sampler scores per image (ms)':<44}{1e3 * med(our_times):>12.2f}{1e3 * med(ref_times):>12.1f}"
          f"{med(ref_times) / med(our_times):>7.0f}x")
    print(f"{'search per val image (s, 1,024 queries)':<44}{search:>12.2f}{1024 * loop_query:>12.2f}"
          f"{1024 * loop_query / search:>7.1f}x")
    print(f"{'search=ivf per val image (s; 512/32/120)':<44}{med(ivf_times):>12.2f}{1024 * loop_query:>12.2f}"
          f"{1024 * loop_query / med(ivf_times):>7.1f}x")
    print(f"{'search=ivf index build (s, train + add)':<44}{ivf_build:>12.2f}")
    print(f"{'label transfer per val image (s)':<44}{med(stages['label_transfer_s']):>12.3f}")
    print(f"{'metric per val image (s, 448 px)':<44}{med(stages['metric_s']):>12.3f}")
    print(f"per-query loop: {1e3 * loop_query:.1f} ms/query (median of {len(loop_times)}); "
          f"max |loop - ours| label distribution diff {max_diff:.2e}")
    matched = apply_matching(conf, match_hungarian(conf), C)
    print(f"mIoU over the {args.val_images} val images: {miou(matched):.3f} (Hungarian) / {miou(conf):.3f} (unmatched)")
    ivf_matched = apply_matching(ivf_conf, match_hungarian(ivf_conf), C)
    print(f"search=ivf: recall of the exact 30 neighbours {np.mean(recalls):.3f} (mean over {len(recalls)} val "
          f"images); mIoU {miou(ivf_matched):.3f} (Hungarian)")
    print(f"peak RSS after memory build {rss_after_build:.2f} GiB, at the end {peak_rss:.2f} GiB")
    print("\nfootprint of a 10.24M-patch memory at D=384 (GB = 1e9 bytes):")
    rows = 10_240_000
    for name, classes in (("VOC, 21 classes", 21), ("ADE20K, 151 classes", 151)):
        print(f"  {name:<22} features fp32 {rows * D * 4 / 1e9:5.2f} / fp16 {rows * D * 2 / 1e9:5.2f}; "
              f"labels fp16 {rows * classes * 2 / 1e9:4.2f} (reference fp32 {rows * classes * 4 / 1e9:4.2f})")


if __name__ == "__main__":
    main()
