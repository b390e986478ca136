"""Lightning's CSVLogger, except that a run resumed in its own folder continues its metrics.csv.

Lightning's writer deletes an existing metrics.csv when it starts ("Previous log files in this directory
will be deleted"), so a resumed run (resume=auto, or a relaunch after preemption) lost every row logged
before the resume. Here the existing rows stay and new rows are appended (the header grows when new keys
appear). Steps that a stopped run logged after its last checkpoint are logged again by the resumed run:
for such a step the later row is the one the resumed weights produced. The header always follows the
file as it is, so rows stay aligned when another process grew it (the ranks of a forked DDP run).
"""
from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuingWriter(ExperimentWriter):
    def _file_keys(self) -> set[str]:
        if not self._fs.isfile(self.metrics_file_path):
            return set()
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            return set(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        self.metrics_keys = sorted(self._file_keys())

    def _record_new_keys(self) -> set[str]:
        # The header is the keys of these rows, of earlier saves and of the file as it is now: another
        # process may have grown it (the ranks of a forked or spawned DDP run log from children while
        # the launching process logs after fit). Non-empty return: the file's header must be rewritten.
        on_file = self._file_keys()
        keys = set().union(*self.metrics) | set(self.metrics_keys) | on_file
        self.metrics_keys = sorted(keys)
        return keys - on_file


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that appends to an existing ``metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
