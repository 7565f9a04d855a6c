"""Resuming a fit at any optimizer step with the result of an uninterrupted run.

A Lightning checkpoint holds the weights, the optimizer and scheduler states, the loop counters and, through
``ResumableDataLoader``, the sampler's position within the epoch. Two callbacks add the rest:

- ``ResumeState`` puts the random states (torch, CUDA, numpy, ``random``) in every checkpoint and restores them when
  a resumed fit starts training, so dropout draws what it would have drawn, and makes sure Lightning hands the
  saved sampler position back to the training DataLoader;
- ``MidEpochCheckpoint`` rewrites ``last.ckpt`` inside epochs: every ``every_n_steps`` optimizer steps, and when the
  process gets SIGTERM (Lightning's handler records it) or SIGINT (its own handler during the fit) it saves at the
  end of the current step and stops with ``TrainingStopped``. A second Ctrl-C stops at once without saving.

Mid-epoch saves happen at the end of an optimizer step (never inside a gradient accumulation) and never at an epoch's
last batch: validation and the end-of-epoch ``last.ckpt`` (``pipeline.latest_checkpoint``) follow it (Lightning
resumed from that batch's end would skip that validation). SIGINT there stops the fit once the epoch has ended;
SIGTERM there stops it within the validation (Lightning checks between validation batches). The rerun resumes from
the last checkpoint written."""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class TrainingStopped(SystemExit):
    """A fit stopped by a signal after saving a checkpoint to resume from. Like Lightning's ``SIGTERMException``, a
    ``SystemExit``: uncaught, the process exits with ``128 + signum`` (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


def rng_states() -> dict[str, Any]:
    """The random states as tensors and plain values only (checkpoints are read with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(pl.Callback):
    """What a resumed fit needs besides Lightning's own restore, applied at ``on_train_start`` (after Lightning has
    set up the training data, before the first batch is drawn):

    - the random states: saved with every checkpoint (read at the moment of saving) and restored, which is where an
      uninterrupted run continues from the saved point (the training loader draws from its own generator, so
      nothing between the two touches these states);
    - the training DataLoader's saved position. Lightning loads it when it sets up the training data, but skips that
      when the data were set up before the checkpoint was restored, which happens when ``configure_optimizers``
      reads ``trainer.estimated_stepping_batches`` (both modules do, for the schedule's length): the position would
      be dropped and the epoch replayed from its first batch. Loading the pending states here is Lightning's own
      step (a no-op once it has run); the sampler reads them at its first batch."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.fit_loop._load_combined_loader_states()
        if self._loaded is not None:
            set_rng_states(self._loaded)
            self._loaded = None


class MidEpochCheckpoint(pl.Callback):
    """Rewrites ``path`` (``checkpoints/last.ckpt``, through the trainer's checkpoint IO, so atomically with
    ``AtomicCheckpointIO``) every ``every_n_steps`` optimizer steps (None: only on a signal), and on SIGTERM or
    SIGINT saves it at the end of the current step and stops the fit (module docstring).

    A signal seen at the end of a step (``on_train_batch_end``) saves and raises ``TrainingStopped``. Lightning
    checks SIGTERM once more after the step's other hooks and stops with its ``SIGTERMException``; a SIGTERM that
    arrived in between is saved in ``on_exception`` (the pipeline turns that exception into ``TrainingStopped``).
    A signal during an epoch's last batch or its validation stops the fit once the epoch has ended."""

    def __init__(self, path: str | Path, every_n_steps: int | None = None, stage: str = "training") -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be None or an integer >= 1, got {every_n_steps!r}")
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.stage = stage
        self._sigint = False
        self._previous_sigint: Any = None
        self._batch_idx: int | None = None  # the last batch that ended in this epoch

    # -- signals ---------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its SIGTERM handler and recorded the handlers to restore when the fit ends
        self._sigint = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        signum = self._signal(trainer)
        if signum is not None:  # after the last epoch's end: last.ckpt already holds the end of training
            self._stop(trainer, signum, "after the last epoch")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._sigint:
            raise KeyboardInterrupt
        self._sigint = True
        log.warning("%s: SIGINT received; stopping at the end of this step after saving %s (Ctrl-C again stops at "
                    "once, without saving)", self.stage, self.path)

    def _signal(self, trainer: pl.Trainer) -> signal.Signals | None:
        if self._sigint:
            return signal.SIGINT
        return signal.SIGTERM if trainer.received_sigterm else None

    def _stop(self, trainer: pl.Trainer, signum: signal.Signals, where: str) -> None:
        message = (f"{self.stage} stopped by {signum.name} {where} (global step {trainer.global_step}); "
                   f"{self.path} holds that point: rerun the same command to resume from it")
        log.error(message)
        raise TrainingStopped(signum, message)

    # -- saving ----------------------------------------------------------------------------------------------------
    def _mid_epoch_step_end(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """The end of an optimizer step (not inside a gradient accumulation, whose gradients no checkpoint holds)
        that is not the epoch's last batch (validation and the end-of-epoch checkpoint follow that one)."""
        return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and batch_idx + 1 < trainer.num_training_batches

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch_idx = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if not self._mid_epoch_step_end(trainer, batch_idx):
            return
        signum = self._signal(trainer)
        if signum is None and not (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full resumable state
        if signum is not None:
            self._stop(trainer, signum, f"in epoch {trainer.current_epoch + 1}/{trainer.max_epochs} after "
                                        f"batch {batch_idx + 1}/{trainer.num_training_batches}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signum = self._signal(trainer)
        if signum is not None:  # the signal came during the epoch's last batch or its validation
            trainer.save_checkpoint(self.path, weights_only=False)  # the full resumable state
            self._stop(trainer, signum, f"at the end of epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        # Lightning's SIGTERM stop after a training step's hooks (not during validation, where it stops mid-way)
        if (isinstance(exception, SIGTERMException) and trainer.training and self._batch_idx is not None
                and self._mid_epoch_step_end(trainer, self._batch_idx)):
            trainer.save_checkpoint(self.path, weights_only=False)  # the full resumable state
            log.info("%s: saved %s at global step %d", self.stage, self.path, trainer.global_step)
