"""``<run_dir>/csv/metrics.csv`` over every attempt of a run.

Lightning's CSV logger deletes an existing metrics.csv when it starts and writes it every 100 steps, so a
requeued or killed run would lose its history, or log the steps after its checkpoint twice.
"""

import csv
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from trainers.lightning_compat import KeepingExperimentWriter, csv_logger_writer


class _AppendingWriter(KeepingExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run appends instead."""

    def continue_file(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():  # continue its columns: Lightning's writer rewrites the file when a key is new to it
            with open(path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def drop_rows_from(self, step: int) -> None:
        """Forget rows a killed run logged after its checkpoint: the resumed run logs those steps again."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) == len(rows):
            return
        self.metrics_keys = sorted({key for row in rows for key in row})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """``<run_dir>/csv/metrics.csv`` over every attempt of a run: appended to, written every step (a kill
    loses at most one), and cut back to the checkpoint's step when a run resumes."""

    def __init__(self, save_dir: str):
        super().__init__(save_dir=save_dir, name="", version="csv", flush_logs_every_n_steps=1)

    @property
    def experiment(self) -> _AppendingWriter:
        return csv_logger_writer(self, _AppendingWriter)


class TrimMetricsOnResume(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger):
                    # a step's metrics are logged under step - 1: rows from global_step on come after the checkpoint
                    logger.experiment.drop_rows_from(trainer.global_step)
