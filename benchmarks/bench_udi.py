"""UDI training-step cost against a trivial loss on the same forward passes (CPU).

Both steps run ``UDI.forward_views``: the teacher ViT-S/16 on the two global crops (no grad), the
student on the globals and the locals, SRS sampling and projection, both SRS layers and the shared
DINO head (K = 65536 by default), then back-propagate. The UDI step adds the three-term loss (centred,
sharpened teacher softmaxes and student log-softmaxes over K, the multimodal targets) and the three
centre updates; the trivial step back-propagates s_cls.mean() + s_plus.mean() + s_patch.mean().
The steps alternate (median of --reps each, after one warm-up of each), so machine load hits both alike.

    PYTHONPATH=src python benchmarks/bench_udi.py [--batch 8] [--n-local 2] [--out-dim 65536] [--reps 5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from densessl.methods import UDI


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-local", type=int, default=2, help="96 px local crops (reference: 10)")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    crops_cfg = dict(global_size=224, local_size=96, n_local=args.n_local)
    m = UDI(backbone=dict(name="vit_small_p16"), optim=dict(lr=5e-4), head=dict(out_dim=args.out_dim),
            crops=crops_cfg, student_drop_path=0.1)
    sampler = m.train_transform()
    rng = random.Random(0)
    boxes = torch.stack([torch.tensor(sampler.sample_boxes(500, 375, rng)) / torch.tensor([500, 375, 500, 375])
                         for _ in range(args.batch)]).float()
    sizes = [224, 224] + [96] * args.n_local
    batch = {"crops": [torch.randn(args.batch, 3, s, s) for s in sizes], "boxes": boxes}

    def udi_step() -> None:
        m.compute_loss(batch)["loss"].backward()

    def trivial_step() -> None:
        v = m.forward_views(batch)
        (v["s_cls"].mean() + v["s_plus"].mean() + v["s_patch"].mean()).backward()

    steps = {"udi": udi_step, "trivial": trivial_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():  # warm-up
        m.zero_grad(set_to_none=True)
        fn()
    for _ in range(args.reps):
        for name, fn in steps.items():
            m.zero_grad(set_to_none=True)
            times[name].append(timed(fn))

    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"ViT-S/16, batch {args.batch}, 2 x 224 + {args.n_local} x 96 px, K = {args.out_dim}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'step':<28} | {'seconds':>8}")
    print(f"{'trivial loss (same fwd/bwd)':<28} | {med['trivial']:8.3f}")
    print(f"{'UDI':<28} | {med['udi']:8.3f}")
    print(f"{'ratio UDI / trivial':<28} | {med['udi'] / med['trivial']:8.3f}")


if __name__ == "__main__":
    main()
