"""The feature-space bilateral filter of the soft k-means head, in three formulations.

``denoise`` moves every position of an embedding map (B, D, h, w) to the mean of its
(2r+1)^2 neighbours weighted by a softmax over minus squared feature distances / bandwidth^2
(the weights carry no gradient, so the filter is linear in the embeddings for backprop):

* training (gradient recorded, the default): ``_TiledBilateral``, all neighbours of a tile of
  centres in two batched matmuls per pass, with its own backward pass;
* ``reference_ops()``: one small op per neighbour, with autograd through ``_WeightedShifts``
  (one gradient buffer instead of one per offset);
* inference (no gradient): the per-neighbour loop with squared distances as
  |a|^2 + |b|^2 - 2 a.b, mirrored offsets sharing one dot product (``_neighbour_dots``).

The three give the same output up to fp32 rounding; ``tests/test_kernels.py`` checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import fused_training, inference_numerics

__all__ = ["denoise"]


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
    if fused_training():
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
