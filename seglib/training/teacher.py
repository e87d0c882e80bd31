"""Teacher stage: one training step over two augmented views.

Every batch draws its knobs afresh (K from ``randomize.ks``; downsample, cluster and smoothing
iterations and refinement lane from the ranges below), keyed by (seed, step), so one model
serves every setting a user may pick at inference and a resumed run draws the same knobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from ..augment import ViewTransform, make_views_batched
from ..checkpoint import model_checkpoint, save_atomic
from ..config import LANES, Config
from ..data.batches import step_generator
from ..losses.teacher import TeacherLoss
from ..models.teacher import MonolithicSegmenter
from .loop import StepOutput

__all__ = ["Knobs", "draw_knobs", "TeacherTask", "DOWNSAMPLES", "CLUSTER_ITERS", "SMOOTH_ITERS"]

_KNOBS, _AUGMENT = 11, 7  # purposes of the random streams
DOWNSAMPLES = (1, 2)  # the model.downsample values a user may pick
CLUSTER_ITERS = (3, 8)  # soft k-means iterations, inclusive range
SMOOTH_ITERS = (0, 2)  # guided-filter passes of the fast lane, inclusive range


@dataclass(frozen=True)
class Knobs:
    k: int
    downsample: int
    iters: int
    smooth_iters: int
    lane: str


def draw_knobs(ks: tuple[int, ...], seed: int, index: int, downsamples: tuple[int, ...] = DOWNSAMPLES) -> Knobs:
    """The per-batch knobs of micro-batch ``index`` (identical on every rank)."""
    rng = np.random.default_rng([int(seed), _KNOBS, int(index)])
    return Knobs(
        k=int(rng.choice(ks)),
        downsample=int(rng.choice(downsamples)),
        iters=int(rng.integers(CLUSTER_ITERS[0], CLUSTER_ITERS[1] + 1)),
        smooth_iters=int(rng.integers(SMOOTH_ITERS[0], SMOOTH_ITERS[1] + 1)),
        lane=str(rng.choice(LANES)),
    )


class TeacherTask:
    """Trains ``MonolithicSegmenter`` with ``TeacherLoss`` on view pairs.

    Arguments:
      cfg: the full config.
      device: where the model lives.
    """

    kind = "teacher"
    downsamples = DOWNSAMPLES  # the downsample knob's choices (a research stage may narrow them)

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.loss = TeacherLoss(cfg.loss)
        self.model = MonolithicSegmenter(cfg.model).to(device)

    @property
    def inference_model(self) -> MonolithicSegmenter:
        return self.model

    def step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], index: int, knobs: Knobs | None = None
    ) -> StepOutput:
        """Losses of micro-batch ``index``; ``knobs`` fixes the per-batch knobs (benchmarks)."""
        cfg = self.cfg
        knobs = knobs or draw_knobs(cfg.randomize.ks, cfg.train.seed, index, self.downsamples)
        rgb = batch["rgb"].to(self.device, non_blocking=True)  # (B, 3, S, S)
        b = rgb.shape[0]
        # The global batch's augmentation numbers come from one generator keyed by the
        # micro-batch; this rank keeps its rows (DDP trains like one process).
        gen = step_generator(cfg.train.seed, _AUGMENT, index, self.device)
        rows = slice(dist.rank() * b, (dist.rank() + 1) * b)
        views, transform = make_views_batched(rgb, cfg.augment, gen, rows=rows, total=dist.world_size() * b)
        out, terms = self.losses(model, views, transform, knobs)
        probs = out.get("probs", out["probs_coarse"])[:b].detach()  # TensorBoard upsamples if needed
        scalars = {
            "diag/k": float(knobs.k),
            # A tensor: the loop reads it when it logs, not inside the step.
            "diag/feature_std": out["features"].detach().float().std(dim=(0, 2, 3)).mean(),
        }
        return StepOutput(terms=terms, n_images=b, rgb=views[:b], probs=probs, scalars=scalars)

    def losses(
        self, model: torch.nn.Module, views: torch.Tensor, transform: ViewTransform, knobs: Knobs
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The forward pass over ``views`` (2B, 3, S, S: view A then view B, image i paired with
        i + B) with the batch's knobs, and the loss terms of it."""
        out = model(
            views,
            knobs.k,
            lane=knobs.lane,
            downsample=knobs.downsample,
            iters=knobs.iters,
            smooth_iters=knobs.smooth_iters,
            group=2,
            # The fast and none lanes are parameter-free and no loss reads their full-resolution
            # output; the learned lane's loss reads its output at its working resolution.
            full_resolution=False,
            check_values=False,  # the views are clamped to [0, 1]; the check would be a sync
        )
        return out, self.loss(out, views, transform, lane=knobs.lane)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(self, directory: Path) -> None:
        """Write ``teacher.pt``: the weights and config, all inference needs."""
        save_atomic(
            model_checkpoint("teacher", self.cfg.to_dict(), self.model.state_dict()), Path(directory) / "teacher.pt"
        )
