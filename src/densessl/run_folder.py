"""Hydra callback that keeps a finished or stopped run's files: a new run never writes into a folder
that already holds one unless it resumes it."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# Files every training run writes into its folder: their presence means the folder holds a run.
RUN_FILES = ("config.yaml", "checkpoints", "summary.json", "backbone.pth")


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def launched_rank() -> bool:
    """True in a process that a launcher started as a further rank (Lightning's DDP re-launch, srun's
    tasks): the first rank has already checked the folder and is writing into it."""
    return any(int(os.environ.get(v, "0") or 0) != 0 for v in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


def refuse(message: str) -> None:
    # Raised before the job starts, outside the entry point's error handler: print and exit like it.
    print(f"\nerror: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class RunFolderGuard(Callback):
    """Stops before Hydra writes anything when the output folder holds another run and ``resume`` is unset."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir))
        if config.get("resume") in (None, "", "none") and not launched_rank() and holds_run(folder):
            refuse(f"the run folder {folder} already holds a run ({', '.join(n for n in RUN_FILES if (folder / n).exists())}); "
                   f"nothing was overwritten. Continue it with resume={folder}, or pick a new folder "
                   f"(hydra.run.dir=...).")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        taken = sorted(p.name for p in folder.glob("*") if p.is_dir() and holds_run(p)) if folder.is_dir() else []
        if config.get("resume") in (None, "", "none") and taken:
            refuse(f"the sweep folder {folder} already holds runs ({', '.join(taken[:5])}); nothing was overwritten. "
                   f"Pick a new folder (hydra.sweep.dir=...), or resume each run with resume=auto.")
