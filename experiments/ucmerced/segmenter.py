"""A segmenter whose learned features are a ``SceneCNN``'s maps, clustered by the bundled head.

``SceneSegmenter(cnn, levels={"s8": 1.0})``: the maps of ``levels`` are upsampled to stride 4
of the (downsampled) input, each unit-normalised per position and scaled by the square root
of its weight, and concatenated; the base class then unit-normalises that and appends the
weighted colour channels, exactly as for the bundled student. The head, refinement lane and
downsample are the bundled student's (its checkpoint's config) unless overridden.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seglib.config import HeadConfig, RefineConfig
from seglib.models.segmenter import Segmenter

from backbone import SceneCNN

__all__ = ["SceneSegmenter", "SceneSegConfig", "bundled_head", "calibrate_bn"]


@dataclass
class SceneSegConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    downsample: int = 2
    colour_weight: float = 3.0
    levels: dict = field(default_factory=lambda: {"s8": 1.0})


def bundled_head() -> SceneSegConfig:
    """The bundled student's head, lane, downsample and colour weight."""
    from seglib.models import load_model

    student = load_model()
    cfg = student.config
    return SceneSegConfig(
        head=copy.deepcopy(cfg.head),
        refine=copy.deepcopy(cfg.refine),
        downsample=cfg.downsample,
        colour_weight=student.colour_weight,
    )


class SceneSegmenter(Segmenter):
    input_multiple = 16

    def __init__(self, cnn: SceneCNN, config: SceneSegConfig | None = None):
        super().__init__()
        self.config = config or SceneSegConfig()
        self.cnn = cnn
        self.init_head(self.config.head, self.config.refine, colour_weight=self.config.colour_weight, colour_blur=0)

    def with_settings(self, **changes) -> SceneSegmenter:
        """A copy sharing the CNN, with other head settings (``levels``, ``colour_weight``,
        ``downsample``, or head fields such as ``size_prior``)."""
        cfg = copy.deepcopy(self.config)
        head_fields = {f.name for f in dataclasses.fields(HeadConfig)}
        for key, value in changes.items():
            if key in head_fields:
                setattr(cfg.head, key, value)
            else:
                setattr(cfg, key, value)
        return SceneSegmenter(self.cnn, cfg).eval()

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        maps = self.cnn.pyramid(rgb)
        size = (rgb.shape[-2] // 4, rgb.shape[-1] // 4)
        parts = []
        for level, weight in self.config.levels.items():
            if level == "cls":  # the scene classifier applied at every stride-16 cell: class posteriors
                logits = torch.einsum("bchw,kc->bkhw", maps["s16"].float(), self.cnn.fc.weight) + self.cnn.fc.bias[:, None, None]
                x = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1).sqrt()
                parts.append(x * weight**0.5)  # the square root of a distribution is unit-norm
                continue
            x = maps[level].float()
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            parts.append(F.normalize(x, dim=1) * weight**0.5)
        return torch.cat(parts, 1)


@torch.no_grad()
def calibrate_bn(cnn: SceneCNN, batches) -> SceneCNN:
    """BatchNorm running statistics re-estimated on ``batches`` (cumulative average), eval mode."""
    for m in cnn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    cnn.train()
    for x in batches:
        cnn.pyramid(x)
    return cnn.eval()
