"""Linear segmentation probe: one training epoch on cached tokens, upsample-then-conv vs conv-then-upsample.

Synthetic cached features: --n-images images of 32 x 32 tokens at D=384 (a /14 backbone at 448 px),
masks at 100 x 100 with 21 classes and some ignore (255). One epoch = for every batch: logits at
100 x 100, cross-entropy with ignore_index, backward, SGD step (the LinearSegmentation training step
without Lightning). "reference order" upsamples the D-channel tokens and then applies the 1x1 conv
(NeCo linear_finetune.py); "ours" applies the conv and upsamples the C-channel logits
(``densessl.evaluation.linear.linear_logits``). Both run alternately, --runs epochs each (median
reported), from the same initial head; the logits of one batch are compared as a check.

    PYTHONPATH=src python benchmarks/bench_linear.py [--n-images 128] [--batch 32] [--runs 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from densessl.evaluation.linear import linear_logits

C, D, GRID, MASK = 21, 384, 32, 100


def reference_logits(head: nn.Conv2d, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return head(F.interpolate(tokens, size=size, mode="bilinear"))


def epoch(logits_fn, head: nn.Conv2d, tokens: torch.Tensor, masks: torch.Tensor, batch: int) -> float:
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    start = time.perf_counter()
    for i in range(0, len(tokens), batch):
        x = tokens[i : i + batch].permute(0, 3, 1, 2)  # cached (B, h, w, D) -> (B, D, h, w), as the module
        loss = criterion(logits_fn(head, x, (MASK, MASK)), masks[i : i + batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    # 1 thread by default: on a shared, oversubscribed machine OpenMP spin-waits distort multi-thread timings.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.n_images, GRID, GRID, D, generator=gen)
    masks = torch.randint(0, C, (args.n_images, MASK, MASK), generator=gen)
    masks[torch.rand(masks.shape, generator=gen) < 0.05] = 255
    head = nn.Conv2d(D, C, 1)

    with torch.no_grad():
        x = tokens[: args.batch].permute(0, 3, 1, 2)
        diff = (linear_logits(head, x, (MASK, MASK)) - reference_logits(head, x, (MASK, MASK))).abs().max().item()

    variants = {"reference order (upsample, conv)": reference_logits, "ours (conv, upsample)": linear_logits}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, fn in variants.items():
            times[name].append(epoch(fn, copy.deepcopy(head), tokens, masks, args.batch))
    ref, ours = (statistics.median(times[name]) for name in variants)
    print(f"{args.n_images} images of {GRID}x{GRID}x{D} tokens, batch {args.batch}, logits at {MASK}x{MASK}, "
          f"{C} classes, {args.threads} threads; median of {args.runs} epochs")
    for name in variants:
        t = statistics.median(times[name])
        print(f"  {name:<34} {t:7.2f} s/epoch  {1e3 * t / args.n_images:7.1f} ms/image")
    print(f"  speed-up {ref / ours:.1f}x; max |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
