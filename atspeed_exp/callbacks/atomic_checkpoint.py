"""Lightning checkpoints written like every other artifact (atspeed_exp/artifacts.py).

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction that writes the whole file into the system
temporary folder (``tempfile.mkstemp()``) and then moves it into place. When the artifacts live on another file
system (shared storage, or a /tmp in memory), the move is a copy, so a job killed during it leaves a truncated
``last.ckpt`` under its final name, and a checkpoint larger than the free space of /tmp cannot be saved.
``AtomicCheckpointIO`` writes a temporary sibling of the checkpoint instead and renames it into place (atomic on
one file system), with the mode of a plain ``open()`` under the umask. Pass it as
``Trainer(plugins=[AtomicCheckpointIO()])``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from atspeed_exp.artifacts import atomic_save_to_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save_to_path(path, lambda tmp: torch.save(checkpoint, tmp))
