"""Model pieces: encoder + soft k-means head + refinement lanes (teacher), the student CNN.

``load_model`` is the one loader: a checkpoint's ``kind`` picks the class from ``MODELS``
(the registry, as in segment-anything's ``sam_model_registry``); no path loads the bundled
default student (``seglib.paths.BUNDLED_MODEL``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_checkpoint
from ..paths import bundled_model_path
from .head import SoftKMeans
from .teacher import MonolithicSegmenter

__all__ = [
    "MODELS",
    "MonolithicSegmenter",
    "SoftKMeans",
    "load_model",
    "random_init_like",
]


def _student(path: str | Path) -> torch.nn.Module:
    from .student import StudentSegmenter  # the student's module is only imported when needed

    return StudentSegmenter.from_checkpoint(path)


# Checkpoint kind -> loader (a checkpoint file -> the model it describes, CPU, eval mode).
def _scene(path: str | Path) -> torch.nn.Module:
    from .scene import SceneSegmenter

    return SceneSegmenter.from_checkpoint(path)


MODELS: dict[str, Callable[[str | Path], torch.nn.Module]] = {
    "teacher": MonolithicSegmenter.from_checkpoint,
    "student": _student,
    "scene": _scene,
}


def load_model(path: str | Path | None = None) -> torch.nn.Module:
    """A segmenter (teacher or student, CPU, eval mode) from a checkpoint file (``teacher.pt``,
    ``student.pt`` or a training ``ckpt_*.pt``); ``None`` loads the bundled default model.
    Raises ``CheckpointError`` (a ``ValueError``) for unusable files."""
    path = bundled_model_path() if path is None else path
    state = load_checkpoint(path)
    kind = state.get("task") if state.get("kind") == "train-state" else state.get("kind")
    if kind not in MODELS:
        raise CheckpointError(f"{path} holds a '{kind}' checkpoint; expected a teacher, a student or a scene model")
    return MODELS[kind](path)


def random_init_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same architecture with freshly initialised (untrained) weights, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(model)(model.config).eval()
