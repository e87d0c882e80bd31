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

from .layers import standardize

__all__ = ["LANES", "box_filter", "guided_filter_coefficients", "fast_lane", "none_lane", "LearnedRefiner"]

LANES = ("fast", "learned", "none")


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, normalised by the in-image count at the borders."""
    if radius <= 0:
        return x
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def guided_filter_coefficients(
    guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour guided filter: per-pixel linear model ``q = sum_c a_c * I_c + b``.

    guide (B, 3, h, w), p (B, K, h, w) -> a (B, 3, K, h, w), b (B, K, h, w), box-averaged.
    """
    bsz, k, h, w = p.shape
    mean_i = box_filter(guide, radius)  # (B, 3, h, w)
    mean_p = box_filter(p, radius)  # (B, K, h, w)
    # Products of every colour channel with every cluster map: (B, 3*K, h, w).
    ip = (guide[:, :, None] * p[:, None]).reshape(bsz, 3 * k, h, w)
    cov_ip = box_filter(ip, radius).reshape(bsz, 3, k, h, w) - mean_i[:, :, None] * mean_p[:, None]
    # Colour covariance, 6 unique entries of the symmetric 3x3 matrix per pixel.
    pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    prods = torch.stack([guide[:, i] * guide[:, j] for i, j in pairs], 1)  # (B, 6, h, w)
    cov = box_filter(prods, radius) - torch.stack([mean_i[:, i] * mean_i[:, j] for i, j in pairs], 1)
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
    a = box_filter(a.reshape(bsz, 3 * k, h, w), radius).reshape(bsz, 3, k, h, w)
    return a, box_filter(b, radius)


def _renormalise(q: torch.Tensor) -> torch.Tensor:
    q = q.clamp_min(0)
    return q / q.sum(1, keepdim=True).clamp_min(1e-6)


def fast_lane(
    probs: torch.Tensor, rgb: torch.Tensor, *, radius: int = 2, eps: float = 1e-3, smooth_iters: int = 1
) -> torch.Tensor:
    """Edge-aware upsampling of probs (B, K, h, w) to the size of rgb (B, 3, H, W)."""
    with torch.autocast(device_type=probs.device.type, enabled=False):
        probs, rgb = probs.float(), rgb.float()
        h, w = probs.shape[-2:]
        big_h, big_w = rgb.shape[-2:]
        guide = F.adaptive_avg_pool2d(rgb, (h, w)) if (h, w) != (big_h, big_w) else rgb
        p = probs
        for _ in range(smooth_iters):
            a, b = guided_filter_coefficients(guide, p, radius, eps)
            p = _renormalise((a * guide[:, :, None]).sum(1) + b)
        a, b = guided_filter_coefficients(guide, p, radius, eps)
        if (h, w) == (big_h, big_w):
            return _renormalise((a * rgb[:, :, None]).sum(1) + b)
        kk = p.shape[1]
        a = F.interpolate(a.flatten(1, 2), size=(big_h, big_w), mode="bilinear", align_corners=False)
        q = F.interpolate(b, size=(big_h, big_w), mode="bilinear", align_corners=False)
        for c in range(3):  # accumulate per colour channel: no (B, 3, K, H, W) tensor
            q = q + a[:, c * kk : (c + 1) * kk] * rgb[:, c : c + 1]
        return _renormalise(q)


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

    def __init__(self, *, width: int = 12, guide_channels: int = 8):
        super().__init__()
        self.guide = nn.Sequential(nn.Conv2d(3, guide_channels, 3, padding=1), nn.ReLU(inplace=True))
        # The first conv over concat(cluster features, guide) is split into its two linear
        # parts, so the guide part is computed once, not once per cluster.
        self.from_cluster = nn.Conv2d(2, width, 3, padding=1)
        self.from_guide = nn.Conv2d(guide_channels, width, 3, padding=1, bias=False)
        self.out = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as the identity on its input
        nn.init.zeros_(self.out.bias)

    def forward(self, probs: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """probs (B, K, H, W) at full resolution, rgb (B, 3, H, W) -> refined probs."""
        b, k, h, w = probs.shape
        logp = probs.clamp_min(1e-6).log()
        top2 = logp.topk(min(2, k), dim=1).values  # (B, 2, H, W)
        best_other = torch.where(logp >= top2[:, :1], top2[:, 1:2], top2[:, :1])
        feats = torch.stack([logp, logp - best_other], 2)  # (B, K, 2, H, W)
        hidden = self.from_cluster(feats.reshape(b * k, 2, h, w)).reshape(b, k, -1, h, w)
        hidden = hidden + self.from_guide(self.guide(standardize(rgb)))[:, None]
        delta = self.out(F.relu(hidden).reshape(b * k, -1, h, w)).reshape(b, k, h, w)
        return (logp + delta).softmax(1)
