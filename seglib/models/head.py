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

The fast formulations of the EM iterations, the denoising and the initialisation (and their
reference versions) live in ``seglib.kernels``; this module is the maths that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.bilateral import denoise
from ..kernels.kmeans import distance_logits, em_steps, farthest_points, squared_norms
from ..kernels.numerics import fused_training

__all__ = [
    "SoftKMeans",
    "HeadOutput",
    "Clusters",
    "brightness_order",
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
    x2 = squared_norms(x)  # (B, 1, N)
    mu = em_steps(x, init.float(), iters=iters, temperature=temperature, x2=x2)
    logits = distance_logits(x, x2, mu, temperature)
    if bias is None and size_prior:
        bias = size_prior * (logits.softmax(1).detach().mean(2) + 1e-6).log()  # (B, K)
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
        denoised: bool = False,
    ) -> HeadOutput:
        """Cluster ``emb`` (B, D, h, w) into ``k`` clusters per image (``k`` is checked by the
        segmenter that calls the head). ``denoised``: ``emb`` is already ``denoise_input``'s
        output (e.g. kept from a fit), so it is not denoised again.

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
            emb = emb.float() if denoised else self.denoise(emb.float())
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
            pooled = self.init_cells(emb)
            ph, pw = pooled.shape[-2:]
            xp = pooled.reshape(group, bg, d, ph * pw).permute(1, 2, 0, 3).reshape(bg, d, group * ph * pw)
            out = self.fit(
                x, xp, k, iters=iters, temperature=temperature, size_prior=size_prior, fused=fused_training()
            )

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
        points = init_from = x[:, :, keep]  # (1, D, N valid)
        cells = self.init_cells(emb)  # (B, D, h/p, w/p)
        if cells is not emb:
            # Initialise from pooled cells that are entirely valid, when there are at least K.
            whole = F.avg_pool2d(valid.float()[:, None].to(emb.device), self.init_pool)[:, 0] >= 1  # (B, h/p, w/p)
            if int(whole.sum()) >= k:
                init_from = cells.permute(1, 0, 2, 3).reshape(1, d, -1)[:, :, whole.reshape(-1)]
        out = self.fit(points, init_from, k, iters=iters, temperature=temperature, size_prior=size_prior)
        return Clusters(out.prototypes, out.bias)

    def init_cells(self, emb: torch.Tensor) -> torch.Tensor:
        """The map (B, D, h', w') the initialisation picks its points from: ``emb`` average-pooled
        by ``init_pool`` (``emb`` itself when that leaves fewer than 2 cells a side)."""
        p = self.init_pool
        return F.avg_pool2d(emb, p) if p > 1 and min(emb.shape[-2:]) >= 2 * p else emb

    @staticmethod
    def fit(
        x: torch.Tensor,
        init_from: torch.Tensor,
        k: int,
        *,
        iters: int,
        temperature: float,
        size_prior: float,
        fused: bool = False,
    ) -> HeadOutput:
        """Soft k-means on the positions x (B, D, N) from K farthest points of ``init_from``
        (B, D, M), e.g. the pooled positions (``init_cells``). ``fused``: the training form of the
        farthest-point search."""
        init = farthest_points(init_from, k, fused=fused)  # (B, K, D)
        del init_from  # when the caller passed its only reference, it is freed before the EM
        return soft_kmeans(x, k, iters=iters, temperature=temperature, init=init, size_prior=size_prior)

    def denoise_input(self, emb: torch.Tensor) -> torch.Tensor:
        """What ``forward`` clusters: ``emb`` (B, D, h, w) in float32, denoised (``denoised=True``
        takes it as it is)."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.denoise(emb.float())

    def denoise(self, emb: torch.Tensor) -> torch.Tensor:
        """The head's feature-space bilateral filter with its configured strength."""
        return denoise(
            emb,
            iters=self.denoise_iters,
            radius=self.denoise_radius,
            bandwidth=self.denoise_bandwidth,
            dilations=self.denoise_dilations,
        )
