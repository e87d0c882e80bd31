import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests are CPU-only and small; two threads match the CI machine and keep runs repeatable.
torch.set_num_threads(2)
os.environ.setdefault("MPLBACKEND", "Agg")

# What decides the CPU's vector code: ATen's kernels (ATEN_CPU_CAPABILITY caps them), oneDNN's
# convolutions (ONEDNN_MAX_CPU_ISA) and MKL's matmuls (MKL_ENABLE_INSTRUCTIONS). docs/testing.md.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def pytest_report_header(config) -> str:
    caps = ", ".join(f"{name}={os.environ[name]}" for name in KERNEL_VARIABLES if os.environ.get(name))
    return f"CPU kernels: ATen {torch.backends.cpu.get_cpu_capability()} ({caps or 'native: no cap set'})"


def pytest_collection_modifyitems(config, items) -> None:
    """nbval's regression cells are numeric checks (``pytest -m numeric``) like the tests marked so."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.numeric)


def tiny_overrides(ckdir: Path, **train) -> dict:
    """A config that trains in seconds: a narrow teacher, 32 px tiles, batch 2, no quality probe
    (tests of the probe turn it on)."""
    return {
        "model": {"encoder": {"width": 16, "depth": 1, "embed_dim": 8}},
        "data": {"size": 32, "batch_size": 2},
        "probe": {"every": 0},
        "train": {
            "steps": 4,
            "checkpoint_dir": str(ckdir),
            "checkpoint_every": 2,
            "warmup": 1,
            **train,
        },
    }


def write_labelled_tiles(images: Path, masks: Path, tiles, per_tile: int = 2, size: int = 64) -> None:
    """Synthetic tiles with masks, ``per_tile`` per source tile, named ``img<i><tile>``
    (``img0t1``: the leave-one-tile-out protocol reads the tile from the name)."""
    import numpy as np
    from PIL import Image

    from seglib.data.synthetic import make_tile

    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for t, tile in enumerate(tiles):
        for i in range(per_tile):
            syn = make_tile(size, seed=10 * t + i, min_classes=2, max_classes=3)
            Image.fromarray((syn.rgb * 255).astype(np.uint8)).save(images / f"img{i}{tile}.png")
            Image.fromarray(syn.labels.astype(np.uint8)).save(masks / f"img{i}{tile}.png")


@pytest.fixture
def python_exe():
    return sys.executable


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny convolutions spend more time synchronising two
    threads than computing (badly so on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config():
    """The default config with a narrow teacher (width 16, depth 1, 8 learned channels)."""
    from seglib.config import Config

    cfg = Config()
    cfg.model.encoder.width, cfg.model.encoder.depth, cfg.model.encoder.embed_dim = 16, 1, 8
    return cfg


def save_teacher(path: Path, config, model) -> Path:
    """Write ``model`` as a teacher.pt with its full ``config``."""
    from seglib.checkpoint import model_checkpoint, save_atomic

    save_atomic(model_checkpoint("teacher", config.to_dict(), model.state_dict()), path)
    return path


@pytest.fixture(scope="module")
def tiny_teacher_model():
    """A random-init narrow teacher in eval mode (seed 0)."""
    from seglib.models.teacher import MonolithicSegmenter

    torch.manual_seed(0)
    return MonolithicSegmenter(tiny_config().model).eval()


@pytest.fixture(scope="module")
def tiny_teacher_checkpoint(tmp_path_factory, tiny_teacher_model):
    return save_teacher(tmp_path_factory.mktemp("ckpt") / "teacher.pt", tiny_config(), tiny_teacher_model)
