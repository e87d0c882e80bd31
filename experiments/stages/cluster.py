"""The research stage ``cluster``: train a segmenter's features on real imagery by dataset-level
clustering (registered as ``stage: cluster``; its settings are ``ClusterOptions``, given as
``stage_options``).

Each step renders two views of every crop (``seglib.augment.make_views``: view A photometric
only, view B also flipped / rotated / cropped), computes the segmenter's learned features for
both, scores every position against C shared prototypes (cosine similarity / temperature) and
applies ``cluster_losses.swapped_prediction``: each view predicts the other view's
Sinkhorn-balanced codes, warped exactly into its frame. With ``iic`` > 0, IIC heads (their own
prototype sets, a main one and over-clustering ones) are trained by
``cluster_losses.mutual_information`` on the same view pairs.

The trained module is any seglib segmenter (``arch``: the student of ``student.*`` or the
teacher of ``model.*``); inference does not use the prototypes: the segmenter's own head
clusters its (now trained) features with the colour channels, per image, at any K. ``export``
writes ``student.pt`` or ``teacher.pt`` like the other stages, so everything that loads a model
loads this one, and ``cluster_prototypes.pt`` beside it.

Under the leave-one-tile-out protocol neither objective beat the shipped recipe (the lab log,
"Leave-one-tile-out" and "IIC"): kept here so that the study can be reproduced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seglib.augment import make_views
from seglib.checkpoint import FORMAT, save_atomic
from seglib.config import Config, ConfigError
from seglib.data.batches import sample_rngs
from seglib.models.student import StudentModelConfig, StudentSegmenter
from seglib.models.teacher import MonolithicSegmenter
from seglib.training.loop import StepOutput
from seglib.training.stages import Stage, register_stage

from .cluster_losses import assignment_stats, colour_statistics, mutual_information, swapped_prediction
from .init_from import start_from

__all__ = ["ClusterOptions", "ClusterModule", "ClusterTask", "build_segmenter"]

_AUGMENT = 31  # purpose of the per-sample random streams


@dataclass
class ClusterOptions:
    """The settings of stage ``cluster`` (``stage_options``)."""

    arch: str = "student"  # which segmenter is trained: student (config student.*) | teacher (model.*)
    prototypes: int = 32  # C, shared by every image; several times the classes one expects
    temperature: float = 0.1  # softmax temperature of the cosine similarity to the prototypes
    sinkhorn_eps: float = 0.05  # entropic regularisation of the balanced codes
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp normalisations of the codes
    window: int = 0  # codes averaged over (2w+1)^2 cells before they become targets
    freeze_prototypes: int = 0  # steps at the start during which the prototypes do not move
    swap: float = 1.0  # weight of the swapped-prediction loss
    # Cross-channel prediction (split-brain style): a 1x1 head on the learned features predicts
    # the mean and spread of the colour around each position from luminance texture.
    colourize: float = 0.0  # weight of that L1 loss (0: off)
    colour_radii: tuple[int, ...] = (1, 3)  # window radii (cells) of those colour statistics
    # IIC (Ji et al. 2019): heads of these many clusters (a main one and over-clustering ones),
    # each trained to maximise the mutual information of the two views' assignments.
    iic: float = 0.0  # weight of the summed IIC losses (0: off)
    iic_heads: tuple[int, ...] = (6, 24)  # clusters of each IIC head (prototypes on the unit sphere)
    iic_window: int = 2  # displacements up to this many cells pair positions of the two views
    iic_lamb: float = 1.0  # weight of the marginals' entropy in IIC's loss (1: the mutual information)
    init_from: str = ""  # a segmenter (teacher.pt / student.pt) whose weights start the run; "": random

    def check(self) -> ClusterOptions:
        if self.arch not in ("student", "teacher"):
            raise ConfigError(f"stage_options.arch must be 'student' or 'teacher', got {self.arch!r}")
        if not (self.swap > 0 or self.colourize > 0 or self.iic > 0):
            raise ConfigError("stage cluster needs swap, colourize or iic above 0 in stage_options (a loss)")
        if self.iic > 0 and not (self.iic_heads and all(n >= 2 for n in self.iic_heads)):
            raise ConfigError(f"stage_options.iic_heads: every IIC head needs 2 or more clusters, got {self.iic_heads}")
        return self


def build_segmenter(cfg: Config, arch: str) -> nn.Module:
    """The segmenter ``arch`` names, built from ``cfg`` (random weights)."""
    if arch == "student":
        return StudentSegmenter(StudentModelConfig.from_config(cfg))
    return MonolithicSegmenter(cfg.model)


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
      options: the stage's settings.
    """

    kind = "cluster"

    def __init__(self, cfg: Config, device: torch.device, options: ClusterOptions):
        self.cfg, self.device, self.options = cfg, device, options.check()
        segmenter = build_segmenter(cfg, options.arch)
        dim = cfg.model.encoder.embed_dim
        outputs = 6 * len(options.colour_radii) if options.colourize > 0 else 0
        heads = tuple(options.iic_heads) if options.iic > 0 else ()
        self.model = ClusterModule(
            segmenter, prototypes=options.prototypes, dim=dim, colour_outputs=outputs, iic_heads=heads
        ).to(device)
        if options.init_from:
            start_from(self.model.segmenter, options.init_from)

    @property
    def inference_model(self) -> nn.Module:
        """The segmenter being trained (what the quality probe scores)."""
        return self.model.segmenter

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], index: int) -> StepOutput:
        cfg, c = self.cfg, self.options
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
        kind = "student" if self.options.arch == "student" else "teacher"
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


register_stage(
    Stage(
        "cluster",
        lambda cfg, device, options: ClusterTask(cfg, device, options),
        options=ClusterOptions,
        about="research: dataset-level clustering (swapped prediction, IIC) on real imagery",
    )
)
