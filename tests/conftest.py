import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub or W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
# the real Beauty files: the project's default place (data/beauty), else a shared/ folder beside the repository
BEAUTY_CANDIDATES = (REPO / "data" / "beauty", REPO.parent / "shared" / "data" / "beauty")
BEAUTY = next((p for p in BEAUTY_CANDIDATES if (p / "training_dict.npy").exists()), BEAUTY_CANDIDATES[-1])


@pytest.fixture
def beauty_root() -> Path:
    if not (BEAUTY / "training_dict.npy").exists():
        pytest.skip(f"real Beauty data not found at {' or '.join(str(p) for p in BEAUTY_CANDIDATES)}")
    return BEAUTY
