"""Time densessl.metrics.dse against the per-image/per-group loop port of the official code.

One Gaussian batch (default 1024 x 196 x 384, the README setting: ViT-S/16 tokens, batch
1024). Ours: median of ``--runs`` timed calls after one warm-up call. Reference
(benchmarks/reference_dse.py): ``--ref-runs`` calls (default 1: ~20 s each on 2 cores).
Prints both timings, the speed-up and both sets of values side by side; values agree up to
k-means noise (different random draws).

    PYTHONPATH=src python benchmarks/bench_dse.py [--batch 1024] [--runs 5] [--ref-runs 1]
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

TERMS = ("inter", "intra_img", "intra_batch", "dim", "value")


def timed(fn, runs: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ref-runs", type=int, default=1)
    args = parser.parse_args()

    features = torch.randn(args.batch, args.tokens, args.dim, generator=torch.Generator().manual_seed(0))
    print(f"features {tuple(features.shape)}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    dse(features)  # warm-up (allocator, MKL)
    ours_t, ours = timed(lambda: dse(features), args.runs)
    ref_t, ref = timed(lambda: reference_dse(features), args.ref_runs)
    ours_med, ref_med = statistics.median(ours_t), statistics.median(ref_t)

    print(f"\n{'impl':<28}{'runs':>5}{'median s':>10}{'min s':>9}")
    print(f"{'densessl dse (batched)':<28}{args.runs:>5}{ours_med:>10.2f}{min(ours_t):>9.2f}")
    print(f"{'reference loop port':<28}{args.ref_runs:>5}{ref_med:>10.2f}{min(ref_t):>9.2f}")
    print(f"speed-up (median ref / median ours): {ref_med / ours_med:.1f}x")

    ref_values = dict(zip(("inter", "intra_img", "intra_batch", "dim", "value"), ref))
    print(f"\n{'term':<12}{'densessl':>10}{'reference':>11}{'diff':>10}")
    for name in TERMS:
        a, b = getattr(ours, name), ref_values[name]
        print(f"{name:<12}{a:>10.4f}{b:>11.4f}{a - b:>10.4f}")


if __name__ == "__main__":
    main()
