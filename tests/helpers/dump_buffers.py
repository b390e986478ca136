"""Test-only callback: every DDP rank saves its module buffers (queues, centres), its weights and its
DSE-monitor values (history and callback_metrics, without the per-rank dse/seconds) after training."""
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
        dse = [{k: v for k, v in entry.items() if k != "dse/seconds"}
               for cb in trainer.callbacks if type(cb).__name__ == "DSEMonitor" for entry in cb.history]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("dse/") and k != "dse/seconds"}
        torch.save({"buffers": buffers, "params": params, "dse": dse, "callback_metrics": metrics},
                   self.dirpath / f"rank{trainer.global_rank}.pt")
