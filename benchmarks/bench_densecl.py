"""DenseCL training-step cost against a trivial loss on the same forward passes (CPU).

Both steps run the query encoder (ResNet-50 + DenseCL neck, with grad) and the key encoder (no grad)
on two random 224 px views, then back-propagate. The DenseCL step adds the C5 argmax
correspondence, the global and dense InfoNCE terms against the two 65536 x 128 queues (cloned, as
the reference) and the two queue pushes; the trivial step back-propagates q.mean() + q_dense.mean().
The steps alternate (median of --reps each, after one warm-up of each), so machine load hits both
alike. The queue update (two clones + two pushes) is also timed alone.

    PYTHONPATH=src python benchmarks/bench_densecl.py [--batch 8] [--size 224] [--reps 5] [--threads 0]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from densessl.methods import DenseCL


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = DenseCL(backbone=dict(name="resnet50"), optim=dict(name="sgd", lr=0.03))  # reference sizes
    x1, x2 = torch.randn(2, args.batch, 3, args.size, args.size)
    batch = {"crops": [x1, x2]}

    def densecl_step() -> None:
        m.compute_loss(batch)["loss"].backward()

    def trivial_step() -> None:
        q_feats, _ = m.student_backbone.forward_patches(x1)
        q, q_dense, _ = m.student_neck(q_feats)
        with torch.no_grad():
            m._encode_keys(x2)
        (q.mean() + q_dense.mean()).backward()

    def queue_update() -> None:
        m.queue_global.queue.clone(), m.queue_dense.queue.clone()
        k = torch.nn.functional.normalize(torch.randn(args.batch, 128), dim=1)
        m.queue_global.push(k)
        m.queue_dense.push(k)

    steps = {"densecl": densecl_step, "trivial": trivial_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in steps.items():
            m.zero_grad(set_to_none=True)
            times[name].append(timed(fn))
    queue = [timed(queue_update) for _ in range(max(args.reps, 20))]

    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"ResNet-50, batch {args.batch}, {args.size} px, {torch.get_num_threads()} threads, "
          f"queues 2 x {m.queue_global.size} x {m.queue_global.dim}, median of {args.reps}")
    print(f"{'step':<28} | {'seconds':>8}")
    print(f"{'trivial loss (same fwd/bwd)':<28} | {med['trivial']:8.3f}")
    print(f"{'DenseCL':<28} | {med['densecl']:8.3f}")
    print(f"{'ratio DenseCL / trivial':<28} | {med['densecl'] / med['trivial']:8.3f}")
    q_ms = statistics.median(queue) * 1e3
    print(f"{'queue update (2 clone+push)':<28} | {q_ms / 1e3:8.4f}  ({q_ms:.1f} ms, "
          f"{100 * q_ms / 1e3 / med['densecl']:.2f}% of the DenseCL step)")


if __name__ == "__main__":
    main()
