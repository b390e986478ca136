"""``hydra/launcher=slurm`` (hydra-submitit-launcher): the job options that follow the launcher, so that
each is written once, and the one-line error when the launcher is not installed.

Resolvers (registered on import, before Hydra composes ``configs/train.yaml``):

- ``${densessl.launcher:KEY,DEFAULT}``: ``hydra.launcher.KEY`` under the SLURM launcher, else DEFAULT
  (``trainer=ddp`` takes its ``devices`` and ``num_nodes`` from ``gpus_per_node`` and ``nodes``).
- ``${densessl.default_resume:}``: ``auto`` under the SLURM launcher (a requeued job continues from its
  ``last.ckpt``), else null.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# The configs/hydra/launcher choices that need hydra-submitit-launcher (ours, and the plugin's own).
SUBMITIT_LAUNCHERS = ("slurm", "submitit_slurm", "submitit_local")
SLURM_LAUNCHERS = ("slurm", "submitit_slurm")
PLUGIN = "hydra_plugins.hydra_submitit_launcher"


def hydra_node(root: DictConfig) -> DictConfig | None:
    """The Hydra config: a node of the composed root while Hydra composes and runs its callbacks; in the
    job, whose config has no ``hydra`` node, Hydra's runtime copy; None outside Hydra."""
    if "hydra" in root:
        return root.hydra
    return HydraConfig.get() if HydraConfig.initialized() else None


def under_slurm_launcher(root: DictConfig) -> bool:
    node = hydra_node(root)
    choice = None if node is None else OmegaConf.select(node, "runtime.choices", default={}).get("hydra/launcher")
    return choice in SLURM_LAUNCHERS


def launcher_option(key: str, default: Any, *, _root_: DictConfig) -> Any:
    return hydra_node(_root_).launcher[key] if under_slurm_launcher(_root_) else default


def default_resume(*, _root_: DictConfig) -> str | None:
    return "auto" if under_slurm_launcher(_root_) else None


for name, resolver in (("densessl.launcher", launcher_option), ("densessl.default_resume", default_resume)):
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, resolver)


def require_launcher_plugin(argv: Sequence[str]) -> None:
    """Exit 2 with the install command when ``argv`` picks a submitit launcher that is not installed
    (Hydra itself would only say that the config ``hydra/launcher/submitit_slurm`` is not found)."""
    for arg in argv:
        choice = arg.partition("=")[2] if arg.startswith("hydra/launcher=") else None
        if choice in SUBMITIT_LAUNCHERS and importlib.util.find_spec(PLUGIN) is None:
            print(f'error: hydra/launcher={choice} needs hydra-submitit-launcher, which is not installed: '
                  f'pip install -e ".[slurm]"', file=sys.stderr, flush=True)
            sys.exit(2)
