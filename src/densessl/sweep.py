"""Hydra callback: after a multirun (``-m``), one table of every run's final figures."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``summary.json`` (written by every training run) under ``sweep_dir``, with the run's overrides."""
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json")):
        figures = json.loads(path.read_text())
        overrides = (path.parent / ".hydra" / "overrides.yaml")
        rows.append({"run": path.parent.name,
                     "overrides": " ".join(x.strip("- \n") for x in overrides.read_text().splitlines())
                     if overrides.exists() else "", **figures})
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(sweep_dir / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        shown = [k for k in keys if k not in ("run", "overrides")]
        print(f"\nsweep summary ({sweep_dir / 'summary.csv'}):")
        print(" | ".join(["run", *shown, "overrides"]))
        for r in rows:
            cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in shown]
            print(" | ".join([r["run"], *cells, r["overrides"]]))
