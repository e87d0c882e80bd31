"""The inference engine: a segmenter on images and rasters of any size, in one piece or window
by window, with memory bounded by the tile size.

    from seglib.raster import segment_raster
    segment_raster("ortho.tif", "labels.tif", k=6, model=model)  # uint8 labels, same CRS/transform
    segment_raster("photo.jpg", "labels.png", k=6, model=model)  # the same route for PNG/JPEG

Every entry point lands here: ``seglib.segment`` (arrays), ``python -m seglib.predict`` and
``segment_raster`` (files: GeoTIFF, PNG, JPEG), evaluation (``predict_probs``). An image whose
sides are at most ``tile`` goes through the model in one piece (``predict_probs``: padded to the
model's stride, cropped back). A larger one is never read whole:

1. **Band policy, decided once.** The window reader (``seglib.io``: ``RasterSource`` for files
   GDAL reads, ``ArraySource`` for arrays) measures one ``BandStretch`` from a decimated overview
   and applies it to every window, so windows do not get their own brightness.
2. **Global clusters.** The window grid of step 3 is sampled (a seeded subset spread over the
   raster, up to ``fit_windows`` windows and ``fit_pixels`` pixels) and ``model.fit_clusters``
   fits one set of K prototypes (and the head's size-prior offsets) jointly over them. Every
   window is then assigned to those clusters, so cluster ``i`` means the same thing everywhere.
3. **Overlapping windows, blended.** Windows of ``tile`` pixels (a multiple of the model's
   stride) overlap by at least ``overlap`` pixels; their starts are spread evenly and snapped to
   the stride so the model's pixel grid lines up with the whole-image grid. Each window's
   probabilities are weighted by a separable cosine taper that falls towards every side that
   has a neighbour, and the weights are normalised to sum to one at every pixel, so the blend is
   a convex combination with no visible seams.
4. **Incremental output.** The raster is cut into cells by all window edges and wherever a
   window's weight changes between zero, a taper and one (``_axis_plan``). A cell that one
   window has all the weight of takes that window's labels at once; a window adds nothing to a
   cell where its weight is zero; the other cells are finished once the last window with weight
   there has been added. Their argmax labels go into a row buffer that is written out (GeoTIFF
   rows, or a caller's array) as soon as its row of cells is complete.
5. **Labels without full-resolution maps.** When only labels are wanted, a ``Segmenter`` hands
   back its probabilities before the lane's last bilinear upsampling (``upsample=False``; 1/4 of
   the resolution for the bundled student) and ``WindowProbs`` labels the window's own cells
   from there: a pixel whose four source cells agree on the most probable cluster has it as its
   label, and only the blocks at label edges are interpolated. Blended cells get their
   full-resolution probabilities by upsampling just their part (the same values). The windows
   sampled for the fit keep what the head clustered for them, so the pass over the raster does
   not encode them again.

Peak memory is the larger of the prototype fit (at most ``fit_pixels`` of windows) and one
window's forward pass, plus the blended probabilities still waiting for a neighbour (about
K x overlap x raster width floats), one row of uint8 labels (tile x raster width) and GDAL's block
cache (capped while ``segment_raster`` runs); docs/inference.md has measured numbers.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import check_k, check_lane
from .io import GEOTIFF_SUFFIXES, ArraySource, RasterSource, open_source, temporary_path, valid_box, write_png
from .models.head import Clusters, brightness_order
from .models.segmenter import Segmenter
from .stages import RowWriter, ordered_map, prefetch, timed
from .viz import PALETTE, progress_bar

__all__ = [
    "DEFAULT_TILE",
    "DEFAULT_OVERLAP",
    "to_tensor",
    "model_stride",
    "pad_to_stride",
    "predict_probs",
    "predict_labels",
    "check_tiling",
    "argmax_labels",
    "NODATA",
    "axis_windows",
    "axis_weights",
    "fit_clusters",
    "iter_blended",
    "segment_source",
    "segment_array",
    "segment_raster",
]

log = logging.getLogger("seglib.raster")

Source = ArraySource | RasterSource
# A window read for the fit: uint8 (3, h, w), its valid mask, and what the model's head clustered
# for it ((1, D, h', w'), ``Segmenter.clustered_embeddings``) or None.
FitWindow = tuple[np.ndarray, np.ndarray | None, torch.Tensor | None]
Layout = tuple[int, list[int], int, list[int], int]  # stride, row starts, window height, column starts, width

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 128
FIT_PIXELS = 4 << 20  # pixels of the sampled windows the clusters are fitted on, at most
NODATA = 255  # the label of masked (nodata) pixels, outside every K's labels 0..K-1
GDAL_CACHE_MB = 64  # GDAL's block cache in MiB (default: 5% of RAM) while a raster is segmented


# ----------------------------------------------------------------------------- one piece


def model_stride(model: torch.nn.Module, downsample: int | None = None) -> int:
    """The multiple H and W must have for ``model`` (4 for the teacher, 16 for the student),
    times the downsample factor."""
    base = getattr(model, "input_multiple", 4)
    ds = downsample if downsample is not None else getattr(getattr(model, "config", None), "downsample", 1)
    return base * (ds or 1)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 or float in [0, 1] -> (1, 3, H, W) float32."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]


def pad_to_stride(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad (B, 3, h, w) at the bottom/right up to multiples of ``multiple`` (replicate
    when a side is too short to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_valid(valid: torch.Tensor | None, multiple: int) -> torch.Tensor | None:
    """Pad a (B, h, w) bool mask like ``pad_to_stride`` pads the image: the padding is not data."""
    if valid is None:
        return None
    h, w = valid.shape[-2:]
    return F.pad(valid, (0, (-w) % multiple, 0, (-h) % multiple), value=False)


def _valid_tensor(valid: np.ndarray | None) -> torch.Tensor | None:
    return None if valid is None else torch.from_numpy(np.ascontiguousarray(valid))[None]  # (1, h, w)


@torch.no_grad()
def _forward(model: torch.nn.Module, rgb: torch.Tensor, k: int, **kwargs) -> dict[str, torch.Tensor]:
    h, w = rgb.shape[-2:]
    multiple = model_stride(model, kwargs.get("downsample"))
    x = pad_to_stride(rgb.to(_device(model)), multiple)
    if kwargs.get("valid") is not None:
        kwargs["valid"] = pad_valid(kwargs["valid"], multiple)
    out = model(x, k, **kwargs)
    out["probs"] = out["probs"][..., :h, :w]
    if kwargs.get("clusters") is None:  # clusters fitted here, per image: stable ids
        _renumber(out)
    return out


def _renumber(out: dict[str, torch.Tensor]) -> None:
    """Put each image's clusters in the stable order (``brightness_order``), in place."""
    orders = [brightness_order(p) for p in out["prototypes"]]
    if all(order == sorted(order) for order in orders):
        return
    index = torch.as_tensor(orders, device=out["prototypes"].device)  # (B, K)
    for key in ("probs", "logits", "probs_coarse", "prototypes", "cluster_bias"):
        t = out.get(key)
        if t is not None:
            out[key] = t.gather(1, index.view(*index.shape, *[1] * (t.ndim - 2)).expand_as(t))


def predict_probs(model: torch.nn.Module, rgb: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
    """Probabilities (B, K, H, W) for rgb (B, 3, H, W) of any size, in one piece: padded up to
    the model's stride, cropped back. ``kwargs`` are the model's per-call overrides."""
    return _forward(model, rgb, k, **kwargs)["probs"]


def predict_labels(model: torch.nn.Module, image: np.ndarray, k: int, **kwargs) -> np.ndarray:
    """Labels (H, W) int64 for one (H, W, 3) image, in one piece."""
    return predict_probs(model, to_tensor(image), k, **kwargs)[0].argmax(0).cpu().numpy()


# ----------------------------------------------------------------------------- window layout


def axis_windows(size: int, tile: int, overlap: int, multiple: int) -> tuple[list[int], int]:
    """Window starts along one axis of ``size`` pixels, and the window length.

    Windows are ``tile`` long (the whole axis when it is shorter) and overlap by at least
    ``overlap``. Every start is a multiple of ``multiple`` (the model's input stride), so each
    window sees the whole image's pixel grid and computes the same features: a window shifted
    by a pixel off that grid changes the labels of a few percent of the pixels. The last window
    therefore ends at or up to ``multiple - 1`` pixels past ``size``; readers clip it and the
    model pads it the way it pads the whole image (``pad_to_stride``).
    """
    if size <= tile:
        return [0], size
    last = -(-(size - tile) // multiple) * multiple
    # n windows spaced about (last / (n - 1)) apart; one ``multiple`` of slack keeps the overlap
    # >= ``overlap`` after the starts are rounded down to the stride.
    n = max(2, math.ceil(last / max(1, tile - overlap - multiple)) + 1)
    step = last / (n - 1)
    starts = sorted({int(i * step) // multiple * multiple for i in range(n - 1)} | {last})
    return starts, tile


def _ramp(n: int) -> np.ndarray:
    """Cosine rise over n pixels, strictly inside (0, 1); ramp + its mirror == 1."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)


def _taper(a: int) -> np.ndarray:
    """Weights (a,) of a window across an overlap of ``a`` pixels, entering at index 0: zero
    over the outer third (where the CNN's receptive field reaches the window's padding and
    its features differ from the whole image's), a cosine rise over the middle third, one
    over the inner third. ``_taper(a) + _taper(a)[::-1] == 1``."""
    margin = a // 3
    return np.concatenate([np.zeros(margin), _ramp(a - 2 * margin), np.ones(margin)])


def axis_weights(starts: list[int], length: int, size: int) -> list[np.ndarray]:
    """Blend weights (length,) of each window along one axis; they sum to 1 at every pixel
    below ``size`` (a last window reaching past ``size`` has weights there that are never used).

    Each window tapers over its overlap with each neighbour (at most half its length) and
    ignores the outer third of it, so a pixel's label comes from windows in which it sits away
    from the border, where the CNN sees padding.
    """
    raw = []
    for i, s in enumerate(starts):
        w = np.ones(length)
        if i > 0:
            a = min(starts[i - 1] + length - s, length // 2)
            w[:a] *= _taper(a)
        if i < len(starts) - 1:
            a = min(s + length - starts[i + 1], length // 2)
            w[length - a :] *= _taper(a)[::-1]
        raw.append(w)
    total = np.zeros(max(size, starts[-1] + length))
    for s, w in zip(starts, raw, strict=True):
        total[s : s + length] += w
    return [(w / total[s : s + length]).astype(np.float32) for s, w in zip(starts, raw, strict=True)]


def check_tiling(tile: int, overlap: int, multiple: int) -> int:
    """The tile rounded up to the stride; ValueError for unusable tile/overlap."""
    if isinstance(tile, bool) or not isinstance(tile, int) or isinstance(overlap, bool) or not isinstance(overlap, int):
        raise ValueError(f"tile and overlap must be integers, got {tile!r} and {overlap!r}")
    tile = -(-tile // multiple) * multiple
    if tile < 4 * multiple:
        raise ValueError(f"tile must be at least {4 * multiple} px for this model (stride {multiple}), got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be in 0..tile/2 = 0..{tile // 2}, got {overlap}; e.g. overlap={tile // 8}")
    return tile


# ----------------------------------------------------------------------------- segmentation


def _bands_tensor(bands: np.ndarray) -> torch.Tensor:
    """uint8 (3, h, w) -> (1, 3, h, w) float32 in [0, 1]: the values ``to_tensor`` gives, in the
    layout the model takes (no transpose). NumPy, not torch: it runs in the reader thread, where
    a torch op would start a second OpenMP team beside the model's and oversubscribe the cores."""
    x = bands.astype(np.float32)
    x /= 255.0
    return torch.from_numpy(x)[None]


def argmax_labels(probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (h, w) index of the largest of the K values (K, h, w), the first one on ties.

    ``torch.max`` over K, not ``np.argmax``: the model's probabilities come out channels-last
    (the fast lane's layout), where NumPy's argmax over K is several times slower."""
    return torch.as_tensor(probs).max(0).indices.to(torch.uint8).numpy()


def _layout(model: torch.nn.Module, source: Source, tile: int, overlap: int) -> Layout:
    """(stride, row starts, window height, column starts, window width) of the window grid
    (``tile`` as ``check_tiling`` returns it)."""
    m = model_stride(model)
    ys, lh = axis_windows(source.height, tile, overlap, m)
    xs, lw = axis_windows(source.width, tile, overlap, m)
    return m, ys, lh, xs, lw


def _fit_sample(layout: Layout, fit_windows: int, fit_pixels: int, seed: int) -> list[tuple[int, int]]:
    """The (y, x) starts of the windows the clusters are fitted on (see ``fit_clusters``)."""
    _, ys, lh, xs, lw = layout
    grid = [(y, x) for y in ys for x in xs]
    n = max(1, min(fit_windows, len(grid), fit_pixels // (lh * lw)))
    edges = np.linspace(0, len(grid), n + 1).astype(int)
    rng = np.random.default_rng(seed)
    pick = [int(rng.integers(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [grid[i] for i in pick]


@torch.no_grad()
def _fit(
    model: torch.nn.Module,
    source: Source,
    k: int,
    layout: Layout,
    *,
    fit_windows: int,
    fit_pixels: int,
    seed: int,
    times: dict[str, float] | None = None,
) -> tuple[Clusters, dict[tuple[int, int], FitWindow]]:
    """The clusters of ``fit_clusters``, and the windows read for them by (y, x), with what the
    head clustered for each (``FitWindow``): the pass over the raster neither reads them again
    nor runs the encoder on them again, only the assignment to the clusters and the refinement.

    Nodata pixels are left out of the fit; a sampled window without a valid pixel is replaced
    by the next window (in a seeded order) that has one."""
    m, ys, lh, xs, lw = layout
    sample = _fit_sample(layout, fit_windows, fit_pixels, seed)
    grid = [(y, x) for y in ys for x in xs]
    spare = [grid[i] for i in np.random.default_rng(seed).permutation(len(grid)) if grid[i] not in sample]
    reads: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    with timed(times, "read"):
        for y, x in sample:
            while True:
                rgb, valid = source.read_masked(y, x, min(lh, source.height - y), min(lw, source.width - x))
                if valid is None or valid.any():
                    reads[(y, x)] = (rgb, valid)
                    break
                if not spare:  # every window left is nodata
                    break
                y, x = spare.pop(0)  # all nodata: another window instead
    if not reads:
        raise ValueError(f"{Path(source.name).name}: no valid pixels (all nodata or masked); nothing to segment")
    with timed(times, "fit"):
        batch = torch.cat([pad_to_stride(_bands_tensor(rgb), m) for rgb, _ in reads.values()])  # (N, 3, lh, lw)
        valid = None
        if any(v is not None for _, v in reads.values()):
            masks = [np.ones(rgb.shape[1:], bool) if v is None else v for rgb, v in reads.values()]
            valid = torch.cat([pad_valid(_valid_tensor(v), m) for v in masks]).to(_device(model))  # (N, lh, lw)
        masked = {} if valid is None else {"valid": valid}  # models without nodata support still work
        batch = batch.to(_device(model))
        clustered = None
        if isinstance(model, Segmenter):  # kept for the pass: (N, D, h', w')
            masked["clustered"] = clustered = model.clustered_embeddings(batch)
        clusters = model.fit_clusters(batch, k, **masked).ordered()
    windows = {
        key: (rgb, v, None if clustered is None else clustered[i : i + 1])
        for i, (key, (rgb, v)) in enumerate(reads.items())
    }
    return clusters, windows


def fit_clusters(
    model: torch.nn.Module,
    source: Source,
    k: int,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    fit_windows: int = 16,
    fit_pixels: int = FIT_PIXELS,
    seed: int = 0,
) -> Clusters:
    """Clusters (prototypes (1, K, D) and size-prior offsets) fitted jointly over a seeded,
    spread-out sample of the window grid, in the stable order (``Clusters.ordered``).

    Up to ``fit_windows`` windows of the tile size, but no more than ``fit_pixels`` pixels in
    all: the fit holds every sampled window in the model at once, so this budget bounds its
    memory. The grid is split into that many equal runs (row-major) and one window is drawn
    from each, so the sample covers the whole raster. ``tile`` as ``check_tiling`` returns it.
    """
    layout = _layout(model, source, tile, overlap)
    return _fit(model, source, k, layout, fit_windows=fit_windows, fit_pixels=fit_pixels, seed=seed)[0]


def _axis_plan(
    starts: list[int], length: int, size: int
) -> tuple[list[np.ndarray], list[int], list[list[int]], list[int | None], list[int]]:
    """How the windows along one axis share it: (blend weights of each window, cell edges,
    the cells each window has weight in, the one window a cell takes all its weight from (or
    None where windows blend), the last window with weight in each cell).

    Cells are cut at the window edges and wherever a window's weight changes between zero,
    one and in between, so each window's weight in a cell is all zero, all one or a taper. A
    window adds nothing to a cell where its weight is zero (the outer third of an overlap,
    ``axis_weights``), and a cell where one window has all the weight takes that window's
    probabilities as they are: only the cells where weights taper are blended."""
    weights = axis_weights(starts, length, size)
    cuts = {0, size}
    for s, w in zip(starts, weights, strict=True):
        end = min(s + length, size)
        v = w[: end - s]
        kind = (v > 0).astype(np.int8) + (v == 1)  # 0: no weight, 1: a taper, 2: all of it
        cuts.update((s, end, *(s + np.flatnonzero(np.diff(kind)) + 1).tolist()))
    edges = sorted(cuts)
    n = len(edges) - 1
    cells: list[list[int]] = [[] for _ in starts]
    contributors: list[list[int]] = [[] for _ in range(n)]
    for r, (s, w) in enumerate(zip(starts, weights, strict=True)):
        for i in range(n):
            if s <= edges[i] and edges[i + 1] <= s + length and w[edges[i] - s : edges[i + 1] - s].any():
                cells[r].append(i)
                contributors[i].append(r)
    # The weights sum to one, so a cell's only contributor has weight exactly one there.
    sole = [rs[0] if len(rs) == 1 else None for rs in contributors]
    return weights, edges, cells, sole, [rs[-1] for rs in contributors]


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers in sorted ``indices`` as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


class WindowProbs:
    """A window's probabilities (K, H, W), held as the model returned them: at full resolution,
    or at 1/f of it (``forward(..., upsample=False)``) with the last bilinear step done for each
    region that asks for it.

    ``probs(ys, xs)`` gives the full-resolution probabilities of a region: the bilinear
    upsampling of the low-resolution rows and columns around it (one cell of margin), the
    values the whole window's upsampling has there (bit for bit for the fast lane's output,
    channels-last with f a power of two; else up to the last bit). ``labels(ys, xs)`` gives the region's
    argmax labels without the full-resolution maps where it can: each output pixel mixes (up
    to) four low-resolution cells with convex weights, so where those four agree on the most
    probable cluster it is the pixel's label (the same rounding for every cluster keeps that
    exact); only the f x f blocks of pixels whose four cells disagree are interpolated (one
    small matrix product) and their argmax taken.
    """

    def __init__(self, probs: torch.Tensor, size: tuple[int, int]):
        k, h, w = probs.shape
        f = size[0] // h if h else 0
        if (h, w) != tuple(size) and not (f >= 2 and (h * f, w * f) == tuple(size)):
            probs = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
            f = 1
        self.p, self.f, self.size = probs, max(f, 1), tuple(size)
        self._labels: np.ndarray | None = None  # (h + 2, w + 2) low-resolution argmax, edge-replicated
        self._padded: torch.Tensor | None = None  # (K, (h + 2) * (w + 2)) probabilities, edge-replicated

    def probs(self, ys: slice, xs: slice) -> torch.Tensor:
        """(K, ys, xs) full-resolution probabilities of a region (window coordinates)."""
        f, p = self.f, self.p
        if f == 1:
            return p[:, ys, xs]
        h, w = p.shape[-2:]
        top, left = max(0, ys.start // f - 1), max(0, xs.start // f - 1)
        bottom, right = min(h, -(-ys.stop // f) + 1), min(w, -(-xs.stop // f) + 1)
        crop = p[None, :, top:bottom, left:right]
        # The layout the model's own upsampling would have read (its kernel rounds alike then).
        layout = torch.channels_last if p[None].is_contiguous(memory_format=torch.channels_last) else None
        crop = crop.contiguous(memory_format=layout or torch.contiguous_format)
        up = F.interpolate(crop, size=((bottom - top) * f, (right - left) * f), mode="bilinear", align_corners=False)
        return up[0, :, ys.start - top * f : ys.stop - top * f, xs.start - left * f : xs.stop - left * f]

    def labels(self, ys: slice, xs: slice) -> np.ndarray:
        """uint8 (ys, xs) argmax labels of a region, first index on ties (``argmax_labels``)."""
        f = self.f
        if f == 1:
            return argmax_labels(self.p[:, ys, xs])
        k, h, w = self.p.shape
        if self._labels is None:
            low = self.p.max(0).indices.to(torch.uint8).numpy()  # (h, w)
            self._labels = np.pad(low, 1, mode="edge")
        # Pixel y samples rows i0, i0 + 1 of the edge-padded map, i0 = floor((y + 0.5) / f + 0.5):
        # blocks of f pixels, the first starting ``o`` pixels above the image.
        o = (f + 1) // 2
        b0, b1 = (ys.start + o) // f, (ys.stop - 1 + o) // f + 1  # block rows
        c0, c1 = (xs.start + o) // f, (xs.stop - 1 + o) // f + 1
        lab = self._labels[b0 : b1 + 1, c0 : c1 + 1]
        corner = lab[:-1, :-1]
        same = (corner == lab[:-1, 1:]) & (corner == lab[1:, :-1]) & (corner == lab[1:, 1:])
        blocks = np.where(same, corner, np.uint8(0)).repeat(f, 0).repeat(f, 1)  # (blocks * f, blocks * f)
        bi, bj = np.nonzero(~same)
        if len(bi):
            if self._padded is None:
                self._padded = F.pad(self.p[None], (1, 1, 1, 1), mode="replicate")[0].contiguous().view(k, -1)
            wp = w + 2
            index = torch.from_numpy(((bi + b0) * wp + bj + c0)[:, None] + np.array([0, 1, wp, wp + 1]))  # (N, 4)
            corners = self._padded[:, index].reshape(-1, 4)  # (K * N, 4): rows i0, i0 + 1 x columns
            lam = (torch.arange(f, dtype=torch.float32) - o + 0.5) / f + 0.5  # (f,) weight of row/column i0 + 1
            wy = torch.stack([1 - lam, lam], 1)  # (f, 2)
            mix = (wy[:, None, :, None] * wy[None, :, None, :]).reshape(f * f, 4).T  # (4, f * f)
            values = (corners @ mix).view(k, -1)  # (K, N * f * f)
            sub = values.max(0).indices.to(torch.uint8).numpy().reshape(-1, f, f)
            blocks.reshape(b1 - b0, f, c1 - c0, f)[bi, :, bj, :] = sub
        y0, x0 = ys.start - (b0 * f - o), xs.start - (c0 * f - o)
        return blocks[y0 : y0 + ys.stop - ys.start, x0 : x0 + xs.stop - xs.start]


@torch.no_grad()
def _cells(
    model: torch.nn.Module,
    source: Source,
    k: int,
    clusters: Clusters,
    layout: Layout,
    *,
    lane: str | None,
    want_probs: bool,
    progress: bool,
    cache: dict[tuple[int, int], FitWindow] | None = None,
    times: dict[str, float] | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """Yield ``(y, x, labels (h, w) uint8, probs (K, h, w) or None)`` for every finished cell.

    Windows are read (and stretched) one or two ahead in a background thread while the model
    runs. Cells are cut by ``_axis_plan``: a cell that one window has all the weight of takes
    that window's labels (and probabilities); the others accumulate their windows' weighted
    probabilities until the last window with weight there has been added, and a window adds
    nothing where its weight is zero. Without ``want_probs`` the model's probabilities stay at
    the resolution its last bilinear step starts from (``WindowProbs``): labels come from there,
    full-resolution maps only for the blended cells. The worker threads label their window's
    own cells and weight its share of the blended ones. Nodata pixels get the label ``NODATA``.
    """
    m, ys, lh, xs, lw = layout
    wy, cuts_y, rows_of, sole_y, last_row = _axis_plan(ys, lh, source.height)
    wx, cuts_x, cols_of, sole_x, last_col = _axis_plan(xs, lw, source.width)
    wy = [torch.from_numpy(w) for w in wy]
    wx = [torch.from_numpy(w) for w in wx]
    device = _device(model)
    clusters = clusters.to(device)
    cache = {} if cache is None else cache
    # Leave the last upsampling to the cells (WindowProbs) when only labels are wanted; the
    # windows are made here from uint8 pixels, so their values need no check.
    low = {} if not isinstance(model, Segmenter) else {"upsample": want_probs, "check_values": False}

    def windows() -> Iterator[tuple]:  # the reader thread
        for r, y in enumerate(ys):
            for c, x in enumerate(xs):
                h, w = min(lh, source.height - y), min(lw, source.width - x)  # the last may stick out
                with timed(times, "read"):
                    rgb, valid, clustered = cache.pop((y, x), None) or (*source.read_masked(y, x, h, w), None)
                    tensor = pad_to_stride(_bands_tensor(rgb), m)  # (1, 3, lh, lw)
                yield r, c, h, w, tensor, valid, clustered

    @torch.no_grad()  # grad mode is per thread: a worker thread must switch it off itself
    def run(window: tuple) -> tuple[list, dict]:  # the model on one window, in a worker thread
        r, c, _, _, rgb, valid, clustered = window
        y, x = ys[r], xs[c]
        kept = {} if clustered is None else {"clustered": clustered}  # a fit window: the encoder ran in the fit
        out = model(rgb.to(device), k, lane=lane, clusters=clusters, **low, **kept)["probs"]  # (1, K, lh, lw) or 1/f
        probs = WindowProbs(out[0].float().cpu(), tuple(rgb.shape[-2:]))
        own, parts = [], {}
        # The cells this window has all the weight of: one rectangle per run, labelled at once.
        for i0, i1 in _runs([i for i in rows_of[r] if sole_y[i] == r]):
            for j0, j1 in _runs([j for j in cols_of[c] if sole_x[j] == c]):
                ry = slice(cuts_y[i0] - y, cuts_y[i1 + 1] - y)
                rx = slice(cuts_x[j0] - x, cuts_x[j1 + 1] - x)
                labels = probs.labels(ry, rx)
                if valid is not None:
                    labels[~valid[ry, rx]] = NODATA
                for i in range(i0, i1 + 1):
                    for j in range(j0, j1 + 1):
                        cy = slice(cuts_y[i] - y, cuts_y[i + 1] - y)
                        cx = slice(cuts_x[j] - x, cuts_x[j + 1] - x)
                        cell = labels[
                            cy.start - ry.start : cy.stop - ry.start, cx.start - rx.start : cx.stop - rx.start
                        ]
                        own.append((cuts_y[i], cuts_x[j], cell, probs.probs(cy, cx).numpy() if want_probs else None))
        for i in rows_of[r]:
            for j in cols_of[c]:
                if sole_y[i] == r and sole_x[j] == c:
                    continue
                cy, cx = slice(cuts_y[i] - y, cuts_y[i + 1] - y), slice(cuts_x[j] - x, cuts_x[j + 1] - x)
                parts[(i, j)] = probs.probs(cy, cx) * (wy[r][cy, None] * wx[c][None, cx])  # (K, ch, cw), weighted
        return own, parts

    pending: dict[tuple[int, int], torch.Tensor] = {}  # cell -> blended probs so far (K, ch, cw)
    workers, threads = _model_workers(device)
    bar = progress_bar(total=len(ys) * len(xs), desc="windows", unit="win", disable=not progress)
    with bar, torch_threads(threads):
        windows_read = prefetch(windows(), depth=2, times=times)
        labelled = ordered_map(run, windows_read, workers=workers, times=times, stage="model")
        for (r, c, _, _, _, valid, _), (done, parts) in labelled:
            y, x = ys[r], xs[c]
            with timed(times, "blend"):
                for (i, j), part in parts.items():
                    acc = pending.get((i, j))
                    if acc is None:
                        pending[(i, j)] = acc = part
                    else:
                        acc += part
                    if last_row[i] == r and last_col[j] == c:
                        del pending[(i, j)]
                        labels = argmax_labels(acc)
                        if valid is not None:  # the cell's pixels, as every window covering it reads them
                            cy, cx = slice(cuts_y[i] - y, cuts_y[i + 1] - y), slice(cuts_x[j] - x, cuts_x[j + 1] - x)
                            labels[~valid[cy, cx]] = NODATA
                        done.append((cuts_y[i], cuts_x[j], labels, acc.numpy() if want_probs else None))
                done.sort(key=lambda cell: cell[:2])  # rows of cells finish top to bottom
            yield from done
            bar.update()


MODEL_WORKERS = 2  # windows through the model at once on a CPU, each with its share of the threads


def _model_workers(device: torch.device) -> tuple[int, int]:
    """(windows through the model at once, torch threads each) for the windowed pass.

    On a CPU, two windows at once with half the threads each: the models' convolutions scale
    poorly from one thread to two (the bundled student: 1.25x), while two windows side by side
    keep both cores busy. One window with every thread on a GPU, or with a single thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return 1, threads
    workers = min(MODEL_WORKERS, threads)
    return workers, threads // workers


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` meanwhile (process-wide), restored afterwards."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def iter_blended(
    model: torch.nn.Module,
    source: Source,
    k: int,
    clusters: Clusters,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    lane: str | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(y, x, probs (K, h, w))`` for every finished cell of the blended probabilities.

    Cells are cut by all window edges; rows of cells finish top to bottom. Only cells still
    waiting for a later window are held in memory. ``tile`` as ``check_tiling`` returns it.
    """
    layout = _layout(model, source, tile, overlap)
    for y, x, _, probs in _cells(model, source, k, clusters, layout, lane=lane, want_probs=True, progress=progress):
        yield y, x, probs


class _Box:
    """The part (top, left, bottom, right) of a source, read like a source of its own."""

    def __init__(self, source: Source, box: tuple[int, int, int, int]):
        self.source, (self.top, self.left, bottom, right) = source, box
        self.height, self.width = bottom - self.top, right - self.left
        self.name, self.stretch, self.profile = source.name, source.stretch, source.profile

    def read_masked(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.source.read_masked(self.top + y, self.left + x, h, w)

    def read_bands(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.read_masked(y, x, h, w)[0]


def _segment_box(
    model: torch.nn.Module,
    source: Source,
    k: int,
    box: tuple[int, int, int, int],
    *,
    write_rows: Callable[[int, np.ndarray], None],
    probs_out: np.ndarray | None,
    **options,
) -> Clusters:
    """``segment_source`` on the box around the source's valid pixels: outside it everything is
    nodata, so it is written as ``NODATA`` without being read, and the model's grid starts at
    the data (a scene in a nodata collar is segmented as the scene alone would be)."""
    top, left, bottom, right = box
    height, width = source.height, source.width

    def nodata_rows(start: int, stop: int) -> None:
        for y in range(start, stop, DEFAULT_TILE):
            write_rows(y, np.full((min(DEFAULT_TILE, stop - y), width), NODATA, np.uint8))

    def write_inner(y: int, rows: np.ndarray) -> None:
        full = np.full((rows.shape[0], width), NODATA, np.uint8)
        full[:, left:right] = rows
        write_rows(top + y, full)

    log.info("%s: segmenting the data's extent, rows %d-%d, columns %d-%d", Path(source.name).name, *box)
    inner_probs = None
    if probs_out is not None:
        probs_out[:] = 0  # nodata pixels have no probabilities
        inner_probs = probs_out[:, top:bottom, left:right]
    nodata_rows(0, top)
    clusters = segment_source(model, _Box(source, box), k, write_rows=write_inner, probs_out=inner_probs, **options)
    nodata_rows(bottom, height)
    return clusters


def _cell_size(model: torch.nn.Module) -> int:
    """Side in pixels of the cells the head clusters (stride 4 of the possibly downsampled input)."""
    return 4 * model_stride(model) // getattr(model, "input_multiple", 4)


def _warn_small(model: torch.nn.Module, height: int, width: int, k: int, name: str) -> None:
    """Warn when an image has fewer of the model's cells than K: fewer labels must come out."""
    size = _cell_size(model)
    cells = math.ceil(height / size) * math.ceil(width / size)
    if cells < k:
        log.warning(
            "%s: %d x %d px is only %d cells of %d x %d px, the grid the model clusters, fewer than K = %d: "
            "at most %d labels can come out; use a smaller K or a larger image",
            Path(name).name, width, height, cells, size, size, k, cells,
        )  # fmt: skip


def _warn_fewer_labels(labels: np.ndarray, k: int, name: str) -> None:
    """Warn when an image's labels use fewer than K ids (a one-piece image: cheap to count)."""
    used = int((np.bincount(labels.ravel(), minlength=256)[:k] > 0).sum())
    if 0 < used < k:
        log.warning(
            "%s: only %d of K = %d labels came out: the image holds fewer distinct segments than K at "
            "the model's scale (clusters that no pixel is closest to stay empty); try a smaller K",
            Path(name).name, used, k,
        )  # fmt: skip


def segment_source(
    model: torch.nn.Module,
    source: Source,
    k: int,
    *,
    write_rows: Callable[[int, np.ndarray], None],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    lane: str | None = None,
    clusters: Clusters | None = None,
    fit_windows: int = 16,
    fit_pixels: int = FIT_PIXELS,
    seed: int = 0,
    probs_out: np.ndarray | None = None,
    progress: bool = False,
    times: dict[str, float] | None = None,
) -> Clusters:
    """Segment ``source``; returns the clusters it used. A source no larger than ``tile`` on
    either side (and no ``clusters`` given) goes through the model in one piece, a larger one
    window by window.

    Arguments:
      write_rows: called as ``write_rows(y, labels)`` with uint8 labels (h, width) for rows
        y..y+h, top to bottom, as soon as they are final.
      clusters: fitted with ``fit_clusters`` from sampled windows when None.
      probs_out: optional (K, H, W) float32 array that receives the (blended) probabilities.
      times: optional dict that collects seconds per stage (read, fit, model, blend; the
        reader runs in its own thread, so the stages overlap).
    """
    tile = check_tiling(tile, overlap, model_stride(model))
    box = getattr(source, "valid_box", None)
    if box is not None and box != (0, 0, source.height, source.width):
        return _segment_box(
            model, source, k, box, write_rows=write_rows, tile=tile, overlap=overlap, lane=lane, clusters=clusters,
            fit_windows=fit_windows, fit_pixels=fit_pixels, seed=seed, probs_out=probs_out, progress=progress,
            times=times,
        )  # fmt: skip
    for note in source.stretch.notes:
        log.info("%s: %s", Path(source.name).name, note)
    layout = _layout(model, source, tile, overlap)
    _warn_small(model, source.height, source.width, k, source.name)
    if clusters is None and max(source.height, source.width) <= tile:
        with timed(times, "read"):
            rgb, valid = source.read_masked(0, 0, source.height, source.width)
        with timed(times, "model"):
            masked = {} if valid is None else {"valid": _valid_tensor(valid)}
            out = _forward(model, _bands_tensor(rgb), k, lane=lane, **masked)
            probs = out["probs"][0].float().cpu().numpy()  # (K, H, W)
        with timed(times, "blend"):
            if probs_out is not None:
                probs_out[:] = probs
            labels = argmax_labels(probs)
            if valid is not None:
                labels[~valid] = NODATA
        _warn_fewer_labels(labels, k, source.name)
        write_rows(0, labels)
        bias = out["cluster_bias"]
        return Clusters(out["prototypes"][:1], None if bias is None else bias[:1])
    cache = None
    if clusters is None:
        clusters, cache = _fit(
            model, source, k, layout, fit_windows=fit_windows, fit_pixels=fit_pixels, seed=seed, times=times
        )
    rows: dict[int, list] = {}  # y -> [labels (h, width) uint8, columns filled]
    for y, x, labels, probs in _cells(
        model,
        source,
        k,
        clusters,
        layout,
        lane=lane,
        want_probs=probs_out is not None,
        progress=progress,
        cache=cache,
        times=times,
    ):
        with timed(times, "blend"):
            h, w = labels.shape
            if probs_out is not None:
                probs_out[:, y : y + h, x : x + w] = probs
            row = rows.setdefault(y, [np.empty((h, source.width), np.uint8), 0])
            row[0][:, x : x + w] = labels
            row[1] += w
        if row[1] == source.width:
            write_rows(y, rows.pop(y)[0])
    return clusters


def segment_array(
    model: torch.nn.Module,
    image: np.ndarray,
    k: int,
    *,
    lane: str | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    return_probs: bool = False,
    clusters: Clusters | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Labels (H, W) uint8 (and probabilities (K, H, W) float32) of an (H, W, 3) uint8 or
    float [0, 1] image: in one piece up to ``tile`` (float pixels used as they are), else window
    by window (``segment_source`` on an ``ArraySource``). ``clusters``: assign to these (fitted
    once, e.g. on many images) instead of fitting the image's own. ``mask`` (H, W) bool, True
    where the pixel is data: the others are left out of the clusters and labelled ``NODATA``,
    and the box around the data is segmented on its own (as ``segment_source`` does for files:
    the model's grid starts at the data)."""
    h, w = image.shape[:2]
    if mask is not None and mask.all():
        mask = None
    if max(h, w) <= tile:
        box = (0, 0, h, w) if mask is None else valid_box(mask)
        if box != (0, 0, h, w):  # the box around the data alone, as segment_source does for files
            top, left, bottom, right = box
            inner = segment_array(
                model, image[top:bottom, left:right], k, lane=lane, tile=tile, overlap=overlap,
                return_probs=return_probs, clusters=clusters, mask=mask[top:bottom, left:right],
            )  # fmt: skip
            labels = np.full((h, w), NODATA, np.uint8)
            labels[top:bottom, left:right] = inner[0] if return_probs else inner
            if not return_probs:
                return labels
            probs = np.zeros((k, h, w), np.float32)  # nodata pixels have no probabilities
            probs[:, top:bottom, left:right] = inner[1]
            return labels, probs
        rgb = to_tensor(image if mask is None else np.where(mask[..., None], image, _fill(image, mask)))
        masked = {} if mask is None or clusters is not None else {"valid": _valid_tensor(mask)}
        _warn_small(model, h, w, k, "image")
        probs = predict_probs(model, rgb, k, lane=lane, clusters=clusters, **masked)[0].float().cpu().numpy()
        labels = argmax_labels(probs)
        if mask is not None:
            labels[~mask] = NODATA
        _warn_fewer_labels(labels, k, "image")
        return (labels, probs) if return_probs else labels
    labels = np.empty((h, w), np.uint8)
    probs = np.empty((k, h, w), np.float32) if return_probs else None

    def write_rows(y: int, rows: np.ndarray) -> None:
        labels[y : y + rows.shape[0]] = rows

    source = ArraySource(image, valid=mask)
    segment_source(
        model,
        source,
        k,
        write_rows=write_rows,
        tile=tile,
        overlap=overlap,
        lane=lane,
        clusters=clusters,
        probs_out=probs,
    )
    return (labels, probs) if return_probs else labels


def _fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colour masked pixels get before the model sees them: the mean of the valid ones
    (rounded for uint8, as ``BandStretch.fill`` is for files)."""
    mean = image[mask].mean(0)
    return (np.round(mean) if image.dtype == np.uint8 else mean).astype(image.dtype)


def _label_profile(source: Source) -> dict:
    """The source's georeferencing (CRS and transform, or its GCPs and their CRS) with a uint8
    single-band, tiled, deflate layout and ``NODATA`` as the nodata value."""
    src = source.profile
    gcps = getattr(source, "gcps", None)
    if gcps:  # georeferenced by ground control points only: the transform is a meaningless identity
        keep = {"gcps": gcps[0], "crs": gcps[1]}
    else:
        keep = {key: src[key] for key in ("crs", "transform") if src.get(key) is not None}
    h, w = source.height, source.width
    profile = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "uint8", **keep}
    profile.update(compress="deflate", predictor=2, nodata=NODATA)
    if min(h, w) >= 256:  # TIFF tiles are multiples of 16; tiny rasters stay striped
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    return profile


def segment_raster(
    path: str | Path,
    output: str | Path,
    k: int,
    model: torch.nn.Module,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    lane: str | None = None,
    fit_windows: int = 16,
    fit_pixels: int = FIT_PIXELS,
    seed: int = 0,
    clusters: Clusters | None = None,
    progress: bool = True,
    times: dict[str, float] | None = None,
) -> Path:
    """Segment the image at ``path`` (GeoTIFF, PNG or JPEG) into ``k`` clusters; write uint8
    labels to ``output`` and return it.

    A ``.tif`` output has the input's CRS and transform (when it has them), width and height,
    one uint8 band, deflate compression and 256 px tiles, written block row by block row (by a
    writer thread, while the model computes the next rows); any other output is a label PNG.
    Either is written to a temporary file that replaces ``output`` only when complete. GeoTIFF
    inputs are read window by window, PNG/JPEG inputs whole. The other arguments are those of
    ``segment_source`` (``times`` also gets the writer's seconds under "write"); GDAL's block
    cache is capped at ``GDAL_CACHE_MB`` meanwhile.
    """
    k = check_k(k)
    check_lane(lane)
    check_tiling(tile, overlap, model_stride(model))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=tile, overlap=overlap, lane=lane, fit_windows=fit_windows, fit_pixels=fit_pixels, seed=seed)
    options.update(clusters=clusters, progress=progress, times=times)
    geotiff = output.suffix.lower() in GEOTIFF_SUFFIXES
    if not geotiff:
        with open_source(path) as source:
            labels = np.empty((source.height, source.width), np.uint8)

            def fill_rows(y: int, rows: np.ndarray) -> None:
                labels[y : y + rows.shape[0]] = rows

            segment_source(model, source, k, write_rows=fill_rows, **options)
        with timed(times, "write"):
            return write_png(labels, output)

    import rasterio
    from rasterio.windows import Window

    # rasterio hands an integer GDAL_CACHEMAX to GDAL as bytes: the cap is given in bytes.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), open_source(path) as source:
        profile = _label_profile(source)
        tmp = temporary_path(output)
        try:
            with warnings.catch_warnings():  # an input without georeferencing gives an output without
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                dst = rasterio.open(tmp, "w", **profile)
            with dst:
                # The legend: label i in colour PALETTE[i] (the previews'), ids in the stable order;
                # nodata transparent.
                legend = {i: (*PALETTE[i % len(PALETTE)].tolist(), 255) for i in range(k)}
                dst.write_colormap(1, {**legend, NODATA: (0, 0, 0, 0)})
                dst.update_tags(
                    1, seglib_k=str(k), seglib_label_order="brightness of the cluster colour, darkest first"
                )

                def write_rows(y: int, rows: np.ndarray) -> None:
                    dst.write(rows[None], window=Window(0, y, rows.shape[1], rows.shape[0]))

                with RowWriter(write_rows, times=times) as writer:
                    segment_source(model, source, k, write_rows=writer, **options)
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
    return output
