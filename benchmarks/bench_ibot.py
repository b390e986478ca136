"""Training-step time of iBOT and iBOT + de-coupling vs a trivial loss on the same forward passes.

ViT-S/16, 2 global crops at 224, batch 8, CPU, the reference head (8192 prototypes, shared) and RCC
masks. A step is the teacher forward, the masked student forward, the loss and the backward; colour
augmentation and the data loader are excluded. The trivial loss (sum of the means of the student's
outputs) replaces ``IBOT.loss_fn`` only, so each pair of rows shares its forward passes. Median of
``--runs`` timed steps after one warm-up, all variants interleaved in every round.

    PYTHONPATH=src python benchmarks/bench_ibot.py [--runs 5] [--batch 8] [--size 224]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from densessl.methods import IBOT


class TrivialLoss(nn.Module):
    """Same call signature as IBOTLoss; sum of the means of the student's [CLS] and patch logits."""

    def forward(self, student_cls: list[Tensor], student_patch: list[Tensor], *args: object, **kwargs: object) -> dict:
        return {"loss": sum(x.mean() for x in student_cls + student_patch)}


def make(decoupling: bool, trivial: bool, size: int) -> IBOT:
    torch.manual_seed(0)
    method = IBOT({"name": "vit_small_p16", "weights": "none", "img_size": size}, {"lr": 1e-3},
                  crops={"global_size": size, "n_local": 0, "interpolation": "bicubic"},
                  student_drop_path=0.1, decoupling=decoupling)
    if trivial:
        method.loss_fn = TrivialLoss()
    return method


def batch_for(method: IBOT, n: int, size: int) -> dict:
    """A prepared batch; with de-coupling, the first seed whose masks give de-coupled rows (half the
    RCC masks are empty, so a batch of 8 occasionally has fewer than the 4 non-empty masks needed)."""
    transform = method.train_transform()
    for seed in range(100):
        random.seed(seed)
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 255, (size + 32, size + 64, 3), dtype=np.uint8)) for _ in range(n)]
        batch = method.prepare_views(method.collate_fn([transform(im) for im in images]))
        if not method.decoupling or batch["crops"][0].shape[0] > n:
            return batch
    raise RuntimeError("no batch with de-coupled rows in 100 seeds")


def step(method: IBOT, batch: dict) -> float:
    method.zero_grad(set_to_none=True)
    start = time.perf_counter()
    method.compute_loss(batch)["loss"].backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    specs = (("trivial", False, True), ("ibot", False, False), ("trivial_dc", True, True), ("ibot_dc", True, False))
    variants = {name: make(dc, trivial, args.size) for name, dc, trivial in specs}
    batches = {name: batch_for(m, args.batch, args.size) for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rnd in range(args.runs + 1):  # round 0 is the warm-up
        for name, method in variants.items():
            t = step(method, batches[name])
            if rnd > 0:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    rows = batches["ibot_dc"]["crops"][0].shape[0]
    print(f"ViT-S/16, 2 x {args.size} global crops, batch {args.batch} (de-coupling: {rows} rows per view), "
          f"CPU {torch.get_num_threads()} threads, median of {args.runs}")
    print(f"{'variant':<12} | {'step (s)':>9} | {'vs same-forward trivial':>24} | {'vs trivial (no DC)':>19}")
    same_forward = {"trivial": "trivial", "ibot": "trivial", "trivial_dc": "trivial_dc", "ibot_dc": "trivial_dc"}
    for name, base in same_forward.items():
        print(f"{name:<12} | {med[name]:9.3f} | {med[name] / med[base]:23.2f}x | {med[name] / med['trivial']:18.2f}x")
    print("targets: ibot <= 1.15x its trivial step; ibot_dc <= 1.35x the trivial step without de-coupling")


if __name__ == "__main__":
    main()
