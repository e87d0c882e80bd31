"""Refinement lanes: bring stride-4 cluster probabilities back to full resolution.

* ``none``: bilinear upsampling of the head's logits, then softmax.
* ``fast``: parameter-free and edge-aware. A colour-guided filter (He, Sun & Tang, "Guided
  Image Filtering", 2010/2013) is run ``smooth_iters`` times at stride 4, then its linear
  coefficients are upsampled and applied to the full-resolution image (the "fast guided filter"
  of He & Sun, 2015). Boundaries snap to colour edges of the full-resolution image; the cost at
  full resolution is one multiply-add per colour channel and cluster.
* ``learned``: the fast lane followed by a small conv refiner shared across clusters: each
  cluster's map (its log-probability and its margin over the best other cluster) plus features
  of the RGB image predict a residual logit. Sharing the weights across clusters makes it work
  for any K up to 16 and keeps it permutation-equivariant.

The guided filter is linear in the probabilities, so the refined maps still sum to one before
the final clamp; they are clamped at 0 and renormalised because the filter can overshoot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.numerics import inference_numerics
from ..kernels.pooling import cell_means, mean_pool, window_mean
from .layers import standardize

__all__ = ["box_filter", "guided_filter_coefficients", "fast_lane", "none_lane", "LearnedRefiner"]


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, normalised by the in-image count at the borders.

    Pools in channels-last layout, several times faster on CPU for many channels; at inference
    (``inference_numerics``) separably, a row pass then a column pass: the in-image count of a
    2D window is the product of the two 1D counts, so that is the same mean, rounded
    differently."""
    if radius <= 0:
        return x
    return window_mean(x.contiguous(memory_format=torch.channels_last), radius)


_PAIRS = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]  # unique entries of a 3x3 covariance


def guided_filter_coefficients(guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Colour guided filter: the per-pixel linear model ``q = sum_c a_c * I_c + b``.

    guide (B, 3, h, w), p (B, K, h, w) -> box-averaged coefficients (B, 4K, h, w): a for colour
    channel 0 (K maps), channel 1, channel 2, then b.
    """
    bsz, k, h, w = p.shape
    ip = (guide[:, :, None] * p[:, None]).reshape(bsz, 3 * k, h, w)  # (B, 3K, h, w)
    prods = torch.stack([guide[:, i] * guide[:, j] for i, j in _PAIRS], 1)  # (B, 6, h, w)
    means = box_filter(torch.cat([guide, p, ip, prods], 1), radius)  # one pooling pass
    mean_i, mean_p = means[:, :3], means[:, 3 : 3 + k]
    cov_ip = means[:, 3 + k : 3 + 4 * k].reshape(bsz, 3, k, h, w) - mean_i[:, :, None] * mean_p[:, None]
    cov = means[:, 3 + 4 * k :] - torch.stack([mean_i[:, i] * mean_i[:, j] for i, j in _PAIRS], 1)
    s00, s01, s02, s11, s12, s22 = (cov[:, i] for i in range(6))
    s00, s11, s22 = s00 + eps, s11 + eps, s22 + eps
    # Closed-form inverse of the regularised 3x3 covariance (adjugate / determinant).
    c00 = s11 * s22 - s12 * s12
    c01 = s02 * s12 - s01 * s22
    c02 = s01 * s12 - s02 * s11
    c11 = s00 * s22 - s02 * s02
    c12 = s01 * s02 - s00 * s12
    c22 = s00 * s11 - s01 * s01
    det = s00 * c00 + s01 * c01 + s02 * c02
    inv = torch.stack([c00, c01, c02, c01, c11, c12, c02, c12, c22], 1).reshape(bsz, 3, 3, h, w)
    inv = inv / det[:, None, None]
    a = torch.einsum("bcdhw,bdkhw->bckhw", inv, cov_ip)  # (B, 3, K, h, w)
    b = mean_p - (a * mean_i[:, :, None]).sum(1)  # (B, K, h, w)
    return box_filter(torch.cat([a.reshape(bsz, 3 * k, h, w), b], 1), radius)


def _apply(coeffs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """q = sum_c a_c I_c + b for coefficients (B, 4K, H, W) and image (B, 3, H, W), then
    clamped at 0 and renormalised (the filter can overshoot): (B, K, H, W)."""
    if not inference_numerics():
        bsz, kk, hh, ww = coeffs.shape
        k = kk // 4
        # Per pixel a (1 x 4) @ (4 x K) product: [I_0, I_1, I_2, 1] times the coefficients.
        coeffs = coeffs.permute(0, 2, 3, 1).reshape(-1, 4, k)  # (B*H*W, 4, K)
        image = torch.cat([image, image.new_ones(bsz, 1, hh, ww)], 1).permute(0, 2, 3, 1).reshape(-1, 1, 4)
        q = torch.bmm(image, coeffs).reshape(bsz, hh, ww, k).clamp_min(0)
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-6)
        return q.permute(0, 3, 1, 2)  # (B, K, H, W), channels-last in memory
    # At inference: three multiply-adds over (B, K, H, W) maps instead of a batched matmul.
    k = coeffs.shape[1] // 4
    a0, a1, a2, b = coeffs.split(k, 1)  # (B, K, H, W) each
    q = b + a0 * image[:, 0:1] + a1 * image[:, 1:2] + a2 * image[:, 2:3]
    q = q.clamp_min_(0)
    return q / q.sum(1, keepdim=True).clamp_min(1e-6)


def fast_lane(
    probs: torch.Tensor,
    rgb: torch.Tensor,
    *,
    radius: int = 2,
    eps: float = 1e-3,
    smooth_iters: int = 1,
    guide_scale: int = 1,
    upsample: bool = True,
) -> torch.Tensor:
    """Edge-aware upsampling of probs (B, K, h, w) to the size of rgb (B, 3, H, W).

    ``guide_scale`` 2 applies the filter to the image at half resolution and upsamples the
    result bilinearly: edges land within a pixel, at about a third of the full-resolution cost
    (the per-pixel work is 4K channels there, K after). ``upsample=False`` leaves that last
    bilinear step out and returns the filter's output at its own resolution (a caller that only
    needs the labels of most pixels can skip the full-resolution maps, ``seglib.inference.engine``).
    """
    with torch.autocast(device_type=probs.device.type, enabled=False):
        probs, rgb = probs.float(), rgb.float()
        h, w = probs.shape[-2:]
        full = tuple(rgb.shape[-2:])
        coarser = guide_scale > 1 and full[0] // guide_scale >= h and full[1] // guide_scale >= w
        if coarser and not torch.is_grad_enabled() and not (full[0] % guide_scale or full[1] % guide_scale):
            # Without gradient the pools halve (``mean_pool``): the guide's block means are the
            # image's, pooled further, with the same operations on the same values.
            image = mean_pool(rgb, guide_scale)
            guide = cell_means(image, (h, w)) if (h, w) != tuple(image.shape[-2:]) else image
        else:
            guide = cell_means(rgb, (h, w)) if (h, w) != full else rgb
            if coarser and full == (h * guide_scale, w * guide_scale):
                image = guide  # the filter runs at the probabilities' own grid
            else:
                image = mean_pool(rgb, guide_scale) if coarser else rgb
        p = probs
        for _ in range(smooth_iters):
            p = _apply(guided_filter_coefficients(guide, p, radius, eps), guide)
        coeffs = guided_filter_coefficients(guide, p, radius, eps)  # (B, 4K, h, w)
        if (h, w) != tuple(image.shape[-2:]):
            # The fast guided filter: coefficients are smooth, so they are upsampled and
            # applied to the higher-resolution image, which puts the edges back.
            coeffs = F.interpolate(coeffs, size=image.shape[-2:], mode="bilinear", align_corners=False)
        q = _apply(coeffs, image)
        if upsample and tuple(q.shape[-2:]) != full:
            q = F.interpolate(q, size=full, mode="bilinear", align_corners=False)
        return q


def none_lane(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of logits (B, K, h, w), softmax over K."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.float().softmax(1)


class LearnedRefiner(nn.Module):
    """Residual logit refinement shared across clusters (works for every K).

    Arguments:
      width: hidden channels of the per-cluster conv.
      guide_channels: channels of the RGB feature map shared by all clusters.
    """

    def __init__(self, *, width: int = 4, guide_channels: int = 8):
        super().__init__()
        self.guide = nn.Sequential(nn.Conv2d(3, guide_channels, 3, padding=1), nn.ReLU(inplace=True))
        # The first conv over concat(cluster features, guide) is split into its two linear
        # parts, so the guide part is computed once, not once per cluster.
        self.from_cluster = nn.Conv2d(2, width, 3, padding=1)
        self.from_guide = nn.Conv2d(guide_channels, width, 3, padding=1, bias=False)
        # No bias: a constant added to every cluster's logit cancels in the softmax, so its
        # gradient is rounding noise that Adam would amplify into a random walk.
        self.out = nn.Conv2d(width, 1, 3, padding=1, bias=False)
        nn.init.zeros_(self.out.weight)  # starts as the identity on its input

    def forward(self, probs: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """probs (B, K, H, W) at full resolution, rgb (B, 3, H, W) -> refined probs."""
        b, k, h, w = probs.shape
        logp = probs.clamp_min(1e-6).log()
        top2 = logp.topk(min(2, k), dim=1).values  # (B, 2, H, W)
        best_other = torch.where(logp >= top2[:, :1], top2[:, 1:2], top2[:, :1])
        # The per-cluster convs run channels-last (a few channels over B*K maps: on CPU several
        # times faster than the default layout): (B, K, H, W, C) in memory throughout.
        feats = torch.stack([logp, logp - best_other], -1).view(b * k, h, w, 2).permute(0, 3, 1, 2)
        hidden = self.from_cluster(feats).permute(0, 2, 3, 1).reshape(b, k, h, w, -1)  # (B, K, H, W, C)
        guide = self.from_guide(self.guide(standardize(rgb))).permute(0, 2, 3, 1)  # (B, H, W, C)
        hidden = F.relu(hidden + guide[:, None]).view(b * k, h, w, -1).permute(0, 3, 1, 2)
        delta = self.out(hidden).reshape(b, k, h, w)
        return (logp + delta).softmax(1)
