"""NeCo training step vs the same step with a trivial loss on the same forward passes.

    python benchmarks/bench_neco.py [--batch 8] [--repeats 5] [--backbone dinov2_vits14]

ViT-S/14 (random init: timing does not depend on weights), 2 x 224 global + 4 x 98 local crops,
CPU. Each step = student/teacher forward + RoI alignment + loss + backward + AdamW step. The
"trivial" step replaces only the loss (mean of the aligned student features) and keeps every
forward pass, so the ratio is the objective's own cost. Prints a table with medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from densessl.methods import NeCo


def make_batch(batch: int, global_size: int, local_size: int, n_local: int) -> dict:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, global_size, global_size, generator=g) for _ in range(2)]
    crops += [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(n_local)]
    boxes = []
    for _ in range(batch):
        b = [[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0]]
        b += [[0.1 * i, 0.3, 0.1 * i + 0.3, 0.6] for i in range(n_local)]
        boxes.append(b)
    return {"crops": crops, "boxes": torch.tensor(boxes)}


def step(model: NeCo, opt: torch.optim.Optimizer, batch: dict, trivial: bool) -> float:
    start = time.perf_counter()
    if trivial:
        views = model.forward_views(batch)
        loss = views["student"].mean()
    else:
        loss = model.compute_loss(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = NeCo(backbone=dict(name=args.backbone, weights="none"), optim=dict(lr=1e-5), queue_size=8192,
                 crops=dict(global_size=args.global_size, local_size=args.local_size))
    batch = make_batch(args.batch, args.global_size, args.local_size, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    step(model, opt, batch, True), step(model, opt, batch, False)  # warm-up
    # Interleave the two variants so machine-load drift hits both equally.
    trivial, neco = [], []
    for _ in range(args.repeats):
        trivial.append(step(model, opt, batch, True))
        neco.append(step(model, opt, batch, False))
    t_med, n_med = statistics.median(trivial), statistics.median(neco)
    rows = [("trivial-loss step", t_med), ("NeCo step", n_med)]
    print(f"NeCo training step, {args.backbone}, batch {args.batch}, 2x{args.global_size} + 4x{args.local_size} "
          f"crops, CPU threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'step':<20} {'seconds':>8}")
    for name, t in rows:
        print(f"{name:<20} {t:8.3f}")
    print(f"{'ratio NeCo/trivial':<20} {n_med / t_med:8.3f}")


if __name__ == "__main__":
    main()
