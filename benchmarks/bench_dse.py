"""Time densessl.metrics.dse against the per-image/per-group loop port of the official code.

One Gaussian batch (default 1024 x 196 x 384, the README setting: ViT-S/16 tokens, batch
1024). Ours: one warm-up call, then one timed call per seed 0 .. ``--runs`` - 1 (default 5).
Reference (benchmarks/reference_dse.py): one timed call per seed 0 .. ``--ref-seeds`` - 1
(default 3, ~19 s each). Times are medians over the calls. Prints both timings and the speed-up,
then per term the min-max over our seeds and over the reference's and whether the two ranges
overlap: our random draws differ from the reference's, so the values agree up to k-means seed
noise, not exactly (at the default size that noise is ~1e-4, and a few seeds under-estimate
it). Timings are wall-clock: on a shared machine compare the two rows of one run, not runs at
different times.

    PYTHONPATH=src python benchmarks/bench_dse.py [--batch 1024] [--runs 5] [--ref-seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_dse import reference_dse  # noqa: E402

from densessl.metrics import dse  # noqa: E402

TERMS = ("inter", "intra_img", "intra_batch", "dim", "value")  # reference_dse's return order


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ref-seeds", type=int, default=3)
    args = parser.parse_args()

    features = torch.randn(args.batch, args.tokens, args.dim, generator=torch.Generator().manual_seed(0))
    print(f"features {tuple(features.shape)}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    dse(features)  # warm-up (allocator, MKL)
    ours_t, ours = zip(*(timed(lambda: dse(features, seed=seed)) for seed in range(args.runs)))
    ref_t, ref = zip(*(timed(lambda: reference_dse(features, seed=seed)) for seed in range(args.ref_seeds)))
    ours_med, ref_med = statistics.median(ours_t), statistics.median(ref_t)

    print(f"\n{'impl':<28}{'runs':>5}{'median s':>10}{'min s':>9}")
    print(f"{'densessl dse (batched)':<28}{args.runs:>5}{ours_med:>10.2f}{min(ours_t):>9.2f}")
    print(f"{'reference loop port':<28}{args.ref_seeds:>5}{ref_med:>10.2f}{min(ref_t):>9.2f}")
    print(f"speed-up (median ref / median ours): {ref_med / ours_med:.1f}x")

    print(f"\n{'term':<12}{'ours min':>10}{'ours max':>10}{'ref min':>10}{'ref max':>10}  overlap")
    for i, name in enumerate(TERMS):
        ours_v, ref_v = [getattr(o, name) for o in ours], [r[i] for r in ref]
        gap = max(min(ref_v) - max(ours_v), min(ours_v) - max(ref_v))  # > 0: disjoint ranges
        overlap = "yes" if gap <= 0 else f"no (gap {gap:.5f})"
        print(f"{name:<12}{min(ours_v):>10.5f}{max(ours_v):>10.5f}{min(ref_v):>10.5f}{max(ref_v):>10.5f}  {overlap}")


if __name__ == "__main__":
    main()
