"""Small building blocks shared by the teacher, the student and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.pooling import window_mean

__all__ = [
    "norm_layer",
    "conv_norm_act",
    "ResidualBlock",
    "NORMS",
    "INPUT_MODES",
    "standardize",
    "highpass_luminance",
    "encoder_input",
]

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


def conv_norm_act(
    cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1, norm: str = "group"
) -> nn.Sequential:
    """3x3 (or k x k) conv -> norm -> ReLU, as a plain ``nn.Sequential`` (parameters ``0.*``, ``1.*``)."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=norm == "none"),
        norm_layer(norm, cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convs (the first dilated) with an identity skip."""

    def __init__(self, channels: int, *, dilation: int = 1, norm: str = "group"):
        super().__init__()
        self.conv1 = conv_norm_act(channels, channels, dilation=dilation, norm=norm)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=norm == "none")
        self.norm2 = norm_layer(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(self.conv1(x))))


def standardize(rgb: torch.Tensor) -> torch.Tensor:
    """A fixed affine normalisation of RGB in [0, 1]. Deliberately not per-image statistics:
    those would make a window's features depend on what else is in the window, and windows
    of a large raster must agree with the whole image (docs/inference.md)."""
    return (rgb - 0.5) / 0.25


HIGHPASS_CLIP = 2.0  # the soft clip of the networks' high-pass input (docs/design.md)


def highpass_luminance(rgb: torch.Tensor, clip: float = 0.0) -> torch.Tensor:
    """Luminance minus its local mean over 9x9 px, scaled: (B, 1, H, W). It carries texture
    but no colour and no brightness, so a network fed with it has to learn what colour cannot
    tell. ``clip`` > 0 soft-clips it so brightness steps between regions do not dominate."""
    lum = (rgb * rgb.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    local = window_mean(lum, 4)
    highpass = (lum - local) / 0.05
    return clip * torch.tanh(highpass / clip) if clip > 0 else highpass


INPUT_MODES = {"rgb": 3, "highpass": 1, "both": 4}  # name -> input channels


def encoder_input(rgb: torch.Tensor, mode: str = "highpass") -> torch.Tensor:
    """What a CNN of seglib reads: high-pass luminance (soft-clipped at ``HIGHPASS_CLIP``),
    standardised RGB, or both."""
    if mode == "rgb":
        return standardize(rgb)
    if mode == "highpass":
        return highpass_luminance(rgb, HIGHPASS_CLIP)
    if mode == "both":
        return torch.cat([standardize(rgb), highpass_luminance(rgb, HIGHPASS_CLIP)], 1)
    raise ValueError(f"input mode must be one of {', '.join(INPUT_MODES)}, got {mode!r}")
