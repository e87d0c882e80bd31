"""A scene model's maps fused with another seglib model's learned features, clustered together.

``FusedSegmenter`` concatenates the scene model's maps (its ``levels``, each unit-normalised and
weighted) with the other model's learned features (unit-normalised, times the square root of
``weight``); the base class normalises the whole and appends colour, and the scene model's head
(the bundled student's) clusters it. ``weight`` 0 is the scene model alone.

Checkpoint kind ``scene_fusion``: no weights of its own, only the two model files it combines
(paths relative to the checkpoint's folder) with their content hashes, so that a changed part is
refused instead of silently scored, and a protocol's score cache (keyed by the hash of this file)
follows the parts. ``other_random_seed`` replaces the other model's weights by random ones of that
seed (``random_init_like``): the random-weight twin of a fusion is the scene model's random twin
fused with the other architecture at random weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from seglib.checkpoint import FORMAT, CheckpointError, load_checkpoint
from seglib.models import MODELS, load_model, random_init_like
from seglib.models.scene import SceneSegmenter
from seglib.models.segmenter import Segmenter

__all__ = ["KIND", "FusedSegmenter", "fusion_checkpoint", "load_fused"]

KIND = "scene_fusion"


class FusedSegmenter(Segmenter):
    """Arguments:
    scene: the ``SceneSegmenter`` whose head, lanes, downsample and colour weight are used.
    other: any seglib segmenter (teacher, student, scene); only its ``features`` are read.
    weight: weight of the other model's features beside the scene maps (0: left out).
    """

    def __init__(self, scene: SceneSegmenter, other: Segmenter, *, weight: float = 1.0):
        super().__init__()
        self.scene, self.other, self.weight = scene, other, float(weight)
        self.config = scene.config
        self.input_multiple = max(scene.input_multiple, getattr(other, "input_multiple", 4))
        self.init_head(scene.config.head, colour_weight=scene.colour_weight)

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        parts = [self.scene.features(rgb)]
        if self.weight > 0:
            other = self.other.features(rgb).float()
            if other.shape[-2:] != parts[0].shape[-2:]:
                other = F.interpolate(other, size=parts[0].shape[-2:], mode="bilinear", align_corners=False)
            parts.append(F.normalize(other, dim=1) * self.weight**0.5)
        return torch.cat(parts, 1)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fusion_checkpoint(scene: str | Path, other: str | Path, at: str | Path, *, other_random_seed=None) -> dict:
    """The checkpoint, to be saved at ``at``, of ``scene`` fused with ``other`` (model files)."""
    folder = Path(at).resolve().parent
    parts = {}
    for name, path in (("scene", scene), ("other", other)):
        parts[name] = {"path": os.path.relpath(Path(path).resolve(), folder), "sha256": _sha(path)}
    return {"format": FORMAT, "kind": KIND, "config": {**parts, "other_random_seed": other_random_seed}}


def load_fused(path: str | Path) -> FusedSegmenter:
    """The ``FusedSegmenter`` a ``scene_fusion`` checkpoint describes (CPU, eval mode)."""
    config = load_checkpoint(path, kind=KIND)["config"]
    models = {}
    for name in ("scene", "other"):
        part = Path(path).resolve().parent / config[name]["path"]
        if not part.is_file() or _sha(part) != config[name]["sha256"]:
            raise CheckpointError(f"{path}: its {name} model {part} is missing or changed; write the fusion again")
        models[name] = load_model(part)
    if not isinstance(models["scene"], SceneSegmenter):
        raise CheckpointError(f"{path}: its scene part is a {type(models['scene']).__name__}, not a scene model")
    other = models["other"]
    if config.get("other_random_seed") is not None:
        other = random_init_like(other, seed=int(config["other_random_seed"]))
    return FusedSegmenter(models["scene"], other.eval()).eval()


MODELS[KIND] = load_fused
