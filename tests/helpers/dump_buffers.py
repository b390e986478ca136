"""Test-only callback: every DDP rank saves its module buffers (queues, centres) after training."""
from pathlib import Path

import lightning as L
import torch


class DumpBuffers(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        buffers = {k: v.detach().cpu() for k, v in pl_module.named_buffers()}
        params = {k: v.detach().cpu() for k, v in pl_module.named_parameters()}
        torch.save({"buffers": buffers, "params": params}, self.dirpath / f"rank{trainer.global_rank}.pt")
