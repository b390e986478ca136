"""Results table: does each objective improve dense features? Trains every row on the synthetic scenes
(CPU) for several seeds and evaluates the final backbone with the same dense protocols.

    python benchmarks/results_table.py                       # every row, seeds 0 1 2
    python benchmarks/results_table.py --rows random neco supervised --seeds 0

Rows are training presets (``configs/experiment/*.yaml``) plus overrides; ``random`` is the untrained
backbone; ``neco_post_cnn`` post-trains the backbone of the ``densecl_cnn`` row's seed 0. Columns (mean +-
std over seeds, %): linear probe mIoU at full resolution (converged probe: L-BFGS on cached tokens,
``evaluation/linear.py eval.options.solver=lbfgs``), overclustering mIoU at K = #classes (Hungarian) and
at K = 20 (many-to-one), Hummingbird retrieval mIoU, DSE of the final backbone, the image-vs-class gap
(below), training seconds. Each run keeps its folder under ``--out`` (checkpoints, exported backbone,
config); a cluster-map panel per row is written next to the table. Everything is printed and saved as
``results.csv`` / ``results.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> training overrides, or the backbone config of an untrained row. The presets fix backbone, crops,
# steps and data.
ROWS: dict[str, list[str] | dict] = {
    "random": {"preset": "quickstart"},  # the ViT of the quickstart presets
    "random_cnn": {"name": "resnet18_os8", "weights": "none"},
    # The same CNN after 40 DenseCL steps at lr 0: weights untouched, BatchNorm statistics estimated on the
    # training crops. The fair untrained baseline of the CNN rows (random_cnn evaluates BN at mean 0, var 1).
    "random_cnn_bn": ["+experiment=densecl_cnn_quickstart", "method.optim.lr=0.0", "trainer.max_steps=40"],
    "neco": ["+experiment=quickstart"],
    "ibot": ["+experiment=ibot_quickstart", "method.decoupling=false"],
    "ibot_dc": ["+experiment=ibot_quickstart", "method.decoupling=true"],
    "udi": ["+experiment=udi_quickstart"],
    "densecl": ["+experiment=densecl_quickstart"],
    "densecl_cnn": ["+experiment=densecl_cnn_quickstart"],
    "neco_dse": ["+experiment=quickstart", "dse.regularizer.weight=0.001"],
    "densecl_dse": ["+experiment=densecl_quickstart", "dse.regularizer.weight=0.001"],
    "supervised": ["+experiment=supervised_quickstart"],
    "supervised_cnn": ["+experiment=supervised_cnn_quickstart"],
    # NeCo as post-training: every seed starts from the same pretrained backbone (below), so its spread is
    # that of NeCo's own training seed.
    "neco_post_cnn": ["+experiment=neco_cnn_post"],
}
# post-training row -> (row, seed) whose trained backbone it starts from (trained first if needed)
STARTS: dict[str, tuple[str, int]] = {"neco_post_cnn": ("densecl_cnn", 0)}
COLUMNS = ("linear", "k_classes", "k20", "hbird", "dse", "gap", "train_s")


def image_class_gap(backbone, val_set, image_size: int, num_images: int = 32) -> float:
    """Mean cosine of (centred) tokens of different classes in the same image minus that of tokens of the
    same object class in different images. Positive: tokens say more about which image they come from
    than about their class (the failure mode of the self-supervised rows so far); a supervised backbone
    is below 0."""
    import torch
    import torch.nn.functional as F

    from densessl.data.datasets import SegTransform

    transform = SegTransform(image_size)
    images, masks = zip(*(transform(*val_set[i]) for i in range(min(num_images, len(val_set)))))
    backbone.eval()
    with torch.inference_mode():
        tokens, (h, w) = backbone.forward_patches(torch.stack(images))  # (B, N, D)
    labels = F.interpolate(torch.stack(masks)[:, None].float(), size=(h, w), mode="nearest").long().flatten(1)
    tokens = F.normalize(tokens - tokens.mean((0, 1)), dim=-1).flatten(0, 1)  # (B*N, D)
    labels, image = labels.flatten(), torch.arange(len(images)).repeat_interleave(h * w)
    cos = tokens @ tokens.T
    valid = (labels[:, None] < 255) & (labels[None] < 255)
    same_image = image[:, None] == image[None]
    same_class = labels[:, None] == labels[None]
    diff_class_same_image = cos[valid & same_image & ~same_class].mean()
    same_class_other_image = cos[valid & ~same_image & same_class & (labels[:, None] > 0)].mean()
    return float(diff_class_same_image - same_class_other_image)


def train(name: str, overrides: list[str], seed: int, out: Path) -> Path:
    run = out / name / f"seed{seed}"
    if (run / "backbone.pth").is_file():  # finished earlier: reuse (delete the folder to retrain)
        return run
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={run}", f"seed={seed}",
           "eval_before_after=false", "logger=[csv]", "trainer.enable_progress_bar=false", *overrides]
    if run.exists():
        cmd.append("resume=auto")
    print(f"[{time.strftime('%H:%M:%S')}] train {name} seed {seed}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training {name} (seed {seed}) failed:\n{proc.stderr[-3000:]}")
    return run


def evaluate(backbone, train_set, val_set, image_size: int, picture: Path | None) -> dict[str, float]:
    from densessl.evaluation.pictures import result_panels
    from densessl.evaluation.protocols import (
        evaluate_dse,
        evaluate_linear,
        evaluate_overclustering,
        evaluate_retrieval,
    )

    c = val_set.num_classes
    common = dict(image_size=image_size)
    lin = evaluate_linear(backbone, train_set, val_set, cache_features=True, augment=False, solver="lbfgs",
                          train_mask_size=image_size // 2, val_mask_size=image_size, num_vis=4 if picture else 0,
                          **common)
    oc = evaluate_overclustering(backbone, val_set, ks=[c, 20], seeds=[0, 1, 2], niter=50, nredo=1,
                                 mask_size=image_size, pca_dim=32, num_vis=4 if picture else 0, **common)
    hb = evaluate_retrieval(backbone, train_set, val_set, memory_size=len(train_set) * (image_size // backbone.patch_size) ** 2,
                            augmentation_epochs=1, batch_size=32, **common)
    dse = evaluate_dse(backbone, train_set, num_images=len(train_set), image_size=image_size, dse_batch=len(train_set))
    if picture is not None:
        result_panels([oc, lin], val_set, picture, title=picture.stem)
    return {"linear": 100 * lin.miou_full_res, "k_classes": 100 * oc.mean(c), "k20": 100 * oc.mean(20),
            "hbird": 100 * hb.miou, "dse": float(dse.value), "gap": image_class_gap(backbone, val_set, image_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "results_table")
    parser.add_argument("--image-size", type=int, default=96, help="evaluation input size (px)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="OVERRIDE",
                        help="Hydra overrides added to every trained row (e.g. trainer.max_epochs=10); name --out apart")
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from densessl.data import VOCSegmentation, ensure_synthetic_voc
    from densessl.evaluation.protocols import load_backbone

    quick = OmegaConf.load(ROOT / "configs" / "experiment" / "quickstart.yaml")
    data = OmegaConf.load(ROOT / "configs" / "data" / "synthetic.yaml").synthetic
    root = ensure_synthetic_voc(**OmegaConf.to_container(data))
    train_set, val_set = VOCSegmentation(root, "train"), VOCSegmentation(root, "val")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {}
    for name in args.rows:
        for seed in args.seeds:
            torch.manual_seed(seed)
            row = ROWS[name]
            if isinstance(row, dict):  # untrained
                cfg = ({"name": "vit_tiny", "weights": "none", **OmegaConf.to_container(quick.backbone)}
                       if row.get("preset") == "quickstart" else row)
                backbone, seconds = load_backbone(cfg), 0.0
            else:
                if name in STARTS:
                    start_row, start_seed = STARTS[name]
                    start = train(start_row, [*ROWS[start_row], *args.extra], start_seed, args.out)
                    row = [*row, f"backbone.weights={start / 'backbone.pth'}"]
                run = train(name, [*row, *args.extra], seed, args.out)
                backbone = load_backbone({}, str(run))
                seconds = json.loads((run / "summary.json").read_text())["train_seconds"]
            picture = args.out / f"{name}.png" if seed == args.seeds[0] else None
            figures = {**evaluate(backbone, train_set, val_set, args.image_size, picture), "train_s": seconds}
            results.setdefault(name, []).append(figures)
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
            write_tables(results, args.out)
    print("\n" + (args.out / "results.md").read_text())


def write_tables(results: dict[str, list[dict[str, float]]], out: Path) -> None:
    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} +- {sd:.2f}"

    header = ["row", "seeds", "linear mIoU", "overcluster K=#cls", "overcluster K=20", "Hummingbird mIoU", "DSE",
              "image-class gap", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "seed", *COLUMNS])
        for name, runs in results.items():
            for i, r in enumerate(runs):
                writer.writerow([name, i, *(f"{r[c]:.4f}" for c in COLUMNS)])
            lines.append(f"| {name} | {len(runs)} | " + " | ".join(cell([r[c] for r in runs]) for c in COLUMNS) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
