"""Small building blocks shared by the teacher, the student and the decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "norm_layer",
    "ConvNormAct",
    "ResidualBlock",
    "NORMS",
    "INPUT_MODES",
    "standardize",
    "box_mean",
    "mean_pool",
    "cell_means",
    "inference_numerics",
    "reference_ops",
    "use_reference_ops",
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
    """A fixed affine normalisation of RGB in [0, 1]. Deliberately not per-image statistics:
    those would make a window's features depend on what else is in the window, and windows
    of a large raster must agree with the whole image (docs/inference.md)."""
    return (rgb - 0.5) / 0.25


def inference_numerics() -> bool:
    """Whether the faster formulations of a few steps are used: box means as separable sums,
    squared distances as |a|^2 + |b|^2 - 2ab, a written-out normalisation, the guided filter's
    output as multiply-adds. They compute the same quantities with different rounding (about a
    quarter of a student's CPU time). Always without gradient (inference, evaluation, a frozen
    teacher), and in training too unless ``reference_ops()`` asks for the original training
    formulations, the yardstick of the fused training step (docs/performance.md)."""
    return not torch.is_grad_enabled() or not use_reference_ops()


_REFERENCE_OPS = [False]  # a list so the context manager can flip it in place


def use_reference_ops() -> bool:
    """Whether the training step runs the plain eager formulations (one small op per denoising
    offset, per k-means step, per sample) instead of the fused ones. The fused formulations
    compute the same quantities with far fewer operator calls (docs/performance.md); the
    reference ones stay as the yardstick that tests compare them against."""
    return _REFERENCE_OPS[0]


@contextlib.contextmanager
def reference_ops(enabled: bool = True) -> Iterator[None]:
    """Context manager: run the reference formulations inside (``use_reference_ops``)."""
    before = _REFERENCE_OPS[0]
    _REFERENCE_OPS[0] = enabled
    try:
        yield
    finally:
        _REFERENCE_OPS[0] = before


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of each channel of x (B, C, H, W) over a (2r+1)^2 window, divided by the number of
    in-image pixels at the borders, as a row pool then a column pool: the in-image count of a
    2D window is the product of the two 1D counts, so this is ``avg_pool2d(x, 2r+1, 1, r,
    count_include_pad=False)`` rounded differently, and faster on CPU."""
    k = 2 * radius + 1
    if not torch.is_grad_enabled() and x.is_contiguous():
        # Channels-first without gradient (the high-pass input of every window): window sums of
        # zero-padded rows and columns (unfold views, one sum each), then the two 1D counts;
        # about 3x faster there than the pools, which are faster channels-last.
        h, w = x.shape[-2:]
        sums = F.pad(x, (radius,) * 4).unfold(3, k, 1).sum(-1).unfold(2, k, 1).sum(-1)  # (B, C, H, W)
        return sums.mul_(_inverse_counts(h, radius, x)[:, None]).mul_(_inverse_counts(w, radius, x))
    x = F.avg_pool2d(x, (1, k), stride=1, padding=(0, radius), count_include_pad=False)
    return F.avg_pool2d(x, (k, 1), stride=1, padding=(radius, 0), count_include_pad=False)


def _inverse_counts(n: int, radius: int, like: torch.Tensor) -> torch.Tensor:
    """(n,) 1 / the number of the 2r+1 window's positions inside 0..n-1, centred on each."""
    i = torch.arange(n, device=like.device)
    count = (i + radius).clamp_max(n - 1) - (i - radius).clamp_min(0) + 1
    return count.to(like.dtype).reciprocal()


def mean_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``F.avg_pool2d(x, factor)``: x (B, C, H, W) -> (B, C, H/f, W/f). Without gradient, for a
    power of two that divides H and W, by halving (sums of the strided 2 x 2 views, times 1/4):
    the same block means rounded differently, several times faster on CPU for the few-channel,
    full-resolution images the models pool (training keeps the pool: one op, its backward)."""
    h, w = x.shape[-2:]
    if torch.is_grad_enabled() or factor < 2 or factor & (factor - 1) or h % factor or w % factor:
        return F.avg_pool2d(x, factor)
    while factor > 1:
        x = x[..., 0::2, :] + x[..., 1::2, :]
        x = (x[..., 0::2] + x[..., 1::2]).mul_(0.25)
        factor //= 2
    return x


def cell_means(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)``, by ``mean_pool`` where both sides shrink by one
    integer factor (then the adaptive cells are exactly its blocks)."""
    h, w = x.shape[-2:]
    factor = h // size[0] if size[0] else 0
    if factor >= 1 and (h, w) == (factor * size[0], factor * size[1]):
        return mean_pool(x, factor) if factor > 1 else x
    return F.adaptive_avg_pool2d(x, size)


def highpass_luminance(rgb: torch.Tensor, clip: float = 0.0) -> torch.Tensor:
    """Luminance minus its local mean over 9x9 px, scaled: (B, 1, H, W). It carries texture
    but no colour and no brightness, so a network fed with it has to learn what colour cannot
    tell. ``clip`` > 0 soft-clips it so brightness steps between regions do not dominate."""
    lum = (rgb * rgb.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    local = box_mean(lum, 4) if inference_numerics() else F.avg_pool2d(lum, 9, 1, 4, count_include_pad=False)
    highpass = (lum - local) / 0.05
    return clip * torch.tanh(highpass / clip) if clip > 0 else highpass


INPUT_MODES = {"rgb": 3, "highpass": 1, "both": 4}  # name -> input channels


def encoder_input(rgb: torch.Tensor, mode: str = "rgb", clip: float = 0.0) -> torch.Tensor:
    """What a CNN of seglib reads: standardised RGB, high-pass luminance, or both."""
    if mode == "rgb":
        return standardize(rgb)
    if mode == "highpass":
        return highpass_luminance(rgb, clip)
    if mode == "both":
        return torch.cat([standardize(rgb), highpass_luminance(rgb, clip)], 1)
    raise ValueError(f"input mode must be one of {', '.join(INPUT_MODES)}, got {mode!r}")
