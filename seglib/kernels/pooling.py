"""Means over windows and blocks of image-like maps (B, C, H, W): the PyTorch pool (the
training formulation, one op with its backward) beside faster formulations of the same means
for maps without gradient (separable sums, halving), which round differently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import inference_numerics

__all__ = ["box_mean", "cell_means", "mean_pool", "window_mean"]


def window_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of each channel of x (B, C, H, W) over a (2r+1)^2 window, divided by the number of
    in-image pixels at the borders: ``box_mean`` under ``inference_numerics``, else the 2D pool."""
    if inference_numerics():
        return box_mean(x, radius)
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


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
