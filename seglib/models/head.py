"""Differentiable soft k-means (EM) over per-position embeddings.

Given embeddings ``x`` (B, D, N) the head finds K prototypes per image and soft assignments:

    logits[b, n, k] = -||x[b, n] - mu[b, k]||^2 / T
    r = softmax(logits over k);   mu[b, k] = sum_n r[b, n, k] x[b, n] / sum_n r[b, n, k]

repeated ``iters`` times. Squared distances use the matmul form
``||x||^2 - 2 x.mu + ||mu||^2`` so no (B, K, D, N) tensor ever exists: memory is
O(B*K*N + B*D*N). Gradients flow through every iteration into the embeddings.

Optionally (``size_prior`` > 0) the final assignment adds a per-cluster offset
``size_prior * log(share_k)``, where ``share_k`` is the fraction of positions cluster k holds:
positions between two clusters go to the larger one (docs/design.md).

Before clustering, the embeddings can be denoised by a few iterations of an edge-preserving
(bilateral) filter in feature space: every position moves to the mean of its neighbours within
``denoise_radius`` cells, weighted by exp(-||x_i - x_j||^2 / bandwidth^2). Positions of one
region pull together while region boundaries, where features differ, are kept. Learned
features vary with the phase of a texture (where in a stripe a pixel sits); k-means then
splits a textured class into phase clusters. Denoising removes that within-region spread and
measurably lifts mIoU (docs/design.md). The weights are computed without gradient, so the
filter is linear in the embeddings for backprop and costs one map per neighbour, not D.

Initialisation is deterministic (no random numbers): farthest-point sampling on embeddings
average-pooled by ``init_pool``, starting from the position farthest from the image mean.
Being a pure function of the embeddings keeps training resumable and identical under DDP.
The EM runs in fp32 even under bf16 autocast: distances between nearby prototypes are small
differences of O(1) numbers, which bf16's 8-bit mantissa would blur.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import inference_numerics

__all__ = [
    "SoftKMeans",
    "HeadOutput",
    "Clusters",
    "brightness_order",
    "farthest_point_init",
    "soft_kmeans",
    "denoise",
]


@dataclass
class HeadOutput:
    probs: torch.Tensor  # (B, K, N) or (B, K, h, w)
    logits: torch.Tensor  # same shape as probs
    prototypes: torch.Tensor  # (B, K, D)
    clustered: torch.Tensor | None = None  # (B, D, h, w): the (denoised) embeddings clustered
    bias: torch.Tensor | None = None  # (B, K): the size prior's logit offsets; None without one


class Clusters(NamedTuple):
    """K clusters fitted once and shared, e.g. by every window of a large raster."""

    prototypes: torch.Tensor  # (1, K, D)
    bias: torch.Tensor | None = None  # (1, K): per-cluster logit offsets of the size prior, or None

    def to(self, device: torch.device | str) -> Clusters:
        return Clusters(self.prototypes.to(device), None if self.bias is None else self.bias.to(device))

    def ordered(self) -> Clusters:
        """The same clusters renumbered in the stable order (``brightness_order``)."""
        order = torch.as_tensor(brightness_order(self.prototypes[0]), device=self.prototypes.device)
        return Clusters(self.prototypes[:, order], None if self.bias is None else self.bias[:, order])


def brightness_order(prototypes: torch.Tensor) -> list[int]:
    """Stable label ids: the permutation (K,) that sorts prototypes (K, D) by the brightness of
    their colour channels (the embedding's last three: the cells' mean colour, ``Segmenter.embed``),
    darkest first, exact ties by the other values. Cluster ``order[i]`` becomes label ``i``.

    A function of the prototypes alone, so every window, file and run that shares the clusters
    shares the ids, and fitting twice on the same input gives the same ids."""
    p = prototypes.detach().reshape(prototypes.shape[-2], prototypes.shape[-1]).double().cpu().numpy()  # (K, D)
    keys = [p[:, j] for j in range(p.shape[1] - 4, -1, -1)] + [p[:, -3:].sum(1)]  # np.lexsort: last key first
    return np.lexsort(keys).tolist()


def farthest_point_init(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, K) of K mutually far points of ``x`` (B, D, N); no gradient."""
    with torch.no_grad():
        b, _, n = x.shape
        centre = x.mean(2, keepdim=True)  # (B, D, 1)
        idx = torch.empty(b, k, dtype=torch.long, device=x.device)
        # Sequential over K (at most 16 steps of O(B*N*D) work): each new point is the one
        # farthest from all chosen so far; the first is the one farthest from the mean.
        nearest = (x - centre).square().sum(1)  # (B, N)
        for j in range(k):
            pick = nearest.argmax(1)  # (B,)
            idx[:, j] = pick
            chosen = torch.gather(x, 2, pick.view(b, 1, 1).expand(-1, x.shape[1], 1))  # (B, D, 1)
            dist = (x - chosen).square().sum(1)
            nearest = dist if j == 0 else torch.minimum(nearest, dist)
        return idx


class _WeightedShifts(torch.autograd.Function):
    """out = sum_i weights[:, i] * padded shifted by offsets[i], cropped to (h, w).

    Autograd through slices would allocate one zero-filled padded buffer per offset in the
    backward pass; this backward scatters every offset into a single buffer instead (half the
    time of a training step's denoising). The weights are treated as constants.
    """

    @staticmethod
    def forward(ctx, padded, weights, offsets, h, w):  # noqa: D102
        out = None
        for i, (dy, dx) in enumerate(offsets):  # accumulate in place: one (B, D, h, w) buffer
            shifted = padded[:, :, dy : dy + h, dx : dx + w]
            out = weights[:, i : i + 1] * shifted if out is None else out.addcmul_(weights[:, i : i + 1], shifted)
        ctx.save_for_backward(weights)
        ctx.offsets, ctx.size, ctx.padded_shape = offsets, (h, w), padded.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weights,) = ctx.saved_tensors
        h, w = ctx.size
        grad_padded = grad.new_zeros(ctx.padded_shape)
        for i, (dy, dx) in enumerate(ctx.offsets):
            grad_padded[:, :, dy : dy + h, dx : dx + w].addcmul_(weights[:, i : i + 1], grad)
        return grad_padded, None, None, None, None


def denoise(
    emb: torch.Tensor, *, iters: int, radius: int, bandwidth: float, dilations: tuple[int, ...] = (1,)
) -> torch.Tensor:
    """Feature-space bilateral filtering of emb (B, D, h, w), ``iters`` times: every position
    becomes the average of its (2r+1)^2 neighbourhood, weighted by a softmax over minus squared
    feature distances / bandwidth^2 (no gradient through the weights).

    Pass i samples the neighbourhood with spacing ``dilations[i % len(dilations)]``: radius 1
    with dilations (1, 2) reaches as far as radius 2 in the same number of passes at 9/25 of the
    cost (the student's cheaper head, docs/models.md)."""
    if iters <= 0 or radius <= 0:
        return emb
    h, w = emb.shape[-2:]
    fast = inference_numerics()
    for i in range(iters):
        d = dilations[i % len(dilations)]
        reach = radius * d
        offsets = [(dy * d, dx * d) for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
        padded = F.pad(emb, (reach,) * 4, mode="replicate")  # (B, D, h+2rd, w+2rd)
        with torch.no_grad():
            # (B, S, h, w): squared feature distance of every position to each of its S neighbours.
            if fast:  # |a|^2 + |b|^2 - 2 a.b: one fused dot product per neighbour, a third faster
                centre = torch.linalg.vecdot(emb, emb, dim=1)  # (B, h, w)
                sq = F.pad(centre[:, None], (reach,) * 4, mode="replicate")[:, 0]  # (B, h+2rd, w+2rd)
                dist2 = torch.stack(
                    [
                        sq[:, dy : dy + h, dx : dx + w]
                        + centre
                        - 2 * torch.linalg.vecdot(padded[:, :, dy : dy + h, dx : dx + w], emb, dim=1)
                        for dy, dx in offsets
                    ],
                    1,
                )
            else:
                dist2 = torch.stack(
                    [(padded[:, :, dy : dy + h, dx : dx + w] - emb).square_().sum(1) for dy, dx in offsets], 1
                )
            weights = torch.softmax(dist2.mul_(-1.0 / bandwidth**2), dim=1)
        emb = _WeightedShifts.apply(padded, weights, offsets, h, w)
    return emb


def soft_kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int,
    temperature: float,
    init: torch.Tensor,
    size_prior: float = 0.0,
    bias: torch.Tensor | None = None,
) -> HeadOutput:
    """EM on ``x`` (B, D, N) from initial prototypes ``init`` (B, K, D).

    ``size_prior`` > 0 adds ``size_prior * log(share)`` to the final logits, the share of
    each cluster measured from the final assignment without it (no gradient: a constant
    offset). ``bias`` (B or 1, K) gives those offsets directly instead (shared clusters).
    Returns probs and logits as (B, K, N). Positions are the last axis throughout: the
    distance matmul is then (K x D) @ (D x N) and the softmax runs over a short axis of
    contiguous rows, both several times faster on CPU than the (N, K) layout.
    """
    x = x.float()
    x2 = x.square().sum(1, keepdim=True)  # (B, 1, N)
    mu = init.float()

    def assign(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, K, N) squared distances without a (B, K, D, N) intermediate.
        d2 = x2 - 2 * torch.bmm(mu, x) + mu.square().sum(-1, keepdim=True)
        logits = -d2.clamp_min(0) / temperature
        return logits, logits.softmax(1)

    for _ in range(iters):
        _, r = assign(mu)  # (B, K, N)
        mass = r.sum(2, keepdim=True)  # (B, K, 1)
        # A cluster that lost all mass keeps its previous prototype instead of dividing by 0.
        mu = torch.where(mass > 1e-6, torch.bmm(r, x.transpose(1, 2)) / mass.clamp_min(1e-6), mu)
    logits, r = assign(mu)
    if bias is None and size_prior:
        bias = size_prior * (r.detach().mean(2) + 1e-6).log()  # (B, K)
    if bias is not None:
        logits = logits + bias.float()[..., None]
        r = logits.softmax(1)
    return HeadOutput(probs=r, logits=logits, prototypes=mu, bias=bias)


class SoftKMeans(nn.Module):
    """The clustering head. Parameter-free; every knob can be overridden per call.

    Arguments:
      iters: EM iterations after initialisation.
      temperature: softmax temperature on squared distances (smaller = harder assignments).
      size_prior: weight of log(cluster share) added to the final logits (0: off).
      init_pool: farthest-point initialisation works on embeddings pooled by this factor,
        which keeps it cheap and away from single-pixel outliers.
      denoise_iters, denoise_radius, denoise_bandwidth, denoise_dilations: the feature-space bilateral filter
        applied before clustering (0 iterations turns it off).
    """

    def __init__(
        self,
        *,
        iters: int = 6,
        temperature: float = 0.1,
        size_prior: float = 0.0,
        init_pool: int = 2,
        denoise_iters: int = 5,
        denoise_radius: int = 2,
        denoise_bandwidth: float = 0.4,
        denoise_dilations: tuple[int, ...] = (1,),
    ):
        super().__init__()
        self.iters, self.temperature, self.init_pool = iters, temperature, init_pool
        self.size_prior = size_prior
        self.denoise_iters, self.denoise_radius, self.denoise_bandwidth = (
            denoise_iters,
            denoise_radius,
            denoise_bandwidth,
        )
        if not denoise_dilations or min(denoise_dilations) < 1:
            raise ValueError(f"denoise_dilations must be positive integers, got {denoise_dilations!r}")
        self.denoise_dilations = tuple(int(d) for d in denoise_dilations)

    def forward(
        self,
        emb: torch.Tensor,
        k: int,
        *,
        iters: int | None = None,
        temperature: float | None = None,
        size_prior: float | None = None,
        group: int = 1,
        clusters: Clusters | None = None,
        valid: torch.Tensor | None = None,
    ) -> HeadOutput:
        """Cluster ``emb`` (B, D, h, w) into ``k`` clusters per image (``k`` is checked by the
        segmenter that calls the head).

        ``group`` > 1 fits one set of prototypes jointly over ``group`` images: images
        ``i, i + B/group, i + 2B/group, ...`` share prototypes (used for the two training
        views, so their assignments are comparable cluster by cluster).
        ``clusters`` (prototypes (B or 1, K, D) and their size-prior offsets), when given, are
        used as they are: no fitting, one assignment step (how windows of a large raster share
        one set of clusters).
        ``valid`` (B, h, w) bool marks the positions that are image data (not nodata): only
        they are clustered, initialised from and counted by the size prior; the others are
        assigned to the result like any position. It needs one joint fit (``group`` = B).
        Returns probs and logits as (B, K, h, w), prototypes as (B, K, D) and bias as (B, K).
        """
        iters = self.iters if iters is None else iters
        temperature = self.temperature if temperature is None else temperature
        size_prior = self.size_prior if size_prior is None else size_prior
        b, d, h, w = emb.shape
        if b % group:
            raise ValueError(f"batch {b} is not divisible by group {group}")
        bg = b // group
        with torch.autocast(device_type=emb.device.type, enabled=False):
            emb = self.denoise(emb.float())
            if valid is not None and clusters is None:
                if group != b:
                    raise ValueError(f"valid needs one joint fit over the batch (group = B = {b}), got group {group}")
                clusters = self._fit_valid(emb, k, valid, iters, temperature, size_prior)
            if clusters is not None:
                if clusters.prototypes.shape[-2:] != (k, d):
                    raise ValueError(f"prototypes must be (B, {k}, {d}), got {tuple(clusters.prototypes.shape)}")
                protos = clusters.prototypes.float().expand(b, -1, -1)
                bias = None if clusters.bias is None else clusters.bias.expand(b, -1)
                out = soft_kmeans(emb.flatten(2), k, iters=0, temperature=temperature, init=protos, bias=bias)
                return HeadOutput(
                    probs=out.probs.reshape(b, k, h, w),
                    logits=out.logits.reshape(b, k, h, w),
                    prototypes=protos,
                    clustered=emb,
                    bias=bias,
                )
            # (G*Bg, D, h, w) -> (Bg, D, G*h*w): positions of grouped images side by side.
            x = emb.reshape(group, bg, d, h * w).permute(1, 2, 0, 3).reshape(bg, d, group * h * w)
            pooled = emb
            if self.init_pool > 1 and min(h, w) >= 2 * self.init_pool:
                pooled = F.avg_pool2d(emb, self.init_pool)
            ph, pw = pooled.shape[-2:]
            xp = pooled.reshape(group, bg, d, ph * pw).permute(1, 2, 0, 3).reshape(bg, d, group * ph * pw)
            idx = farthest_point_init(xp, k)  # (Bg, K)
            init = torch.gather(xp, 2, idx[:, None, :].expand(-1, d, -1)).transpose(1, 2)  # (Bg, K, D)
            out = soft_kmeans(x, k, iters=iters, temperature=temperature, init=init, size_prior=size_prior)

        def ungroup(t: torch.Tensor) -> torch.Tensor:  # (Bg, K, G*h*w) -> (B, K, h, w)
            return t.reshape(bg, k, group, h, w).permute(2, 0, 1, 3, 4).reshape(b, k, h, w)

        protos = out.prototypes[None].expand(group, -1, -1, -1).reshape(b, k, d)
        bias = None if out.bias is None else out.bias[None].expand(group, -1, -1).reshape(b, k)
        return HeadOutput(
            probs=ungroup(out.probs), logits=ungroup(out.logits), prototypes=protos, clustered=emb, bias=bias
        )

    def _fit_valid(
        self, emb: torch.Tensor, k: int, valid: torch.Tensor, iters: int, temperature: float, size_prior: float
    ) -> Clusters:
        """One set of clusters fitted on the valid positions of all of ``emb`` (B, D, h, w)."""
        b, d, h, w = emb.shape
        if valid.shape != (b, h, w):
            raise ValueError(f"valid must be (B, h, w) = {(b, h, w)}, got {tuple(valid.shape)}")
        x = emb.permute(1, 0, 2, 3).reshape(1, d, b * h * w)  # (1, D, B*h*w): every image's positions
        keep = valid.reshape(-1).to(emb.device)
        if not keep.any():
            raise ValueError("no valid position to cluster: every pixel is masked (nodata)")
        points, whole_cells = x[:, :, keep], None  # (1, D, N valid)
        if self.init_pool > 1 and min(h, w) >= 2 * self.init_pool:
            # Initialise from pooled cells that are entirely valid, when there are at least K.
            cells = F.avg_pool2d(emb, self.init_pool)  # (B, D, h/p, w/p)
            whole = F.avg_pool2d(valid.float()[:, None].to(emb.device), self.init_pool)[:, 0] >= 1  # (B, h/p, w/p)
            if int(whole.sum()) >= k:
                whole_cells = cells.permute(1, 0, 2, 3).reshape(1, d, -1)[:, :, whole.reshape(-1)]
        init_from = points if whole_cells is None else whole_cells
        idx = farthest_point_init(init_from, k)  # (1, K)
        init = torch.gather(init_from, 2, idx[:, None, :].expand(-1, d, -1)).transpose(1, 2)  # (1, K, D)
        out = soft_kmeans(points, k, iters=iters, temperature=temperature, init=init, size_prior=size_prior)
        return Clusters(out.prototypes, out.bias)

    def denoise(self, emb: torch.Tensor) -> torch.Tensor:
        """The head's feature-space bilateral filter with its configured strength."""
        return denoise(
            emb,
            iters=self.denoise_iters,
            radius=self.denoise_radius,
            bandwidth=self.denoise_bandwidth,
            dilations=self.denoise_dilations,
        )
