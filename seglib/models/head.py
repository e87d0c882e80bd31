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

from .layers import inference_numerics, use_reference_ops

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


def farthest_point_init(x: torch.Tensor, k: int, *, fused: bool = False) -> torch.Tensor:
    """Indices (B, K) of K mutually far points of ``x`` (B, D, N); no gradient.

    ``fused`` (training): distances (not squared: the same farthest points up to rounding) in
    one ``vector_norm`` call per point instead of three small ops, and the chosen point read
    with one flat ``take`` (a gather along N issues ten operator calls on the CPU)."""
    with torch.no_grad():
        b, d, n = x.shape
        if fused:
            # (B, D, 1): the flat index of x[b, d, 0]; adding a point's index n reads x[b, :, n].
            offsets = torch.arange(0, b * d * n, n, device=x.device).view(b, d, 1)
            # (B, 1, N): distance of every point to the mean, then to the nearest chosen point.
            nearest = torch.linalg.vector_norm(x - x.mean(2, keepdim=True), dim=1, keepdim=True)
            picks = []
            for j in range(k):
                picks.append(nearest.argmax(2, keepdim=True))  # (B, 1, 1)
                if j < k - 1:
                    chosen = x.take(offsets + picks[-1])  # (B, D, 1)
                    dist = torch.linalg.vector_norm(x - chosen, dim=1, keepdim=True)
                    nearest = dist if j == 0 else torch.minimum(nearest, dist)
            return torch.cat(picks, 2).view(b, k)  # (B, K)
        centre = x.mean(2, keepdim=True)  # (B, D, 1)
        picks = []
        # Sequential over K (at most 16 steps of O(B*N*D) work): each new point is the one
        # farthest from all chosen so far; the first is the one farthest from the mean.
        nearest = (x - centre).square().sum(1)  # (B, N)
        for j in range(k):
            pick = nearest.argmax(1)  # (B,)
            picks.append(pick)
            if j == k - 1:
                break
            chosen = torch.gather(x, 2, pick.view(b, 1, 1).expand(-1, x.shape[1], 1))  # (B, D, 1)
            dist = (x - chosen).square().sum(1)
            nearest = dist if j == 0 else torch.minimum(nearest, dist)
        return torch.stack(picks, 1)  # (B, K)


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


_MASKS: dict[tuple, torch.Tensor] = {}


def _neighbour_mask(tile: int, radius: int, dilation: int, device: torch.device) -> torch.Tensor:
    """(T*T, A*A) additive mask, 0 where window cell j is one of centre i's (2r+1)^2
    neighbours at spacing ``dilation``, -inf elsewhere (A = T + 2 * radius * dilation).
    Built once per setting and device: a constant made on every call would be a host-to-device
    copy inside the training step."""
    key = (tile, radius, dilation, str(device))
    if key not in _MASKS:
        reach, side = radius * dilation, tile + 2 * radius * dilation
        offsets = torch.arange(-radius, radius + 1) * dilation + reach  # (2r+1,)
        centre = torch.arange(tile)
        rows = centre[:, None] + offsets[None, :]  # (T, 2r+1): window rows of centre row i
        mask = torch.full((tile, tile, side, side), float("-inf"))
        for i in range(tile):  # T^2 small index assignments, once per setting
            for j in range(tile):
                mask[i, j, rows[i][:, None], rows[j][None, :]] = 0.0
        _MASKS[key] = mask.reshape(tile * tile, side * side).to(device)
    return _MASKS[key]


def _tiles(
    x: torch.Tensor, count: tuple[int, int], side: int, step: int, offset: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B * ny * nx, side * side, D): square blocks of x (B, D, H, W) (channels-last in
    memory), block (i, j) starting at row i * step + offset, column j * step + offset; copied
    out with D innermost, ready for batched matmuls (into ``out`` when given: passes reuse one
    buffer instead of allocating a fresh one each)."""
    b, d = x.shape[:2]
    sb, sd, sy, sx = x.stride()
    view = x.as_strided(
        (b, *count, side, side, d), (sb, step * sy, step * sx, sy, sx, sd), x.storage_offset() + offset * (sy + sx)
    )
    if out is None or out.shape != (b * count[0] * count[1], side * side, d):
        return view.reshape(-1, side * side, d)
    out.view(view.shape).copy_(view)
    return out


def _overlap_add(windows: torch.Tensor, b: int, count: tuple[int, int], t: int, a: int) -> torch.Tensor:
    """Sum of a x a windows (B * ny * nx, a * a, D) laid at stride T (T < a <= 2T): a
    channels-last (B, D, (ny + 1) T, (nx + 1) T) map. Each window covers its own tile and
    parts of the next ones: its part (i, j) (rows i*T.., columns j*T..) lands on tile
    (y + i, x + j); four strided in-place adds."""
    (ny, nx), d = count, windows.shape[-1]
    out = windows.new_zeros(b, ny + 1, t, nx + 1, t, d)  # (B, H, W, D), tile by tile
    o_b, o_y, o_u, o_x = out.stride()[:4]
    w_x = a * a * d
    w_y, w_b = nx * w_x, ny * nx * w_x
    for i in (0, 1):
        for j in (0, 1):
            rows, cols = (t, a - t)[i], (t, a - t)[j]
            # (B, y, u, x, v, D) views of the output tiles and of the windows' part (i, j).
            shape = (b, ny, rows, nx, cols, d)
            dst = out.as_strided(shape, (o_b, o_y, o_u, o_x, d, 1), out.storage_offset() + i * o_y + j * o_x)
            src = windows.as_strided(
                shape, (w_b, w_y, a * d, w_x, d, 1), windows.storage_offset() + (i * a + j) * t * d
            )
            dst.add_(src)
    return out.view(b, (ny + 1) * t, (nx + 1) * t, d).permute(0, 3, 1, 2)


TILE = 4  # the smallest tile side of the training-time denoising (docs/performance.md)


class _TiledBilateral(torch.autograd.Function):
    """All passes of the bilateral filter with a few batched matmuls per pass (training).

    The map is cut into T x T tiles of centres (T = 4, or twice the reach if larger); each
    tile's window, the (T + 2 reach)^2 block of the padded map around it, holds every
    neighbour of every centre. One batched matmul gives all centre-window dot products, and
    with them the logits -|c - w|^2 / bw^2 up to a per-centre constant the softmax ignores; a
    -inf mask keeps each centre's (2r+1)^2 neighbours, so the weights of the other window cells
    are exactly 0; a second matmul forms the weighted means. The backward pass is one matmul
    and an overlap-add of the windows. About 20 operator calls per pass instead of ~10 per
    neighbour (docs/performance.md); the result equals the reference loop up to fp32 rounding.
    The maps stay channels-last, so the tiles are copied out as rows of D contiguous values.
    As in the reference, the weights carry no gradient.
    """

    @staticmethod
    def forward(ctx, emb, iters, radius, dilations, bandwidth):  # noqa: D102
        b, d, h, w = emb.shape
        x = emb.contiguous(memory_format=torch.channels_last)  # (B, D, h, w), D innermost
        inv = 1.0 / bandwidth**2
        saved, plans, buffers = [], [], {}
        for i in range(iters):
            dil = dilations[i % len(dilations)]
            reach = radius * dil
            t = max(TILE, 2 * reach)  # tile side; windows are a = T + 2R wide, at most 2T
            a = t + 2 * reach
            count = (-(-h // t), -(-w // t))
            ht, wt = count[0] * t, count[1] * t
            # Replicate padding as in the reference, plus up to whole tiles at the bottom and
            # right (centres there are computed and cropped away): (B, D, ht+T, wt+T).
            pad = (reach, reach + wt - w, reach, reach + ht - h)
            padded = F.pad(x, pad, mode="replicate")
            windows = _tiles(padded, count, a, t, out=buffers.get("windows"))  # (n, a^2, D), n = B * tiles
            centres = _tiles(padded, count, t, t, reach, out=buffers.get("centres"))  # (n, T^2, D)
            # (n, T^2, a^2) logits: -|c - w|^2 / bw^2 = (2 c.w - |w|^2) / bw^2 up to the constant
            # -|c|^2 / bw^2 of each centre, which the softmax ignores; -inf off the neighbourhood.
            mask = _neighbour_mask(t, radius, dil, emb.device)  # (T^2, a^2)
            base = mask.sub(torch.linalg.vecdot(windows, windows)[:, None], alpha=inv)
            logits = torch.baddbmm(base, centres, windows.transpose(1, 2), alpha=2 * inv)
            weights = logits.softmax(-1)
            mixed = buffers.get("mixed")
            if mixed is None or mixed.shape != centres.shape:
                mixed = torch.empty_like(centres)
            torch.bmm(weights, windows, out=mixed)  # (n, T^2, D)
            buffers.update(windows=windows, centres=centres, mixed=mixed)
            # (n, T^2, D) -> (B, ht, wt, D) -> a channels-last (B, D, h, w) view.
            out = mixed.view(b, *count, t, t, d).permute(0, 5, 1, 3, 2, 4).reshape(b, d, ht, wt)
            x = out[:, :, :h, :w] if (ht, wt) != (h, w) else out
            saved.append(weights)
            plans.append((t, a, count, pad))
        ctx.save_for_backward(*saved)
        ctx.plans, ctx.shape = plans, emb.shape
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        b, d, h, w = ctx.shape
        # Only the shape and layout of ``like`` are read: channels-last, so that every pass's
        # gradient comes out channels-last for the next one.
        like = torch.empty(b, d, h, w, dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last)
        g, buffers = grad.contiguous(memory_format=torch.channels_last), {}
        for weights, (t, a, count, pad) in zip(reversed(ctx.saved_tensors), reversed(ctx.plans), strict=True):
            ht, wt = count[0] * t, count[1] * t
            if (ht, wt) != (h, w):  # the cropped centres get zero gradient
                g = F.pad(g, (0, wt - w, 0, ht - h))
            tiles = _tiles(g, count, t, t, out=buffers.get("tiles"))  # (n, T^2, D)
            gw = buffers.get("gw")
            if gw is None or gw.shape != (tiles.shape[0], a * a, d):
                gw = tiles.new_empty(tiles.shape[0], a * a, d)
            torch.bmm(weights.transpose(1, 2), tiles, out=gw)  # (n, a^2, D)
            buffers.update(tiles=tiles, gw=gw)
            grad_padded = _overlap_add(gw, b, count, t, a)[:, :, : ht + a - t, : wt + a - t]  # (B, D, ht+2R, wt+2R)
            g = torch.ops.aten.replication_pad2d_backward(grad_padded, like, list(pad))
        return g.contiguous(), None, None, None, None


def _neighbour_dots(
    padded: torch.Tensor, centre: torch.Tensor, offsets: list[tuple[int, int]], reach: int
) -> dict[tuple[int, int], torch.Tensor]:
    """Dot products (B, h, w) of every position of the map inside ``padded`` (B, D, h+2R,
    w+2R) with its neighbour at each offset (padded coordinates, R = ``reach``), given the
    positions' own squared norms ``centre`` (B, h, w), which are the centre offset's.

    Offsets o and -o share one product: the dot of p with p + o is the dot of p + o with its
    neighbour at -o, so one ``vecdot`` over the positions of either (a map a few rows and
    columns larger) gives both, and the centre's needs none: the same products and sums as
    one ``vecdot`` per offset (the sums rounded alike up to the last bit), in about half the
    time."""
    h, w = centre.shape[-2:]
    dots: dict[tuple[int, int], torch.Tensor] = {(reach, reach): centre}
    for dy, dx in offsets:
        if (dy, dx) in dots:
            continue
        oy, ox = dy - reach, dx - reach
        top, left = reach - max(oy, 0), reach - max(ox, 0)  # the positions q of p and of p - o
        hh, ww = h + abs(oy), w + abs(ox)
        near = padded[:, :, top + oy : top + oy + hh, left + ox : left + ox + ww]
        # (B, hh, ww): q's neighbour at o dotted with q, the order of the per-offset product
        both = torch.linalg.vecdot(near, padded[:, :, top : top + hh, left : left + ww], dim=1)
        dots[(dy, dx)] = both[:, reach - top : reach - top + h, reach - left : reach - left + w]
        y, x = reach - oy - top, reach - ox - left  # p's neighbour at -o is q = p - o
        dots[(2 * reach - dy, 2 * reach - dx)] = both[:, y : y + h, x : x + w]
    return dots


def denoise(
    emb: torch.Tensor, *, iters: int, radius: int, bandwidth: float, dilations: tuple[int, ...] = (1,)
) -> torch.Tensor:
    """Feature-space bilateral filtering of emb (B, D, h, w), ``iters`` times: every position
    becomes the average of its (2r+1)^2 neighbourhood, weighted by a softmax over minus squared
    feature distances / bandwidth^2 (no gradient through the weights).

    Pass i samples the neighbourhood with spacing ``dilations[i % len(dilations)]``: radius 1
    with dilations (1, 2) reaches as far as radius 2 in the same number of passes at 9/25 of the
    cost (the student's cheaper head, docs/models.md).

    With gradient recorded (training) the passes run as batched matmuls over tiles
    (``_TiledBilateral``); without (inference) and under ``reference_ops()`` as one small op per
    neighbour, the formulation the inference numerics and the recipes' weights were made with."""
    if iters <= 0 or radius <= 0:
        return emb
    if torch.is_grad_enabled() and not use_reference_ops():
        return _TiledBilateral.apply(emb, iters, radius, tuple(dilations), bandwidth)
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
                dots = _neighbour_dots(padded, centre, offsets, reach)
                dist2 = torch.stack(
                    [sq[:, dy : dy + h, dx : dx + w] + centre - 2 * dots[(dy, dx)] for dy, dx in offsets], 1
                )
            else:
                dist2 = torch.stack(
                    [(padded[:, :, dy : dy + h, dx : dx + w] - emb).square_().sum(1) for dy, dx in offsets], 1
                )
            weights = torch.softmax(dist2.mul_(-1.0 / bandwidth**2), dim=1)
        emb = _WeightedShifts.apply(padded, weights, offsets, h, w)
    return emb


class _EMSteps(torch.autograd.Function):
    """The EM iterations of ``soft_kmeans`` (training): prototypes (B, K, D) from the initial
    ones and x (B, D, N), with a hand-written backward pass.

    Forward: 9 operator calls per iteration (the reference loop takes 17, and autograd about
    40 more in the backward pass; this backward takes 13). The softmax over clusters ignores a
    per-position constant, so |x|^2 is left out of the logits, which are one batched
    multiply-add: (2 mu.x - |mu|^2) / T. A cluster whose mass fell to (near) zero keeps its
    prototype, as in the reference.
    """

    @staticmethod
    def forward(ctx, x, mu, iters, temperature):  # noqa: D102
        xt = x.transpose(1, 2)  # (B, N, D)
        # The mass floor as a tensor: a Python number in a comparison is converted to a tensor
        # on the host at every call (four operator calls).
        floor = x.new_full((), 1e-6)
        saved = []
        for _ in range(iters):
            # (B, K, N) logits up to a per-position constant, then the assignments.
            logits = torch.baddbmm(
                torch.linalg.vecdot(mu, mu)[..., None], mu, x, beta=-1 / temperature, alpha=2 / temperature
            )
            r = logits.softmax(1)
            mass = r.sum(2, keepdim=True)  # (B, K, 1)
            keep = mass > floor
            mass = mass.clamp_min_(1e-6)
            mean = torch.bmm(r, xt).div_(mass)  # (B, K, D)
            saved += [mu, r, mass, keep, mean]
            mu = torch.where(keep, mean, mu)
        ctx.save_for_backward(x, *saved)
        ctx.iters, ctx.temperature = iters, temperature
        return mu

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, *saved = ctx.saved_tensors
        xt, alpha = x.transpose(1, 2), 2 / ctx.temperature
        grad_x = torch.zeros_like(x)
        zero = grad.new_zeros(())  # (a Python 0.0 in ``where`` would be converted at every call)
        for it in reversed(range(ctx.iters)):
            mu, r, mass, keep, mean = saved[5 * it : 5 * it + 5]
            # mu' = where(keep, mean, mu), mean = (r @ x^T) / mass: d mean, then d r.
            grad_mean = torch.where(keep, grad, zero)
            grad_num = grad_mean / mass  # (B, K, D)
            # d r = d num @ x - (d num . mean) (the mass term), as one multiply-add.
            grad_r = torch.baddbmm(torch.linalg.vecdot(grad_num, mean)[..., None], grad_num, x, beta=-1)
            grad_x.baddbmm_(grad_num.transpose(1, 2), r)
            # r = softmax(logits), logits = (2 mu.x - |mu|^2) / T.
            grad_logits = torch._softmax_backward_data(grad_r, r, 1, r.dtype)
            grad_x.baddbmm_(mu.transpose(1, 2), grad_logits, alpha=alpha)
            through = torch.baddbmm(mu * grad_logits.sum(2, keepdim=True), grad_logits, xt, beta=-alpha, alpha=alpha)
            grad = (grad - grad_mean).add_(through)
        return grad_x, grad, None, None


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

    def distance_logits(mu: torch.Tensor) -> torch.Tensor:
        # (B, K, N) squared distances without a (B, K, D, N) intermediate.
        d2 = x2 - 2 * torch.bmm(mu, x) + mu.square().sum(-1, keepdim=True)
        return -d2.clamp_min(0) / temperature

    def assign(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = distance_logits(mu)
        return logits, logits.softmax(1)

    if torch.is_grad_enabled() and not use_reference_ops():
        mu = _EMSteps.apply(x, mu, iters, temperature)
    else:
        for _ in range(iters):
            _, r = assign(mu)  # (B, K, N)
            mass = r.sum(2, keepdim=True)  # (B, K, 1)
            # A cluster that lost all mass keeps its previous prototype instead of dividing by 0.
            mu = torch.where(mass > 1e-6, torch.bmm(r, x.transpose(1, 2)) / mass.clamp_min(1e-6), mu)
    if bias is None and size_prior:
        logits, r = assign(mu)
        bias = size_prior * (r.detach().mean(2) + 1e-6).log()  # (B, K)
    else:  # the assignment without the offsets is not needed
        logits = distance_logits(mu)
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
            pooled = emb
            if self.init_pool > 1 and min(h, w) >= 2 * self.init_pool:
                pooled = F.avg_pool2d(emb, self.init_pool)
            ph, pw = pooled.shape[-2:]
            xp = pooled.reshape(group, bg, d, ph * pw).permute(1, 2, 0, 3).reshape(bg, d, group * ph * pw)
            idx = farthest_point_init(xp, k, fused=torch.is_grad_enabled() and not use_reference_ops())  # (Bg, K)
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
