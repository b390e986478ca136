"""DSE of one backbone, or of every checkpoint of a training run (curve + label-free selection)."""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np

from densessl.metrics import lambda_normalized_dse, select_checkpoints

TERMS = ("value", "inter", "intra_img", "intra_batch", "dim")


def run_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(global step, path) of a run's epoch/step checkpoints in training order (last.ckpt excluded)."""
    found = []
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        match = re.search(r"step(\d+)", path.name)
        if match and path.name != "last.ckpt":
            found.append((int(match.group(1)), path))
    if not found:
        raise FileNotFoundError(f"no step checkpoints in {run_dir / 'checkpoints'}; train with the default "
                                f"checkpoint callback (save_top_k=-1) to get one per epoch")
    return sorted(found)


def write_curve(rows: list[dict[str, Any]], out_dir: Path, top: int = 3, window: int = 2) -> list[int]:
    """CSV and PNG of the DSE terms per checkpoint, the lambda-normalised DSE over the run and the
    model-selection candidates (local maxima within +-window, top ``top``). Returns candidate indices."""
    inter = np.array([r["inter"] for r in rows])
    intra = np.array([(r["intra_img"] + r["intra_batch"]) / 2 for r in rows])
    dim = np.array([r["dim"] for r in rows])
    final = lambda_normalized_dse(inter=inter, intra=intra, dim=dim) if len(rows) > 1 else inter - intra + dim
    for r, v in zip(rows, final):
        r["dse_lambda"] = float(v)
    picks = select_checkpoints(final.tolist(), top=top, window=window)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "dse_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, final, marker="o", label="DSE (lambda-normalised)")
    axes[0].plot(steps, [r["value"] for r in rows], marker=".", label="DSE (raw, lambda=1)")
    axes[0].scatter([steps[i] for i in picks], final[picks], s=120, facecolors="none", edgecolors="r",
                    label="selected")
    axes[0].set_xlabel("step"), axes[0].legend(fontsize=8), axes[0].set_title("DSE")
    for term in ("inter", "intra_img", "intra_batch", "dim"):
        axes[1].plot(steps, [r[term] for r in rows], marker=".", label=term)
    axes[1].set_xlabel("step"), axes[1].legend(fontsize=8), axes[1].set_title("terms")
    fig.tight_layout()
    fig.savefig(out_dir / "dse_curve.png", dpi=90)
    plt.close(fig)
    return picks


def read_curve(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        rows = [dict(r) for r in csv.DictReader(f)]
    missing = [t for t in ("inter", "intra_img", "intra_batch", "dim") if t not in (rows[0] if rows else {})]
    if not rows or missing:
        raise ValueError(f"{path} needs columns inter, intra_img, intra_batch, dim (missing {missing or 'rows'})")
    return [{k: (float(v) if k != "checkpoint" else v) for k, v in r.items()} for r in rows]


def format_candidates(rows: list[dict[str, Any]], picks: list[int]) -> str:
    lines = ["model-selection candidates (local maxima of lambda-normalised DSE within +-2, top 3):"]
    for rank, i in enumerate(picks, 1):
        r = rows[i]
        lines.append(f"  {rank}. step {int(r['step'])}  DSE {r['dse_lambda']:.4f}  {r.get('checkpoint', '')}")
    return "\n".join(lines)
