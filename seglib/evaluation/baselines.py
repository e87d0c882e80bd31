"""Label-free baselines every model evaluation is reported beside.

``rgb_kmeans`` is the QGIS plugin's free mode: k-means on the RGB values of the pixels, at full
resolution. Hard k-means here is plain Lloyd with k-means++ seeding, fitted on a pixel sample
and then assigned to every pixel, seeded so a run is repeatable. ``shared_rgb_kmeans`` fits one
set of colour centres on pixels sampled from every image of a set (one legend for all, the
baseline of shared clusters).

``block_kmeans`` is the predecessor QGIS plugin's own k-means pipeline as we understand it (the
Quant Civil "QGIS Map Segmentation" plugin's K-Means mode; reimplemented here, not copied): a
3 x 3 box smoothing of the RGB values, their means over 4 x 4 pixel blocks, k-means on a sample
of those block means, every block assigned to its nearest centre, and the block labels
repeated back to full resolution. ``block_features`` is its feature step, shared with the
streaming version over a raster (``seglib.evaluation.raster_bench``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "kmeans",
    "rgb_kmeans",
    "shared_rgb_kmeans",
    "block_features",
    "block_kmeans",
    "BLOCK",
    "BLOCK_SMOOTH",
    "BLOCK_SAMPLE",
]

BLOCK = 4  # the predecessor's block side in pixels
BLOCK_SMOOTH = 3  # its box smoothing before the block means
BLOCK_SAMPLE = 20_000  # block means its k-means is fitted on, at most


def kmeans(
    x: torch.Tensor, k: int, *, iters: int = 30, seed: int = 0, sample: int = 50_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard k-means of points ``x`` (N, D): returns (labels (N,), centres (K, D)).

    Fitting uses at most ``sample`` random points; all points are assigned at the end.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    n = x.shape[0]
    fit = x[torch.randperm(n, generator=gen)[:sample].to(x.device)] if n > sample else x
    centres = _kmeanspp(fit, k, gen)
    for _ in range(iters):
        assign = _nearest(fit, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, fit)
        counts = torch.bincount(assign, minlength=k).to(fit.dtype)
        empty = counts == 0
        # An empty cluster keeps its old centre rather than becoming NaN.
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
    return _nearest(x, centres), centres


def _nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin.
    return (centres.pow(2).sum(1)[None] - 2 * x @ centres.T).argmin(1)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: repeat one
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=gen))
        centres.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    return torch.stack(centres)


def rgb_kmeans(rgb: np.ndarray | torch.Tensor, k: int, *, seed: int = 0) -> np.ndarray:
    """K-means on RGB pixel values of one image (H, W, 3) -> labels (H, W) int64."""
    rgb_t = torch.as_tensor(np.asarray(rgb, dtype=np.float32))
    h, w, _ = rgb_t.shape
    labels, _ = kmeans(rgb_t.reshape(-1, 3), k, seed=seed)
    return labels.reshape(h, w).numpy()


def shared_rgb_kmeans(
    images: list[np.ndarray], k: int, *, seed: int = 0, per_image: int = 4096
) -> tuple[list[np.ndarray], np.ndarray]:
    """K-means on RGB pixels sampled from every image (``per_image`` each, seeded), then every
    pixel of every image assigned to those centres: (labels (H, W) int64 per image, centres (K, 3))."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sample = []
    for rgb in images:
        flat = torch.as_tensor(np.asarray(rgb, dtype=np.float32)).reshape(-1, 3)  # (N, 3)
        pick = torch.randperm(flat.shape[0], generator=gen)[:per_image]
        sample.append(flat[pick])
    points = torch.cat(sample)
    _, centres = kmeans(points, k, seed=seed, sample=points.shape[0])
    labels = [
        _nearest(torch.as_tensor(np.asarray(rgb, dtype=np.float32)).reshape(-1, 3), centres)
        .reshape(rgb.shape[:2])
        .numpy()
        for rgb in images
    ]
    return labels, centres


def block_features(rgb: torch.Tensor, *, block: int = BLOCK, smooth: int = BLOCK_SMOOTH) -> torch.Tensor:
    """Block means (B, 3, ceil(H/block), ceil(W/block)) of the box-smoothed rgb (B, 3, H, W).

    The ``smooth`` x ``smooth`` box mean averages only the pixels inside the image at its edges;
    a partial block at the bottom/right edge averages the pixels it has."""
    x = rgb.float()
    if smooth > 1:
        x = F.avg_pool2d(x, smooth, stride=1, padding=smooth // 2, count_include_pad=False)
    return F.avg_pool2d(x, block, ceil_mode=True)


def block_kmeans(
    rgb: np.ndarray,
    k: int,
    *,
    block: int = BLOCK,
    smooth: int = BLOCK_SMOOTH,
    sample: int = BLOCK_SAMPLE,
    seed: int = 0,
) -> np.ndarray:
    """The predecessor's pipeline on one image (H, W, 3) -> labels (H, W) int64 (module docstring)."""
    x = torch.as_tensor(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1).contiguous()[None]  # (1, 3, H, W)
    feats = block_features(x, block=block, smooth=smooth)[0]  # (3, h, w)
    _, h, w = feats.shape
    labels, _ = kmeans(feats.reshape(3, -1).T, k, seed=seed, sample=sample)  # (h*w,)
    full = labels.reshape(h, w).repeat_interleave(block, 0).repeat_interleave(block, 1)  # (h*block, w*block)
    return full[: rgb.shape[0], : rgb.shape[1]].numpy()
