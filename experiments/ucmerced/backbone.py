"""A plain CNN for scene classification whose intermediate maps are the segmentation features.

Stages of 3x3 conv-BatchNorm-ReLU blocks, the first block of each stage strided: stride 2
(stem), 4, 8 and 16. ``classify`` pools the last stage and applies a linear layer (the scene
classes); ``pyramid`` returns the maps at strides 4, 8 and 16, which a segmenter upsamples
to stride 4 and clusters beside colour. The input is RGB in [0, 1], standardised inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SceneCNN", "LEVELS"]

LEVELS = {"s4": 4, "s8": 8, "s16": 16}


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _stage(cin: int, cout: int, depth: int) -> nn.Sequential:
    return nn.Sequential(_block(cin, cout, 2), *[_block(cout, cout) for _ in range(depth - 1)])


class SceneCNN(nn.Module):
    """Arguments:
      widths: channels at strides 2, 4, 8 and 16.
      depths: blocks per stage (the first strided).
      classes: scene classes of the linear head (0: no head).
    """

    def __init__(self, widths=(32, 64, 128, 256), depths=(1, 2, 2, 2), classes: int = 21):
        super().__init__()
        self.widths, self.depths = tuple(widths), tuple(depths)
        cins = (3, *widths[:-1])
        self.stages = nn.ModuleList(_stage(ci, co, d) for ci, co, d in zip(cins, widths, depths, strict=True))
        self.fc = nn.Linear(widths[-1], classes) if classes else None
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    def pyramid(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (rgb - self.mean) / self.std
        out = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                out[f"s{2 ** (i + 1)}"] = x
        return out

    def classify(self, rgb: torch.Tensor) -> torch.Tensor:
        last = self.pyramid(rgb)["s16"]
        return self.fc(F.adaptive_avg_pool2d(last, 1).flatten(1))
