"""The teacher's unsupervised losses.

Each term is a plain function with a defining property that tests check:

* ``consistency_loss``: symmetric KL between view B's probabilities and view A's probabilities
  warped into B's frame with the exact geometric transform; ~0 for an equivariant model, large
  for misaligned maps.
* ``entropy_terms``: mean per-pixel entropy (0 for one-hot maps) and one minus the normalised
  entropy of the cluster marginal (0 when all K clusters are used equally). Both are divided
  by log K so their weights mean the same at every K.
* ``edge_aware_smoothness``: total variation of the probabilities, down-weighted where the RGB
  image has an edge; 0 for piecewise-constant maps whose changes sit on strong edges.
* ``variance_floor``: a hinge on the per-channel spread of the learned embeddings (as in
  VICReg, Bardes et al. 2022). The uniform assignment is a trap of entropy shaping alone
  (it zeroes consistency and smoothness); a floor on the spread makes that collapse expensive.

``TeacherLoss`` combines them with the weights of ``LossConfig`` and returns a dict with
``total`` and each term (unweighted, every term is minimised).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..augment import ViewTransform
from ..config import LossConfig
from ..kernels.weighted_sum import weighted_sum

__all__ = [
    "kl_divergence",
    "symmetric_kl_map",
    "symmetric_kl",
    "entropy_map",
    "smoothness_maps",
    "consistency_loss",
    "entropy_terms",
    "edge_aware_smoothness",
    "variance_floor",
    "channel_covariance",
    "TeacherLoss",
]

_EPS = 1e-6
EDGE_SIGMA = 0.05  # the RGB gradient (L1 over the channels) at which the smoothness weight falls to 1/e
VARIANCE_FLOOR = 1.0  # the std each raw feature channel keeps over the batch (VICReg's gamma)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of KL(p || q), both (B, K, h, w) probabilities."""
    return (p * (p.clamp_min(_EPS).log() - q.clamp_min(_EPS).log())).sum(1).mean()


def _kl_maps(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p||q), KL(q||p)) at every pixel (B, H, W) of (B, K, H, W) probabilities."""
    logp, logq = p.clamp_min(_EPS).log(), q.clamp_min(_EPS).log()
    return (p * (logp - logq)).sum(1), (q * (logq - logp)).sum(1)


def symmetric_kl_map(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 * (KL(p||q) + KL(q||p)) at every pixel (B, H, W) of (B, K, H, W) probabilities."""
    pq, qp = _kl_maps(p, q)
    return 0.5 * (pq + qp)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``symmetric_kl_map`` averaged over the pixels (those where ``mask`` is 1).

    The one symmetric KL of the package (the teacher's consistency between views, the
    student's between resolution slices). Without a mask: the two KLs averaged over the pixels
    each, then halved, i.e. 0.5 * (``kl_divergence``(p, q) + ``kl_divergence``(q, p)) to the bit."""
    if mask is None:
        pq, qp = _kl_maps(p, q)
        return 0.5 * (pq.mean() + qp.mean())
    per_pixel = symmetric_kl_map(p, q)  # (B, H, W)
    mask = mask.reshape(per_pixel.shape)
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1)


def consistency_loss(probs_a: torch.Tensor, probs_b: torch.Tensor, transform: ViewTransform) -> torch.Tensor:
    """Symmetric KL between view B and view A warped into B's frame (both (B, K, h, w))."""
    return symmetric_kl(transform.to_view(probs_a), probs_b)


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of every pixel's distribution: (B, ...) for probs (B, K, ...)."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(1)


def entropy_terms(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel entropy / log K, 1 - marginal entropy / log K) for probs (B, K, ...)."""
    k = probs.shape[1]
    log_k = math.log(k)
    p = probs.flatten(2)  # (B, K, N)
    pixel = entropy_map(p).mean() / log_k
    marginal = p.mean(2)  # (B, K): cluster sizes per image
    marginal_entropy = -(marginal * marginal.clamp_min(_EPS).log()).sum(1).mean() / log_k
    return pixel, 1 - marginal_entropy


def smoothness_maps(probs: torch.Tensor, rgb: torch.Tensor, sigma: float = EDGE_SIGMA) -> list[torch.Tensor]:
    """0.5 * |p(x) - p(x')|_1 * exp(-|I(x) - I(x')|_1 / sigma) for every pair of vertical
    neighbours (B, H-1, W), then of horizontal ones (B, H, W-1); probs (B, K, H, W), rgb
    (B, 3, H, W) at the same resolution."""
    maps = []
    for dim in (2, 3):
        dp = (probs.narrow(dim, 1, probs.shape[dim] - 1) - probs.narrow(dim, 0, probs.shape[dim] - 1)).abs()
        di = (rgb.narrow(dim, 1, rgb.shape[dim] - 1) - rgb.narrow(dim, 0, rgb.shape[dim] - 1)).abs()
        weight = torch.exp(-di.sum(1) / sigma)  # (B, H', W'): ~0 across strong colour edges
        maps.append(0.5 * dp.sum(1) * weight)
    return maps


def edge_aware_smoothness(probs: torch.Tensor, rgb: torch.Tensor, sigma: float = EDGE_SIGMA) -> torch.Tensor:
    """Mean over neighbour pairs of ``smoothness_maps``, the two directions weighted equally."""
    vertical, horizontal = smoothness_maps(probs, rgb, sigma)
    return 0.5 * (vertical.mean() + horizontal.mean())


def _positions(emb: torch.Tensor) -> torch.Tensor:
    """(D, M): every position of emb (B, D, h, w), gathered from all ranks under DDP so that
    batch statistics are those of the global batch (differentiably, as VICReg does)."""
    z = emb.float().transpose(0, 1).flatten(1)  # (D, B*h*w)
    if dist.world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        z = torch.cat(all_gather(z), 1)
    return z


def channel_covariance(emb: torch.Tensor) -> torch.Tensor:
    """(D, D) covariance of the channels of emb (B, D, h, w) over all positions of the batch
    (of the global batch under DDP); its diagonal holds the channels' variances."""
    z = _positions(emb)  # (D, M)
    z = z - z.mean(1, keepdim=True)
    return z @ z.T / max(z.shape[1] - 1, 1)


def variance_floor(emb: torch.Tensor, floor: float, *, cov: torch.Tensor | None = None) -> torch.Tensor:
    """Mean hinge max(0, floor - std) over channels of emb (B, D, h, w); std over all
    positions of the batch (one image may be a single land cover, the batch is not).
    ``cov``: the ``channel_covariance`` of emb when it is at hand."""
    cov = channel_covariance(emb) if cov is None else cov
    std = (torch.diagonal(cov) + 1e-4).sqrt()  # (D,)
    return F.relu(floor - std).mean()


def covariance_penalty(emb: torch.Tensor, *, cov: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squared off-diagonal covariances of the channels of emb (B, D, h, w), over D.
    ``cov``: the ``channel_covariance`` of emb when it is at hand.

    Decorrelated channels stop the features from spending all their spread on one direction.
    """
    cov = channel_covariance(emb) if cov is None else cov
    off = cov - torch.diag(torch.diag(cov))
    return off.pow(2).sum() / cov.shape[0]


def invariance_loss(features_a: torch.Tensor, features_b: torch.Tensor, transform: ViewTransform) -> torch.Tensor:
    """Mean squared difference between B's features and A's features warped into B's frame."""
    return F.mse_loss(transform.to_view(features_a), features_b.float())


class TeacherLoss(nn.Module):
    """Weighted sum of the teacher's terms for one batch of view pairs.

    Arguments:
      config: a ``LossConfig`` with the weights.
    """

    def __init__(self, config: LossConfig | None = None):
        super().__init__()
        self.config = config or LossConfig()

    def forward(
        self,
        out: dict[str, torch.Tensor],
        rgb: torch.Tensor,
        transform: ViewTransform,
        *,
        lane: str,
    ) -> dict[str, torch.Tensor]:
        """Losses of a forward pass over ``rgb`` = cat([view A, view B]) (2B, 3, H, W) run with
        ``group=2`` and the refinement lane ``lane``."""
        c = self.config
        coarse = out["probs_coarse"]  # (2B, K, h, w)
        pa, pb = coarse.chunk(2)
        h, w = coarse.shape[-2:]
        rgb_small = F.adaptive_avg_pool2d(rgb.float(), (h, w))
        terms = {"consistency": consistency_loss(pa, pb, transform)}
        terms["pixel_entropy"], terms["marginal_entropy"] = entropy_terms(coarse)
        terms["smoothness"] = edge_aware_smoothness(coarse, rgb_small, EDGE_SIGMA)
        fa, fb = out["features"].chunk(2)
        terms["invariance"] = invariance_loss(fa, fb, transform)
        cov = channel_covariance(out["features"])  # shared by the two terms (one all-gather under DDP)
        terms["variance"] = variance_floor(out["features"], VARIANCE_FLOOR, cov=cov)
        terms["covariance"] = covariance_penalty(out["features"], cov=cov)
        if lane == "learned" and c.refine:
            # The lane's output at its working resolution (a full-resolution one if that is all there is).
            terms["refine"] = self.refine_terms(out.get("probs_learned", out.get("probs")), coarse, rgb)
        weights = {
            "consistency": c.consistency,
            "pixel_entropy": c.pixel_entropy,
            "marginal_entropy": c.marginal_entropy,
            "smoothness": c.smoothness,
            "invariance": c.invariance,
            "variance": c.variance,
            "covariance": c.covariance,
            "refine": c.refine,
        }
        terms["total"] = weighted_sum(terms, weights)
        return terms

    def refine_terms(self, probs: torch.Tensor, coarse: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """Terms for the learned lane at its working resolution (probs (B, K, H', W'); rgb is
        averaged down to it): confident, edge-aligned, and faithful to the head (KL to the
        upsampled coarse map) so it cannot drift to another clustering."""
        up = F.interpolate(coarse, size=probs.shape[-2:], mode="bilinear", align_corners=False)
        fidelity = kl_divergence(probs, up)
        pixel, _ = entropy_terms(probs)
        if rgb.shape[-2:] != probs.shape[-2:]:
            rgb = F.adaptive_avg_pool2d(rgb.float(), probs.shape[-2:])
        smooth = edge_aware_smoothness(probs, rgb.float(), EDGE_SIGMA)
        return pixel + smooth + 0.1 * fidelity
