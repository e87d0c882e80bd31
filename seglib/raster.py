"""Windowed segmentation of rasters of any size, with memory bounded by the tile size.

    from seglib.raster import segment_raster
    segment_raster("ortho.tif", "labels.tif", k=6, model=model)  # uint8 labels, same CRS/transform

A 20000 x 20000 raster is never read whole. The algorithm:

1. **Band policy, decided once.** ``seglib.io`` stretches 16-bit and float images per image from
   the 2nd to the 98th percentile. Done per window, that would give every window its own
   brightness and the clusters would jump at window borders. So the percentiles are computed
   once, per band, from a decimated overview read (rasterio ``out_shape``, at most ~1 Mpx) and
   the same linear stretch is applied to every window (``BandStretch``). Band selection follows
   ``seglib.io``: 1 band is replicated, 4 bands use the first 3, 2 or more than 4 are rejected.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .inference import model_stride, to_tensor
from .io import ImageReadError
from .models.head import Clusters, check_k

__all__ = [
    "DEFAULT_TILE",
    "DEFAULT_OVERLAP",
    "BandStretch",
    "ArraySource",
    "RasterSource",
    "LANES",
    "check_lane",
    "check_tiling",
    "axis_windows",
    "axis_weights",
    "fit_clusters",
    "iter_blended",
    "segment_source",
    "segment_raster",
]

log = logging.getLogger("seglib.raster")

LANES = ("fast", "learned", "none")
DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 128
OVERVIEW_PIXELS = 1 << 20  # the stretch's percentiles come from an overview of at most ~1 Mpx
FIT_PIXELS = 4 << 20  # pixels of the sampled windows the clusters are fitted on, at most
GDAL_CACHE_MB = 64  # GDAL's block cache (default: 5% of RAM) while a raster is segmented


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class BandStretch:
    """How every window of one raster becomes uint8 RGB; decided once, from an overview.

    Arguments:
      bands: source band indices (0-based) used as R, G and B.
      lo, hi: per output channel, the values mapped to 0 and 255 (``None``: uint8, used as is).
      notes: the conversions, in words (logged once per raster).
    """

    bands: tuple[int, int, int]
    lo: np.ndarray | None
    hi: np.ndarray | None
    notes: tuple[str, ...]

    @classmethod
    def from_overview(cls, overview: np.ndarray, name: str = "image") -> BandStretch:
        """The policy of ``seglib.io.to_uint8_rgb`` applied to a decimated (h, w, C) sample."""
        c = overview.shape[-1]
        notes = []
        if c == 1:
            bands, note = (0, 0, 0), "grayscale: replicated to 3 channels"
        elif c == 2:
            bands, note = (0, 0, 0), "grayscale + alpha: alpha dropped, grey replicated to 3 channels"
        elif c == 3:
            bands, note = (0, 1, 2), ""
        elif c == 4:
            bands, note = (0, 1, 2), "4 bands: used bands 1-3 as RGB, band 4 (alpha or NIR) ignored"
        else:
            raise ImageReadError(
                f"{name}: {c} bands, but seglib needs RGB (3 bands); extract the red, green and blue bands "
                "first, e.g. `gdal_translate -b 3 -b 2 -b 1 in.tif rgb.tif` (band numbers depend on the sensor)"
            )
        notes += [note] if note else []
        if overview.dtype == np.uint8:
            return cls(bands, None, None, tuple(notes))
        data = overview[..., list(bands)].astype(np.float64)
        bad = ~np.isfinite(data)
        if bad.any():
            notes.append("NaN/inf pixels: set to 0")
            data[bad] = 0
        if np.issubdtype(overview.dtype, np.floating) and data.min() >= 0 and data.max() <= 1:
            notes.append("float in [0, 1]: scaled by 255")
            return cls(bands, np.zeros(3), np.ones(3), tuple(notes))
        lo = np.percentile(data, 2, axis=(0, 1))
        hi = np.percentile(data, 98, axis=(0, 1))
        notes.append(
            f"{overview.dtype} data: stretched per band from the 2nd-98th percentile of an overview "
            f"(lo {np.round(lo, 3).tolist()}, hi {np.round(hi, 3).tolist()}) to 0..255, the same for every window"
        )
        return cls(bands, lo, hi, tuple(notes))

    def apply(self, window: np.ndarray) -> np.ndarray:
        """(h, w, C) source window of any dtype -> uint8 (h, w, 3)."""
        rgb = window[..., list(self.bands)]
        if self.lo is None:
            return np.ascontiguousarray(rgb)
        data = np.nan_to_num(rgb.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = (data - self.lo.astype(np.float32)) / np.maximum(self.hi - self.lo, 1e-12).astype(np.float32)
        return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


class ArraySource:
    """An in-memory (H, W, C) array read window by window.

    Arguments:
      image: bands-last array of any dtype ``seglib.io`` accepts (uint8, 16-bit, float).
      name: how messages refer to it.
    """

    def __init__(self, image: np.ndarray, *, name: str = "image"):
        image = image[..., None] if image.ndim == 2 else image
        self.image, self.name = image, name
        self.height, self.width = image.shape[:2]
        step = max(1, math.ceil(math.sqrt(self.height * self.width / OVERVIEW_PIXELS)))
        self.stretch = BandStretch.from_overview(image[::step, ::step], name)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) of rows y..y+h and columns x..x+w."""
        return self.stretch.apply(self.image[y : y + h, x : x + w])


class RasterSource:
    """A raster file (GeoTIFF or anything GDAL reads) read window by window with rasterio.

    Arguments:
      path: the raster; a missing, corrupt or non-RGB file raises ``ImageReadError``.

    Use as a context manager (``with RasterSource(path) as src:``) so the file is closed.
    """

    def __init__(self, path: str | Path):
        import rasterio
        from rasterio.enums import Resampling

        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise ImageReadError(f"image not found: {self.path}")
        try:
            self.dataset = rasterio.open(self.path)
        except Exception as exc:  # rasterio raises its own error types for corrupt files
            raise _decode_error(self.path, exc) from exc
        try:
            ds = self.dataset
            self.height, self.width = ds.height, ds.width
            if self.height < 1 or self.width < 1:
                raise ImageReadError(f"{self.path}: empty image")
            if ds.count == 2 or ds.count > 4:
                raise ImageReadError(
                    f"{self.path}: {ds.count} bands, but seglib needs RGB (3 bands); extract them first, e.g. "
                    "`gdal_translate -b 3 -b 2 -b 1 in.tif rgb.tif` (band numbers depend on the sensor)"
                )
            step = max(1, math.ceil(math.sqrt(self.height * self.width / OVERVIEW_PIXELS)))
            shape = (ds.count, math.ceil(self.height / step), math.ceil(self.width / step))
            overview = ds.read(out_shape=shape, resampling=Resampling.nearest)  # (C, h, w), decimated
            self.stretch = BandStretch.from_overview(np.moveaxis(overview, 0, -1), self.name)
        except ImageReadError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise _decode_error(self.path, exc) from exc

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) of rows y..y+h and columns x..x+w."""
        from rasterio.windows import Window

        try:
            bands = self.dataset.read(window=Window(x, y, w, h))  # (C, h, w)
        except Exception as exc:  # a truncated file can open fine and fail on a later block
            raise _decode_error(self.path, exc) from exc
        return self.stretch.apply(np.moveaxis(bands, 0, -1))

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode_error(path: Path, exc: Exception) -> ImageReadError:
    return ImageReadError(
        f"{path}: cannot decode ({type(exc).__name__}: {exc}); the file is corrupt or truncated, re-export it"
    )


Source = ArraySource | RasterSource


# ----------------------------------------------------------------------------- window layout


def axis_windows(size: int, tile: int, overlap: int, multiple: int) -> tuple[list[int], int]:
    """Window starts along one axis of ``size`` pixels, and the window length.

    Windows are ``tile`` long (the whole axis when it is shorter) and overlap by at least
    ``overlap``. Every start is a multiple of ``multiple`` (the model's input stride), so each
    window sees the whole image's pixel grid and computes the same features: a window shifted
    by a pixel off that grid changes the labels of a few percent of the pixels. The last window
    therefore ends at or up to ``multiple - 1`` pixels past ``size``; readers clip it and the
    model pads it the way it pads the whole image (``_pad``).
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


def check_lane(lane: object) -> None:
    """ValueError unless ``lane`` is None (the model's default) or a refinement lane name."""
    if lane is not None and lane not in LANES:
        raise ValueError(f"unknown refinement lane {lane!r}; choose one of {', '.join(LANES)} (or None: the model's)")


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


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad (B, 3, h, w) at the bottom/right up to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    spread-out sample of the window grid.

    Up to ``fit_windows`` windows of the tile size, but no more than ``fit_pixels`` pixels in
    all: the fit holds every sampled window in the model at once, so this budget bounds its
    memory. The grid is split into that many equal runs (row-major) and one window is drawn
    from each, so the sample covers the whole raster.
    """
    k = check_k(k)
    m = model_stride(model)
    tile = check_tiling(tile, overlap, m)
    ys, lh = axis_windows(source.height, tile, overlap, m)
    xs, lw = axis_windows(source.width, tile, overlap, m)
    grid = [(y, x) for y in ys for x in xs]
    n = max(1, min(fit_windows, len(grid), fit_pixels // (lh * lw)))
    edges = np.linspace(0, len(grid), n + 1).astype(int)
    rng = np.random.default_rng(seed)
    pick = [int(rng.integers(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    windows = [grid[i] for i in pick]
    reads = [source.read(y, x, min(lh, source.height - y), min(lw, source.width - x)) for y, x in windows]
    batch = torch.cat([_pad(to_tensor(rgb), m) for rgb in reads])  # (N, 3, h, w): all the same size
    return model.fit_clusters(batch.to(_device(model)), k)


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
    waiting for a later window are held in memory.
    """
    from tqdm.auto import tqdm

    m = model_stride(model)
    tile = check_tiling(tile, overlap, m)
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
    with tqdm(total=len(ys) * len(xs), desc="windows", unit="win", disable=not progress) as bar:
        for r, y in enumerate(ys):
            for c, x in enumerate(xs):
                h, w = min(lh, source.height - y), min(lw, source.width - x)  # the last may stick out
                rgb = _pad(to_tensor(source.read(y, x, h, w)), m).to(device)  # (1, 3, lh, lw)
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
    """Segment ``source`` window by window; returns the clusters it used.

    Arguments:
      write_rows: called as ``write_rows(y, labels)`` with uint8 labels (h, width) for rows
        y..y+h, top to bottom, as soon as they are final.
      clusters: fitted with ``fit_clusters`` from sampled windows when None.
      probs_out: optional (K, H, W) float32 array that receives the blended probabilities.
    """
    k = check_k(k)
    check_lane(lane)
    for note in source.stretch.notes:
        log.info("%s: %s", Path(source.name).name, note)
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
    """Segment the raster at ``path`` into ``k`` clusters; write uint8 labels to ``output``.

    The output GeoTIFF has the input's CRS, transform, width and height, one uint8 band,
    deflate compression and 256 px tiles; it is written block row by block row to a temporary
    file that replaces ``output`` only when complete. Returns ``output``. The other arguments
    are those of ``segment_source``; GDAL's block cache is capped at ``GDAL_CACHE_MB`` meanwhile.
    """
    import rasterio
    from rasterio.windows import Window

    k = check_k(k)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), RasterSource(path) as source:
        profile = _label_profile(source.dataset.profile, source.height, source.width)
        try:
            with rasterio.open(tmp, "w", **profile) as dst:

                def write_rows(y: int, labels: np.ndarray) -> None:
                    dst.write(labels[None], window=Window(0, y, labels.shape[1], labels.shape[0]))

                segment_source(
                    model,
                    source,
                    k,
                    write_rows=write_rows,
                    tile=tile,
                    overlap=overlap,
                    lane=lane,
                    clusters=clusters,
                    fit_windows=fit_windows,
                    fit_pixels=fit_pixels,
                    seed=seed,
                    progress=progress,
                )
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
    return output
