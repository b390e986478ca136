"""Training moves (issue 12, partly): a short self-supervised run lowers its loss end to end.

DenseCL on the stride-8 ResNet-18 (``+experiment=densecl_cnn_quickstart``), 40 steps on the default
synthetic scenes: the total loss falls by more than 0.15 (measured 4.46 -> 4.06; at lr 0 it rises to 5.45),
so the views, crops, key encoder, queues, schedule and optimiser work together through the CLI.

Not yet here: a dense metric above its untrained value. After 40 steps (seed 0) Hummingbird is +4.6 points above
the untrained CNN, but a run at lr 0 gives nearly the same (+3.7): the gain is BatchNorm's running
statistics, not learning. The fair baseline is benchmarks/results_table.py's ``random_cnn_bn`` row.
"""
from pathlib import Path

import pandas as pd

from helpers.tiny_runs import run_train


def test_the_loss_falls(tmp_path: Path):
    run_train(tmp_path, "+experiment=densecl_cnn_quickstart", "trainer.max_steps=40", "eval_before_after=false",
              "logger=[csv]", "trainer.enable_progress_bar=false", "seed=0")
    [metrics] = (tmp_path / "run").rglob("metrics.csv")
    loss = pd.read_csv(metrics).dropna(subset=["train/loss"])["train/loss"]
    assert len(loss) >= 6
    assert loss.tail(3).mean() < loss.head(3).mean() - 0.15, loss.tolist()
