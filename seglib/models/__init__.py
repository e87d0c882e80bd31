"""Model pieces: encoder + soft k-means head + refinement lanes (teacher), the student CNN."""

from __future__ import annotations

from pathlib import Path

import torch

from .head import K_MAX, K_MIN, SoftKMeans, check_k
from .teacher import MonolithicSegmenter

__all__ = [
    "MonolithicSegmenter",
    "SoftKMeans",
    "check_k",
    "K_MIN",
    "K_MAX",
    "load_model_file",
    "random_init_like",
]


def load_model_file(path: str | Path | None) -> torch.nn.Module:
    """A segmenter (teacher or student, eval mode, CPU) from a checkpoint file; ``None`` loads
    the bundled default model. Dispatches on the checkpoint's ``kind``."""
    from ..checkpoint import CheckpointError, load_checkpoint

    if path is None:
        from ..api import bundled_model_path

        path = bundled_model_path()
    state = load_checkpoint(path)
    kind = state.get("task") if state.get("kind") == "train-state" else state.get("kind")
    if kind == "teacher":
        return MonolithicSegmenter.from_checkpoint(path)
    if kind == "student":
        from .student import StudentSegmenter

        return StudentSegmenter.from_checkpoint(path)
    raise CheckpointError(f"{path} holds a '{kind}' checkpoint; expected a teacher or a student")


def random_init_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same architecture with freshly initialised (untrained) weights, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(model)(model.config).eval()
