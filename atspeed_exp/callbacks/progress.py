"""Training progress as log lines, for runs whose output goes to a file (SLURM, nohup, CI): a progress bar there
writes carriage returns that nobody reads, and nothing else appears until an epoch ends. ``LogProgress`` logs a
line every ``every_percent`` of each training epoch (at most one per ``min_seconds``, and always at the epoch's
end) with the step, the last logged loss, the speed and the time left in the epoch and in the run."""

from __future__ import annotations

import logging
import time

import lightning.pytorch as pl

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LogProgress(pl.Callback):
    """``name``: the stage in each line (target, draft, sasrec); ``every_percent``: how often within an epoch;
    ``min_seconds``: no two lines within an epoch closer than this (short epochs log their end only)."""

    def __init__(self, name: str, every_percent: int = 10, min_seconds: float = 30.0) -> None:
        super().__init__()
        if not 1 <= every_percent <= 100:
            raise ValueError(f"every_percent must be in 1..100, got {every_percent}")
        self.name = name
        self.every_percent = every_percent
        self.min_seconds = min_seconds
        self._start: float | None = None
        self._start_done = 0
        self._last = 0.0
        self._next = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The clock starts at the first batch this process runs: a run resumed mid-epoch starts with batch_idx far
        # from 0 (and Lightning may not call this hook at all then), so speed is counted over the batches run here.
        self._start = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._start is None or batch_idx < self._start_done:
            self._start = self._last = time.perf_counter()
            self._start_done = batch_idx
            total = trainer.num_training_batches
            percent = 100 * batch_idx // total if isinstance(total, int) and total > 0 else 0
            self._next = (percent // self.every_percent + 1) * self.every_percent

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        total = trainer.num_training_batches
        if not isinstance(total, int) or total <= 0:
            return
        done = batch_idx + 1
        percent = 100 * done // total
        now = time.perf_counter()
        if done < total and (percent < self._next or now - self._last < self.min_seconds):
            return
        self._next = (percent // self.every_percent + 1) * self.every_percent
        self._last = now
        elapsed = now - self._start
        rate = (done - self._start_done) / elapsed if elapsed > 0 else float("nan")
        left_epoch = (total - done) / rate if rate > 0 else float("nan")
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else trainer.current_epoch + 1
        left_run = left_epoch + (epochs - trainer.current_epoch - 1) * total / rate if rate > 0 else float("nan")
        loss = trainer.callback_metrics.get(f"{self.name}/train_loss")
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        log.info("%s epoch %d/%d: %3d%% (%d/%d steps)%s, %.2f steps/s, epoch left %s, run left %s", self.name,
                 trainer.current_epoch + 1, epochs, percent, done, total, loss_text, rate, _duration(left_epoch),
                 _duration(left_run))
