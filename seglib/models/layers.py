"""Small building blocks shared by the teacher, the student and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["norm_layer", "ConvNormAct", "ResidualBlock", "NORMS", "standardize"]

NORMS = ("group", "batch", "instance", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A normalisation layer by name; GroupNorm uses groups of 8 channels (at most 8 groups)."""
    if kind == "group":
        return nn.GroupNorm(max(1, min(8, channels // 8)), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


class ConvNormAct(nn.Sequential):
    """3x3 (or k x k) conv -> norm -> ReLU."""

    def __init__(
        self, cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1, norm: str = "group"
    ):
        pad = dilation * (kernel // 2)
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=norm == "none"),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 convs (the first dilated) with an identity skip."""

    def __init__(self, channels: int, *, dilation: int = 1, norm: str = "group"):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, dilation=dilation, norm=norm)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=norm == "none")
        self.norm2 = norm_layer(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(self.conv1(x))))


def standardize(rgb: torch.Tensor) -> torch.Tensor:
    """Remove each image's mean colour and scale to unit-ish range: global brightness and tint
    shifts between views then cost the network nothing to ignore."""
    return (rgb - rgb.mean(dim=(2, 3), keepdim=True)) / 0.25
