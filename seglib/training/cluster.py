"""Stage "cluster": train a segmenter's features on real imagery by dataset-level clustering.

Each step renders two views of every crop (``seglib.augment.make_views``: view A photometric
only, view B also flipped / rotated / cropped), computes the segmenter's learned features for
both, scores every position against C shared prototypes (cosine similarity / temperature) and
applies ``seglib.losses.cluster.swapped_prediction``: each view predicts the other view's
Sinkhorn-balanced codes, warped exactly into its frame. With ``cluster.iic`` > 0, IIC heads
(their own prototype sets, a main one and over-clustering ones) are trained by
``seglib.losses.cluster.mutual_information`` on the same view pairs.

The trained module is any seglib segmenter (``cluster.arch``: the student CNN of
``student.*`` or the teacher encoder of ``model.*``); inference does not use the prototypes:
the segmenter's own head clusters its (now trained) features with the colour channels, per
image, at any K. ``export`` writes ``student.pt`` or ``teacher.pt`` like the other stages, so
everything that loads a model loads this one, and ``cluster_prototypes.pt`` beside it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import make_views
from ..checkpoint import FORMAT, save_atomic
from ..config import Config
from ..data.batches import sample_rngs
from ..losses.cluster import assignment_stats, colour_statistics, mutual_information, swapped_prediction
from ..models.student import StudentModelConfig, StudentSegmenter
from ..models.teacher import MonolithicSegmenter
from .loop import StepOutput

__all__ = ["ClusterModule", "ClusterTask", "build_segmenter"]

_AUGMENT = 31  # purpose of the per-sample random streams


def build_segmenter(cfg: Config) -> nn.Module:
    """The segmenter ``cluster.arch`` names, built from ``cfg`` (random weights)."""
    if cfg.cluster.arch == "student":
        return StudentSegmenter(StudentModelConfig.from_config(cfg))
    if cfg.cluster.arch == "teacher":
        return MonolithicSegmenter(cfg.model)
    raise ValueError(f"cluster.arch must be 'student' or 'teacher', got {cfg.cluster.arch!r}")


class ClusterModule(nn.Module):
    """A segmenter and C prototypes in its learned feature space.

    Arguments:
      segmenter: a ``Segmenter`` whose ``features`` are trained.
      prototypes: C.
      dim: width of the learned features.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        *,
        prototypes: int,
        dim: int,
        colour_outputs: int = 0,
        iic_heads: tuple[int, ...] = (),
    ):
        super().__init__()
        self.segmenter = segmenter
        self.prototypes = nn.Parameter(torch.randn(prototypes, dim))
        # Training only: predicts region colour statistics from the learned features.
        self.colour_head = nn.Conv2d(dim, colour_outputs, 1) if colour_outputs else None
        # Training only: IIC's cluster heads, prototypes like the swap's own.
        self.iic_heads = nn.ParameterList([nn.Parameter(torch.randn(c, dim)) for c in iic_heads])

    def forward(self, rgb: torch.Tensor, *, temperature: float, freeze: bool = False) -> dict[str, torch.Tensor]:
        """{"features": (B, F, h, w), "logits": (B, C, h, w), "iic<i>": (B, C_i, h, w) per IIC
        head} for rgb (B, 3, H, W)."""
        features = self.segmenter.features(rgb).float()  # (B, F, h, w)
        unit = F.normalize(features, dim=1)

        def cosine_logits(protos: torch.Tensor) -> torch.Tensor:  # (C, F) -> (B, C, h, w)
            return torch.einsum("bfhw,cf->bchw", unit, F.normalize(protos, dim=1)) / temperature

        out = {"features": features, "logits": cosine_logits(self.prototypes.detach() if freeze else self.prototypes)}
        for i, head in enumerate(self.iic_heads):
            out[f"iic{i}"] = cosine_logits(head)
        if self.colour_head is not None:
            out["colour"] = self.colour_head(features)  # (B, 6 * radii, h, w)
        return out


class ClusterTask:
    """Trains ``ClusterModule`` with the swapped-prediction loss on view pairs.

    Arguments:
      cfg: the full config (stage "cluster").
      device: where the model lives.
    """

    kind = "cluster"

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        segmenter = build_segmenter(cfg)
        dim = cfg.model.encoder.embed_dim
        outputs = 6 * len(cfg.cluster.colour_radii) if cfg.cluster.colourize > 0 else 0
        heads = tuple(cfg.cluster.iic_heads) if cfg.cluster.iic > 0 else ()
        self.model = ClusterModule(
            segmenter, prototypes=cfg.cluster.prototypes, dim=dim, colour_outputs=outputs, iic_heads=heads
        ).to(device)

    @property
    def inference_model(self) -> nn.Module:
        """The segmenter being trained (what the quality probe scores)."""
        return self.model.segmenter

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], index: int) -> StepOutput:
        cfg, c = self.cfg, self.cfg.cluster
        rgb = batch["rgb"].to(self.device, non_blocking=True)  # (B, 3, S, S)
        rngs = sample_rngs(cfg.train.seed, batch["index"].tolist(), _AUGMENT)
        view_a, view_b, transform = make_views(rgb, rngs, cfg.augment)
        b = rgb.shape[0]
        out = model(torch.cat([view_a, view_b]), temperature=c.temperature, freeze=index < c.freeze_prototypes)
        logits_a, logits_b = out["logits"][:b], out["logits"][b:]  # (B, C, h, w) each
        terms = {}
        if c.swap > 0:
            terms["swap"] = swapped_prediction(
                logits_a, logits_b, transform, eps=c.sinkhorn_eps, iters=c.sinkhorn_iters, window=c.window
            )
        if c.colourize > 0:
            # Targets from the crops before photometric jitter (view B: the same warp, no jitter).
            size = logits_a.shape[-2:]
            target = torch.cat(
                [
                    colour_statistics(rgb, size, c.colour_radii),
                    colour_statistics(transform.to_view(rgb), size, c.colour_radii),
                ]
            )
            terms["colourize"] = F.l1_loss(out["colour"].float(), target)
        if c.iic > 0:
            # The heads' losses summed (IIC alternates them; one sum per step costs one pass).
            terms["iic"] = sum(
                mutual_information(
                    out[f"iic{i}"][:b], out[f"iic{i}"][b:], transform, window=c.iic_window, lamb=c.iic_lamb
                )
                for i in range(len(c.iic_heads))
            )
        terms["total"] = (
            c.swap * terms.get("swap", 0.0) + c.colourize * terms.get("colourize", 0.0) + c.iic * terms.get("iic", 0.0)
        )
        # Diagnostics of the assignment being trained: IIC's main head when there is no swap.
        shown = (out["iic0"][:b] if c.swap <= 0 and c.iic > 0 else logits_a).detach()
        stats = assignment_stats(shown)
        scalars = {f"diag/{k}": v for k, v in stats.items()}
        scalars["diag/feature_std"] = float(out["features"].detach().std(dim=(0, 2, 3)).mean())
        # TensorBoard's palette has 16 colours: show the winning prototype, modulo 16.
        winner = F.one_hot(shown.argmax(1) % 16, 16).permute(0, 3, 1, 2).float()  # (B, 16, h, w)
        return StepOutput(terms=terms, n_images=b, rgb=view_a, probs=winner, scalars=scalars)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(self, directory: Path) -> None:
        """``student.pt`` or ``teacher.pt`` (the segmenter and the config, what inference
        needs) and ``cluster_prototypes.pt`` (the swap's prototypes and the IIC heads')."""
        directory = Path(directory)
        kind = "student" if self.cfg.cluster.arch == "student" else "teacher"
        cfg = copy.deepcopy(self.cfg)
        save_atomic(
            {
                "format": FORMAT,
                "kind": kind,
                "config": cfg.to_dict(),
                "model": self.model.segmenter.state_dict(),
            },
            directory / f"{kind}.pt",
        )
        save_atomic(
            {
                "format": FORMAT,
                "kind": "cluster-prototypes",
                "config": cfg.to_dict(),
                "model": {
                    "prototypes": self.model.prototypes.detach(),
                    **{f"iic_head{i}": head.detach() for i, head in enumerate(self.model.iic_heads)},
                },
            },
            directory / "cluster_prototypes.pt",
        )
