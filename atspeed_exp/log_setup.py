"""One line per log record, and no third-party noise, in the terminal and in Hydra's log file.

Some libraries attach their own stderr handler to a logger that also propagates to the root logger (which Hydra
configures), so each of their INFO lines appears twice on a terminal. ``route_library_logs`` removes those extra
handlers and drops a few messages that say nothing about the run (a Lightning advertisement, a deprecation warning
inside Lightning's own code, transformers' weight-loading progress bar). ``quiet_wandb`` turns off W&B's end-of-run
history and summary blocks, printed at every stage's end before the pipeline's own summary."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

NOISE = ("litlogger",)  # substrings of log messages that are advertisements, not information
# libraries that attach a console handler of their own; their records go to the root's handlers instead (Lightning
# also stops propagating when it is imported before logging is configured, which then bypasses Hydra's log file)
LIBRARIES = ("lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "huggingface_hub")
NOISY_WARNINGS = (r".*LeafSpec.*",)  # deprecation warnings raised inside a dependency, not by this project


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in NOISE)


def route_library_logs() -> None:
    """Call once after logging is configured (Hydra's job logging) and the libraries are imported."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        library = name.split(".")[0] in LIBRARIES
        if not isinstance(logger, logging.Logger) or not (library or (logger.propagate and "." not in name)):
            continue
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # a duplicate of the root's console handler
                logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.root.handlers:
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(_DropNoise())
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if "transformers" in sys.modules:  # its "Loading weights" bar at every model load, carriage returns in log files
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def quiet_wandb(arguments: dict[str, Any]) -> dict[str, Any]:
    """W&B logger ``arguments`` with ``settings=wandb.Settings(quiet=True)``: no "Run history" / "Run summary"
    blocks when a run finishes (the start lines with the run's folder, and online its link, stay). Kept as given when
    the arguments carry their own ``settings`` or the environment sets ``WANDB_QUIET`` / ``WANDB_SILENT``."""
    if "settings" in arguments or "WANDB_QUIET" in os.environ or "WANDB_SILENT" in os.environ:
        return arguments
    import wandb  # only when W&B logs

    return {**arguments, "settings": wandb.Settings(quiet=True)}
