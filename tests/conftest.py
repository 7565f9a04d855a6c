import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub or W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def beauty_root() -> Path:
    root = SHARED_DATA / "beauty"
    if not (root / "training_dict.npy").exists():
        pytest.skip(f"real Beauty data not found at {root}")
    return root
