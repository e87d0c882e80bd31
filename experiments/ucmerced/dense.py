"""A dense head learned on a frozen scene model: feature correspondences distilled into a projection.

The scene model's maps know scene classes, but the per-image k-means on them beside colour is still
decided by colour. Following STEGO (Hamilton et al., "Unsupervised Semantic Segmentation by
Distilling Feature Correspondences", ICLR 2022), a small projection ``g`` (1x1 convolutions: a linear
map plus a ReLU branch) is trained on the frozen maps ``f`` so that where two positions' maps are
more alike than usual their projections agree, and where less, they do not:

    loss = - mean over position pairs of (corr(f_a, f_b) - shift) * max(corr(g_a, g_b), 0)

over three kinds of crop pairs (a crop with itself, with its nearest neighbour in the batch by
pooled maps, and with a random other crop); ``shift`` is the pair kind's mean map correlation in the
batch plus a margin (``SHIFT``), so that the random pairs are pushed apart more than the crop with
itself. Only UC Merced crops are read (drawn as the scene pretraining draws them, never its
held-out fold); no Dubai image and no label of any kind.

``ProjectedSegmenter`` (checkpoint kind ``scene_projected``) clusters the projection's output
(``mix`` > 0 adds the scene maps themselves, with that weight) beside colour under the scene model's
head. Its checkpoint holds the projection's weights and names the scene model file by a path
relative to it and its content hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seglib.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic
from seglib.data.scenes import SceneFolder, random_crops
from seglib.models import MODELS, load_model
from seglib.models.scene import SceneSegmenter
from seglib.models.segmenter import Segmenter

__all__ = ["KIND", "DenseConfig", "Projection", "ProjectedSegmenter", "train_projection", "load_projected"]

KIND = "scene_projected"
# pair kinds: (loss weight, margin added to the batch's mean correlation of that kind)
SHIFT = {"self": (1.0, 0.0), "knn": (1.0, 0.0), "random": (1.0, 0.1)}


@dataclass
class DenseConfig:
    steps: int = 600
    batch: int = 32
    size: int = 128  # crop side (the scene model reads it as is: stride-4 maps of 32 x 32)
    zoom: tuple[float, float] = (0.375, 1.0)  # as the scene pretraining draws crops
    samples: int = 256  # positions sampled per crop for the correlations
    dim: int = 64  # projection output channels
    lr: float = 1e-3
    seed: int = 0
    holdout: int = 0  # the probe's fold, never read

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Projection(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear = nn.Conv2d(cin, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.ReLU(), nn.Conv2d(cin, dim, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f) + self.nonlinear(f)


class ProjectedSegmenter(Segmenter):
    """Arguments: scene: the frozen ``SceneSegmenter`` (head, lanes, colour weight, downsample);
    projection: a ``Projection`` of its ``features``; mix: weight of the scene maps kept beside
    the projection (0: the projection alone)."""

    def __init__(self, scene: SceneSegmenter, projection: Projection, *, mix: float = 0.0):
        super().__init__()
        self.scene, self.projection, self.mix = scene, projection, float(mix)
        self.config = scene.config
        self.input_multiple = scene.input_multiple
        self.init_head(scene.config.head, colour_weight=scene.colour_weight)

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        f = self.scene.features(rgb)
        parts = [F.normalize(self.projection(f), dim=1)]
        if self.mix > 0:
            parts.append(F.normalize(f, dim=1) * self.mix**0.5)
        return torch.cat(parts, 1)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every position of a (B, C, N) with every one of b: (B, N, N)."""
    return torch.einsum("bcn,bcm->bnm", F.normalize(a, dim=1), F.normalize(b, dim=1))


def stego_loss(f: torch.Tensor, g: torch.Tensor, partner: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """f (B, C, N) frozen maps and g (B, D, N) projections at sampled positions; ``partner``: for
    each pair kind, the batch index each crop is paired with."""
    total, parts = g.new_zeros(()), {}
    for kind, index in partner.items():
        weight, margin = SHIFT[kind]
        fc = _corr(f, f[index]).detach()
        shift = fc.mean() + margin
        loss = -((fc - shift) * _corr(g, g[index]).clamp_min(0)).mean()
        total = total + weight * loss
        parts[kind] = round(float(loss.detach()), 5)
    return total, parts


def train_projection(scene_path: str | Path, scenes: SceneFolder, out: str | Path, cfg: DenseConfig, log=print) -> Path:
    """Train the projection on ``scenes`` (outside fold ``cfg.holdout``) on the frozen scene model
    of ``scene_path``; writes the ``scene_projected`` checkpoint ``out`` and returns it."""
    scene = load_model(scene_path)
    if not isinstance(scene, SceneSegmenter):
        raise CheckpointError(f"{scene_path} is not a scene model")
    scene.eval().requires_grad_(False)
    train = scenes.without_fold(cfg.holdout)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        cin = scene.features(torch.zeros(1, 3, 32, 32)).shape[1]
    projection = Projection(cin, cfg.dim)
    opt = torch.optim.AdamW(projection.parameters(), lr=cfg.lr, weight_decay=0.01)
    tic, history = time.perf_counter(), []
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, 29, step])
        idx = rng.choice(len(train), cfg.batch, replace=False)
        x, _ = random_crops([train.images[i] for i in idx], rng, size=cfg.size, zoom=cfg.zoom)
        with torch.no_grad():
            f = scene.features(x)  # (B, C, h, w)
            flat = f.flatten(2)
            pick = torch.from_numpy(rng.choice(flat.shape[-1], cfg.samples, replace=False))
            pooled = F.normalize(flat.mean(-1), dim=1)
            sim = pooled @ pooled.T
            sim.fill_diagonal_(-2)
            partner = {
                "self": torch.arange(cfg.batch),
                "knn": sim.argmax(1),
                "random": torch.from_numpy((np.arange(cfg.batch) + rng.integers(1, cfg.batch)) % cfg.batch),
            }
        g = projection(f).flatten(2)[..., pick]
        loss, parts = stego_loss(flat[..., pick], g, partner)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append(
                {"step": step, "loss": float(loss.detach()), **parts, "seconds": round(time.perf_counter() - tic, 1)}
            )
            log(f"[dense] step {step} loss {float(loss.detach()):.4f} {parts} ({time.perf_counter() - tic:.0f} s)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "kind": KIND,
        "config": {
            "scene": {
                "path": os.path.relpath(Path(scene_path).resolve(), out.resolve().parent),
                "sha256": _sha(scene_path),
            },
            "dense": cfg.to_dict(),
            "cin": cin,
        },
        "model": projection.state_dict(),
        "history": history,
        "train_seconds": round(time.perf_counter() - tic, 1),
    }
    return save_atomic(state, out)


def load_projected(path: str | Path) -> ProjectedSegmenter:
    """The ``ProjectedSegmenter`` a ``scene_projected`` checkpoint describes (CPU, eval mode)."""
    state = load_checkpoint(path, kind=KIND)
    config = state["config"]
    part = Path(path).resolve().parent / config["scene"]["path"]
    if not part.is_file() or _sha(part) != config["scene"]["sha256"]:
        raise CheckpointError(f"{path}: its scene model {part} is missing or changed; train the projection again")
    projection = Projection(config["cin"], config["dense"]["dim"])
    projection.load_state_dict(state["model"])
    return ProjectedSegmenter(load_model(part), projection).eval()


MODELS[KIND] = load_projected
