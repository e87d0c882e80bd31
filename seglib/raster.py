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
4. **Incremental output.** The raster is cut into cells by all window edges. A cell is finished
   once the last window covering it has been added; its argmax labels go into a row buffer that
   is written out (GeoTIFF rows, or a caller's array) as soon as its row of cells is complete.

Peak memory is the larger of the prototype fit (at most ``fit_pixels`` of windows) and one
window's forward pass, plus the blended probabilities still waiting for a neighbour (about
K x overlap x raster width floats), one row of uint8 labels (tile x raster width) and GDAL's block
cache (capped while ``segment_raster`` runs); docs/inference.md has measured numbers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import check_k, check_lane
from .io import GEOTIFF_SUFFIXES, ArraySource, RasterSource, open_source, write_png
from .models.head import Clusters, brightness_order
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

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 128
FIT_PIXELS = 4 << 20  # pixels of the sampled windows the clusters are fitted on, at most
GDAL_CACHE_MB = 64  # GDAL's block cache (default: 5% of RAM) while a raster is segmented


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


@torch.no_grad()
def _forward(model: torch.nn.Module, rgb: torch.Tensor, k: int, **kwargs) -> dict[str, torch.Tensor]:
    h, w = rgb.shape[-2:]
    x = pad_to_stride(rgb.to(_device(model)), model_stride(model, kwargs.get("downsample")))
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


@torch.no_grad()
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
    m = model_stride(model)
    ys, lh = axis_windows(source.height, tile, overlap, m)
    xs, lw = axis_windows(source.width, tile, overlap, m)
    grid = [(y, x) for y in ys for x in xs]
    n = max(1, min(fit_windows, len(grid), fit_pixels // (lh * lw)))
    edges = np.linspace(0, len(grid), n + 1).astype(int)
    rng = np.random.default_rng(seed)
    pick = [int(rng.integers(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    windows = [grid[i] for i in pick]
    reads = [source.read(y, x, min(lh, source.height - y), min(lw, source.width - x)) for y, x in windows]
    batch = torch.cat([pad_to_stride(to_tensor(rgb), m) for rgb in reads])  # (N, 3, h, w): all the same size
    return model.fit_clusters(batch.to(_device(model)), k).ordered()


@torch.no_grad()
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
    m = model_stride(model)
    ys, lh = axis_windows(source.height, tile, overlap, m)
    xs, lw = axis_windows(source.width, tile, overlap, m)
    wy, wx = axis_weights(ys, lh, source.height), axis_weights(xs, lw, source.width)
    cuts_y = sorted({*ys, *(min(y + lh, source.height) for y in ys)})
    cuts_x = sorted({*xs, *(min(x + lw, source.width) for x in xs)})

    def cover(starts: list[int], length: int, cuts: list[int]) -> tuple[list[list[int]], list[int]]:
        # Cells inside each window, and the index of the last window covering each cell.
        cells = [[i for i in range(len(cuts) - 1) if s <= cuts[i] and cuts[i + 1] <= s + length] for s in starts]
        last = [max(r for r, cs in enumerate(cells) if i in cs) for i in range(len(cuts) - 1)]
        return cells, last

    rows_of, last_row = cover(ys, lh, cuts_y)
    cols_of, last_col = cover(xs, lw, cuts_x)
    device = _device(model)
    clusters = clusters.to(device)
    pending: dict[tuple[int, int], np.ndarray] = {}  # cell -> blended probs so far (K, ch, cw)
    with progress_bar(total=len(ys) * len(xs), desc="windows", unit="win", disable=not progress) as bar:
        for r, y in enumerate(ys):
            for c, x in enumerate(xs):
                h, w = min(lh, source.height - y), min(lw, source.width - x)  # the last may stick out
                rgb = pad_to_stride(to_tensor(source.read(y, x, h, w)), m).to(device)  # (1, 3, lh, lw)
                out = model(rgb, k, lane=lane, clusters=clusters)["probs"]  # (1, K, lh, lw)
                probs = out[0, :, :h, :w].float().cpu().numpy()  # (K, h, w), padding cropped
                probs *= wy[r][:h, None] * wx[c][None, :w]
                for i in rows_of[r]:
                    for j in cols_of[c]:
                        part = probs[:, cuts_y[i] - y : cuts_y[i + 1] - y, cuts_x[j] - x : cuts_x[j + 1] - x]
                        acc = pending.get((i, j))
                        if acc is None:
                            pending[(i, j)] = acc = part.copy()
                        else:
                            acc += part
                        if last_row[i] == r and last_col[j] == c:
                            yield cuts_y[i], cuts_x[j], pending.pop((i, j))
                bar.update()


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
) -> Clusters:
    """Segment ``source``; returns the clusters it used. A source no larger than ``tile`` on
    either side (and no ``clusters`` given) goes through the model in one piece, a larger one
    window by window.

    Arguments:
      write_rows: called as ``write_rows(y, labels)`` with uint8 labels (h, width) for rows
        y..y+h, top to bottom, as soon as they are final.
      clusters: fitted with ``fit_clusters`` from sampled windows when None.
      probs_out: optional (K, H, W) float32 array that receives the (blended) probabilities.
    """
    tile = check_tiling(tile, overlap, model_stride(model))
    for note in source.stretch.notes:
        log.info("%s: %s", Path(source.name).name, note)
    if clusters is None and max(source.height, source.width) <= tile:
        out = _forward(model, to_tensor(source.read(0, 0, source.height, source.width)), k, lane=lane)
        probs = out["probs"][0].float().cpu().numpy()  # (K, H, W)
        if probs_out is not None:
            probs_out[:] = probs
        write_rows(0, probs.argmax(0).astype(np.uint8))
        bias = out["cluster_bias"]
        return Clusters(out["prototypes"][:1], None if bias is None else bias[:1])
    if clusters is None:
        clusters = fit_clusters(
            model, source, k, tile=tile, overlap=overlap, fit_windows=fit_windows, fit_pixels=fit_pixels, seed=seed
        )
    rows: dict[int, list] = {}  # y -> [labels (h, width) uint8, columns filled]
    for y, x, probs in iter_blended(
        model, source, k, clusters, tile=tile, overlap=overlap, lane=lane, progress=progress
    ):
        h, w = probs.shape[1:]
        if probs_out is not None:
            probs_out[:, y : y + h, x : x + w] = probs
        row = rows.setdefault(y, [np.empty((h, source.width), np.uint8), 0])
        row[0][:, x : x + w] = probs.argmax(0)
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
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Labels (H, W) uint8 (and probabilities (K, H, W) float32) of an (H, W, 3) uint8 or
    float [0, 1] image: in one piece up to ``tile`` (float pixels used as they are), else window
    by window (``segment_source`` on an ``ArraySource``). ``clusters``: assign to these (fitted
    once, e.g. on many images) instead of fitting the image's own."""
    h, w = image.shape[:2]
    if max(h, w) <= tile:
        probs = predict_probs(model, to_tensor(image), k, lane=lane, clusters=clusters)[0].float().cpu().numpy()
        labels = probs.argmax(0).astype(np.uint8)
        return (labels, probs) if return_probs else labels
    labels = np.empty((h, w), np.uint8)
    probs = np.empty((k, h, w), np.float32) if return_probs else None

    def write_rows(y: int, rows: np.ndarray) -> None:
        labels[y : y + rows.shape[0]] = rows

    segment_source(
        model,
        ArraySource(image),
        k,
        write_rows=write_rows,
        tile=tile,
        overlap=overlap,
        lane=lane,
        clusters=clusters,
        probs_out=probs,
    )
    return (labels, probs) if return_probs else labels


def _label_profile(src_profile: dict, height: int, width: int) -> dict:
    """The source's georeferencing with a uint8 single-band, tiled, deflate layout."""
    keep = {key: src_profile[key] for key in ("crs", "transform") if key in src_profile}
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8", **keep}
    profile.update(compress="deflate", predictor=2, nodata=None)
    if min(height, width) >= 256:  # TIFF tiles are multiples of 16; tiny rasters stay striped
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
) -> Path:
    """Segment the image at ``path`` (GeoTIFF, PNG or JPEG) into ``k`` clusters; write uint8
    labels to ``output`` and return it.

    A ``.tif`` output has the input's CRS and transform (when it has them), width and height,
    one uint8 band, deflate compression and 256 px tiles, written block row by block row; any
    other output is a label PNG. Either is written to a temporary file that replaces ``output``
    only when complete. GeoTIFF inputs are read window by window, PNG/JPEG inputs whole. The
    other arguments are those of ``segment_source``; GDAL's block cache is capped at
    ``GDAL_CACHE_MB`` meanwhile.
    """
    k = check_k(k)
    check_lane(lane)
    check_tiling(tile, overlap, model_stride(model))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=tile, overlap=overlap, lane=lane, fit_windows=fit_windows, fit_pixels=fit_pixels, seed=seed)
    options.update(clusters=clusters, progress=progress)
    geotiff = output.suffix.lower() in GEOTIFF_SUFFIXES
    if not geotiff:
        with open_source(path) as source:
            labels = np.empty((source.height, source.width), np.uint8)

            def fill_rows(y: int, rows: np.ndarray) -> None:
                labels[y : y + rows.shape[0]] = rows

            segment_source(model, source, k, write_rows=fill_rows, **options)
        return write_png(labels, output)

    import rasterio
    from rasterio.windows import Window

    tmp = output.with_name(f".{output.name}.tmp")
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), open_source(path) as source:
        profile = _label_profile(source.profile, source.height, source.width)
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                # The legend: label i in colour PALETTE[i] (the previews'), ids in the stable order.
                dst.write_colormap(1, {i: (*PALETTE[i % len(PALETTE)].tolist(), 255) for i in range(k)})
                dst.update_tags(
                    1, seglib_k=str(k), seglib_label_order="brightness of the cluster colour, darkest first"
                )

                def write_rows(y: int, rows: np.ndarray) -> None:
                    dst.write(rows[None], window=Window(0, y, rows.shape[1], rows.shape[0]))

                segment_source(model, source, k, write_rows=write_rows, **options)
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
    return output
