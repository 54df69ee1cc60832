"""A CSV logger that continues metrics.csv when a run resumes, instead of deleting it.

Lightning's CSV writer removes an existing metrics.csv when it starts, so a resumed run (``resume=auto``,
a SLURM requeue) would lose every row logged before. This one keeps the file and its columns and
appends; a new column rewrites the header with the old rows kept (Lightning's own logic).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class ResumableCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._is_rank_zero():
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment

    @staticmethod
    def _is_rank_zero() -> bool:
        from lightning.pytorch.utilities import rank_zero_only

        return rank_zero_only.rank == 0
