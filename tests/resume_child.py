"""A training run in a child process, for the resume tests:

    python tests/resume_child.py STAGE SIGNAL STEP [OVERRIDE ...]

trains the target (STAGE=target) or the draft (STAGE=draft, on the target and teacher already in the artifacts) of
the config composed from the overrides, on one thread, and sends itself SIGNAL (KILL, TERM or INT; none: no signal)
at the end of optimizer step STEP."""

from __future__ import annotations

import os
import signal
import sys

import lightning.pytorch as pl
import torch
from pipeline_helpers import compose_config

from atspeed_exp import pipeline


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def train(stage: str, overrides: list[str], callbacks: list[pl.Callback]) -> None:
    cfg = compose_config(overrides)
    if stage == "target":
        pipeline.train_target(cfg, logger=False, extra_callbacks=callbacks)
        return
    target_dir, data = pipeline.train_target(cfg, logger=False)
    teacher_dir = pipeline.make_teacher(cfg, target_dir, data)
    pipeline.train_draft(cfg, target_dir, teacher_dir, data, logger=False, extra_callbacks=callbacks)


if __name__ == "__main__":
    stage, name, step, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    train(stage, overrides, [] if name == "none" else [SignalAtStep(int(step), getattr(signal, f"SIG{name}"))])
