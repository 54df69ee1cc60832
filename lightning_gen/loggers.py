"""Loggers that keep what a run already wrote when it resumes (requeues included), and a quiet W&B logger."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer starts with no known columns, so on resume it rewrites metrics.csv with
    only the columns of its first new rows and fails on (or drops) the old ones. This writer reads
    the existing header first, so new rows are appended and no earlier row is lost."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def _check_log_dir_exists(self) -> None:
        pass  # an existing run directory is expected: we append to it


class AppendingCSVLogger(CSVLogger):
    """CSVLogger writing ``<save_dir>/metrics.csv`` and appending to it across resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger without the ``anonymous`` argument: Lightning always passes it to
    ``wandb.init`` (None when unset), and wandb >= 0.19 warns for any value that it has no effect."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
