import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests are CPU-only and small; two threads match the CI machine and keep runs repeatable.
torch.set_num_threads(2)
os.environ.setdefault("MPLBACKEND", "Agg")


def tiny_overrides(ckdir: Path, **train) -> dict:
    """A config that trains in seconds: a narrow teacher, 32 px tiles, batch 2."""
    return {
        "model": {"encoder": {"width": 16, "depth": 1, "embed_dim": 8}},
        "data": {"size": 32, "batch_size": 2},
        "train": {
            "steps": 4,
            "checkpoint_dir": str(ckdir),
            "checkpoint_every": 2,
            "image_every": 2,
            "warmup": 1,
            **train,
        },
    }


@pytest.fixture
def python_exe():
    return sys.executable
