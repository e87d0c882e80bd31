"""The inference engine: a segmenter on images and rasters of any size, in one piece or window
by window, with memory bounded by the tile size.

    from seglib.inference.engine import segment_raster
    segment_raster("ortho.tif", "labels.tif", Predictor(model, 6))  # uint8 labels, same CRS/transform
    segment_raster("photo.jpg", "labels.png", Predictor(model, 6))  # the same route for PNG/JPEG

Every entry point lands here: ``seglib.segment`` (arrays), ``python -m seglib.predict`` and
``segment_raster`` (files: GeoTIFF, PNG, JPEG), evaluation (``predict_probs``). An image whose
sides are at most ``tile`` goes through the model in one piece (``predict_probs``: padded to the
model's stride, cropped back). A larger one is never read whole:

1. **Band policy, decided once.** The window reader (``seglib.io.rasters``: ``RasterSource`` for
   files GDAL reads, ``ArraySource`` for arrays) measures one ``BandStretch`` from a decimated
   overview and applies it to every window, so windows do not get their own brightness.
2. **Global clusters.** The window grid is sampled (a seeded subset spread over the raster, up to
   ``fit_windows`` windows and ``fit_pixels`` pixels) and ``model.fit_clusters`` fits one set of K
   prototypes (and the head's size-prior offsets) jointly over them. Every window is then
   assigned to those clusters, so cluster ``i`` means the same thing everywhere.
3. **Overlapping windows, blended** (``seglib.inference.windows``): starts snapped to the model's
   stride, a cosine taper towards every neighbour, weights that sum to one at every pixel.
4. **Incremental output** (``seglib.inference.blend``): a cell is finished as soon as the last
   window with weight there has been added; its argmax labels go into a row buffer that is
   written out (GeoTIFF rows, or a caller's array) as soon as its row of cells is complete.
5. **Labels without full-resolution maps.** When only labels are wanted, the probabilities stay
   at the resolution before the lane's last bilinear upsampling (``WindowProbs``). The windows
   sampled for the fit keep what the head clustered for them, so the pass over the raster does
   not encode them again.

Peak memory is the larger of the prototype fit (at most ``fit_pixels`` of windows) and one
window's forward pass, plus the blended probabilities still waiting for a neighbour (about
K x overlap x raster width floats), one row of uint8 labels (tile x raster width) and GDAL's block
cache (capped while ``segment_raster`` runs); docs/inference.md has measured numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from ..io.images import GEOTIFF_SUFFIXES
from ..io.outputs import NODATA, label_geotiff, label_profile, write_label_png
from ..io.rasters import ArraySource, Source, open_source, valid_box
from ..models.head import Clusters
from .blend import FitWindow, blended_cells
from .legend import Legend, label_table
from .pipeline import RowWriter, timed
from .predictor import Predictor, argmax_labels, bands_tensor, pad_to_stride, pad_valid, to_tensor, valid_tensor
from .windows import DEFAULT_TILE, Layout, Tiling

__all__ = ["GDAL_CACHE_MB", "fit_source_clusters", "segment_source", "segment_array", "segment_raster"]

log = logging.getLogger("seglib.inference.engine")

GDAL_CACHE_MB = 64  # GDAL's block cache in MiB (default: 5% of RAM) while a raster is segmented


def _read_fit_windows(
    source: Source, layout: Layout, tiling: Tiling
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]]:
    """The windows ``tiling.sample`` draws, read: ``{(y, x): (uint8 (3, h, w), valid or None)}``.
    A sampled window without a valid pixel is replaced by the next window (in a seeded order)
    that has one."""
    _, ys, lh, xs, lw = layout
    sample = tiling.sample(layout)
    grid = [(y, x) for y in ys for x in xs]
    spare = [grid[i] for i in np.random.default_rng(tiling.seed).permutation(len(grid)) if grid[i] not in sample]
    reads: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
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
    return reads


@torch.no_grad()
def _fit(
    predictor: Predictor, source: Source, layout: Layout, tiling: Tiling, times: dict[str, float] | None = None
) -> tuple[Clusters, dict[tuple[int, int], FitWindow]]:
    """The clusters of ``fit_source_clusters``, and the windows read for them by (y, x), with
    what the head clustered for each (``FitWindow``): the pass over the raster neither reads
    them again nor runs the encoder on them again, only the assignment and the refinement.
    Nodata pixels are left out of the fit."""
    m = layout[0]
    with timed(times, "read"):
        reads = _read_fit_windows(source, layout, tiling)
    with timed(times, "fit"):
        batch = torch.cat([pad_to_stride(bands_tensor(rgb), m) for rgb, _ in reads.values()])  # (N, 3, lh, lw)
        valid = None
        if any(v is not None for _, v in reads.values()):
            masks = [np.ones(rgb.shape[1:], bool) if v is None else v for rgb, v in reads.values()]
            valid = torch.cat([pad_valid(valid_tensor(v), m) for v in masks])  # (N, lh, lw)
        clusters, clustered = predictor.fit(batch, valid=valid)  # clustered: kept for the pass, (N, D, h', w')
    windows = {key: (rgb, v, clustered[i : i + 1]) for i, (key, (rgb, v)) in enumerate(reads.items())}
    return clusters, windows


def fit_source_clusters(predictor: Predictor, source: Source, *, tiling: Tiling | None = None) -> Clusters:
    """Clusters (prototypes (1, K, D) and size-prior offsets) fitted jointly over a seeded,
    spread-out sample of ``source``'s window grid (``Tiling.sample``), in the stable order
    (``Clusters.ordered``): what a windowed pass assigns every window to."""
    tiling = (tiling or Tiling()).checked(predictor.stride)
    layout = tiling.layout(source.height, source.width, predictor.stride)
    return _fit(predictor, source, layout, tiling)[0]


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
    predictor: Predictor,
    source: Source,
    box: tuple[int, int, int, int],
    *,
    write_rows: Callable[[int, np.ndarray], None],
    tiling: Tiling,
    probs_out: np.ndarray | None,
    progress: bool,
    times: dict[str, float] | None,
) -> Clusters:
    """``segment_source`` on the box around the source's valid pixels: outside it everything is
    nodata, so it is written as ``NODATA`` without being read, and the model's grid starts at
    the data (a scene in a nodata collar is segmented as the scene alone would be)."""
    top, left, bottom, right = box
    height, width = source.height, source.width

    def nodata_rows(start: int, stop: int) -> None:
        for y in range(start, stop, DEFAULT_TILE):  # in bands of rows, like the windows' rows
            write_rows(y, np.full((min(DEFAULT_TILE, stop - y), width), NODATA, np.uint8))

    def write_inner(y: int, rows: np.ndarray) -> None:
        full = np.full((rows.shape[0], width), NODATA, np.uint8)
        full[:, left:right] = rows
        write_rows(top + y, full)

    log.info("%s: segmenting the data's extent, rows %d-%d, columns %d-%d", Path(source.name).name,
             top, bottom, left, right)  # fmt: skip
    inner_probs = None
    if probs_out is not None:
        probs_out[:] = 0  # nodata pixels have no probabilities
        inner_probs = probs_out[:, top:bottom, left:right]
    nodata_rows(0, top)
    clusters = segment_source(
        predictor,
        _Box(source, box),
        write_rows=write_inner,
        tiling=tiling,
        probs_out=inner_probs,
        progress=progress,
        times=times,
    )
    nodata_rows(bottom, height)
    return clusters


def _warn_small(predictor: Predictor, height: int, width: int, name: str) -> None:
    """Warn when an image gives the model fewer cells than K (counted on the image padded to the
    model's stride, the grid the head clusters). No bound on the labels is claimed: the
    probabilities are interpolated between cells, so pixels can take other labels at edges;
    ``_warn_fewer_labels`` reports how many came out."""
    stride = predictor.stride
    size = 4 * stride // predictor.model.input_multiple  # the cells the head clusters, in pixels
    cells = (-(-height // stride) * stride // size) * (-(-width // stride) * stride // size)
    if cells < predictor.k:
        padded = f" (padded to the model's stride of {stride} px)" if stride > size else ""
        log.warning(
            "%s: %d x %d px gives the model only %d cells of %d x %d px%s, the grid it clusters, fewer than "
            "K = %d: the clusters are fitted on %d cells, so some labels stay empty or split one segment; "
            "use a smaller K or a larger image",
            Path(name).name, width, height, cells, size, size, padded, predictor.k, cells,
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


def _segment_whole(
    predictor: Predictor,
    source: Source,
    *,
    write_rows: Callable[[int, np.ndarray], None],
    probs_out: np.ndarray | None,
    times: dict[str, float] | None,
) -> Clusters:
    """``segment_source`` in one piece: the image's own clusters, nodata left out of them."""
    with timed(times, "read"):
        rgb, valid = source.read_masked(0, 0, source.height, source.width)
    with timed(times, "model"):
        out = predictor.outputs(bands_tensor(rgb), valid=valid_tensor(valid))
        probs = out["probs"][0].float().cpu().numpy()  # (K, H, W)
    with timed(times, "blend"):
        if probs_out is not None:
            probs_out[:] = probs
        labels = argmax_labels(probs)
        if valid is not None:
            labels[~valid] = NODATA
    _warn_fewer_labels(labels, predictor.k, source.name)
    write_rows(0, labels)
    bias = out["cluster_bias"]
    return Clusters(out["prototypes"][:1], None if bias is None else bias[:1])


def segment_source(
    predictor: Predictor,
    source: Source,
    *,
    write_rows: Callable[[int, np.ndarray], None],
    tiling: Tiling | None = None,
    probs_out: np.ndarray | None = None,
    progress: bool = False,
    times: dict[str, float] | None = None,
) -> Clusters:
    """Segment ``source``; returns the clusters it used. A source no larger than the tile on
    either side (and a predictor without clusters) goes through the model in one piece, a
    larger one window by window.

    Arguments:
      predictor: the model, K, the lane; its ``clusters``, or (None) clusters fitted on the
        windows ``tiling`` samples (``fit_source_clusters``).
      write_rows: called as ``write_rows(y, labels)`` with uint8 labels (h, width) for rows
        y..y+h, top to bottom, as soon as they are final.
      tiling: the windows (default ``Tiling()``).
      probs_out: optional (K, H, W) float32 array that receives the (blended) probabilities.
      times: optional dict that collects seconds per stage (read, fit, model, blend; the
        reader runs in its own thread, so the stages overlap).
    """
    tiling = (tiling or Tiling()).checked(predictor.stride)
    box = getattr(source, "valid_box", None)
    if box is not None and box != (0, 0, source.height, source.width):
        return _segment_box(
            predictor, source, box, write_rows=write_rows, tiling=tiling, probs_out=probs_out, progress=progress,
            times=times,
        )  # fmt: skip
    for note in source.stretch.notes:
        log.info("%s: %s", Path(source.name).name, note)
    _warn_small(predictor, source.height, source.width, source.name)
    if predictor.clusters is None and max(source.height, source.width) <= tiling.tile:
        return _segment_whole(predictor, source, write_rows=write_rows, probs_out=probs_out, times=times)
    layout = tiling.layout(source.height, source.width, predictor.stride)
    cache = None
    if predictor.clusters is None:
        clusters, cache = _fit(predictor, source, layout, tiling, times)
        predictor = predictor.with_clusters(clusters)
    rows: dict[int, list] = {}  # y -> [labels (h, width) uint8, columns filled]
    cells = blended_cells(
        predictor, source, layout, want_probs=probs_out is not None, progress=progress, cache=cache, times=times
    )
    with closing(cells):  # on an error or Ctrl-C, the pipeline's threads stop before the caller cleans up
        for y, x, labels, probs in cells:
            with timed(times, "blend"):
                h, w = labels.shape
                if probs_out is not None:
                    probs_out[:, y : y + h, x : x + w] = probs
                row = rows.setdefault(y, [np.empty((h, source.width), np.uint8), 0])
                row[0][:, x : x + w] = labels
                row[1] += w
            if row[1] == source.width:
                write_rows(y, rows.pop(y)[0])
    return predictor.clusters


def segment_array(
    predictor: Predictor,
    image: np.ndarray,
    *,
    tiling: Tiling | None = None,
    return_probs: bool = False,
    mask: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Labels (H, W) uint8 (and probabilities (K, H, W) float32) of an (H, W, 3) uint8 or
    float [0, 1] image: in one piece up to the tile (float pixels used as they are), else window
    by window (``segment_source`` on an ``ArraySource``). A predictor with ``clusters`` assigns
    to them (fitted once, e.g. on many images) instead of fitting the image's own. ``mask``
    (H, W) bool, True where the pixel is data: the others are left out of the clusters and
    labelled ``NODATA``, and the box around the data is segmented on its own (as
    ``segment_source`` does for files: the model's grid starts at the data)."""
    tiling = (tiling or Tiling()).checked(predictor.stride)
    h, w = image.shape[:2]
    if mask is not None and mask.all():
        mask = None
    if max(h, w) > tiling.tile:
        labels = np.empty((h, w), np.uint8)
        probs = np.empty((predictor.k, h, w), np.float32) if return_probs else None

        def write_rows(y: int, rows: np.ndarray) -> None:
            labels[y : y + rows.shape[0]] = rows

        segment_source(predictor, ArraySource(image, valid=mask), write_rows=write_rows, tiling=tiling, probs_out=probs)
        return (labels, probs) if return_probs else labels
    box = (0, 0, h, w) if mask is None else valid_box(mask)
    if box != (0, 0, h, w):  # the box around the data alone, as segment_source does for files
        top, left, bottom, right = box
        inner = segment_array(
            predictor, image[top:bottom, left:right], tiling=tiling, return_probs=return_probs,
            mask=mask[top:bottom, left:right],
        )  # fmt: skip
        labels = np.full((h, w), NODATA, np.uint8)
        labels[top:bottom, left:right] = inner[0] if return_probs else inner
        if not return_probs:
            return labels
        probs = np.zeros((predictor.k, h, w), np.float32)  # nodata pixels have no probabilities
        probs[:, top:bottom, left:right] = inner[1]
        return labels, probs
    rgb = to_tensor(image if mask is None else np.where(mask[..., None], image, _fill(image, mask)))
    valid = None if mask is None or predictor.clusters is not None else valid_tensor(mask)
    _warn_small(predictor, h, w, "image")
    probs = predictor.probs(rgb, valid=valid)[0].float().cpu().numpy()
    labels = argmax_labels(probs)
    if mask is not None:
        labels[~mask] = NODATA
    _warn_fewer_labels(labels, predictor.k, "image")
    return (labels, probs) if return_probs else labels


def _fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colour masked pixels get before the model sees them: the mean of the valid ones
    (rounded for uint8, as ``BandStretch.fill`` is for files)."""
    mean = image[mask].mean(0)
    return (np.round(mean) if image.dtype == np.uint8 else mean).astype(image.dtype)


def segment_raster(
    path: str | Path,
    output: str | Path,
    predictor: Predictor,
    *,
    tiling: Tiling | None = None,
    progress: bool = True,
    times: dict[str, float] | None = None,
    overviews: bool = False,
    alpha: str = "auto",
    colours: str = "mean",
    legend: Legend | None = None,
) -> Path:
    """Segment the image at ``path`` (GeoTIFF, JPEG 2000, VRT, PNG or JPEG) with ``predictor``
    (its K, lane and clusters, if any); write uint8 labels to ``output`` and return it
    (``overviews``: a GeoTIFF gets internal overviews).

    A ``.tif`` output has the input's georeferencing (CRS and transform, GCPs, RPCs), width and
    height, one uint8 band, deflate compression and 256 px tiles, written block row by block row
    (by a writer thread, while the model computes the next rows); any other output is a label
    PNG, with a world file and an ``.aux.xml`` (CRS) beside it when the input has them. Either
    goes through ``seglib.io.outputs`` (temporary file, checked, renamed when complete).
    GeoTIFF, JPEG 2000 and VRT inputs are read window by window, PNG/JPEG inputs whole. ``alpha``:
    whether a 4th (2nd) band is a mask (``seglib.io.rasters.RasterSource``). Beside the labels:
    ``<name>.aux.xml`` with a colour table of exactly K entries and an attribute table, and
    ``<stem>.qml`` (QGIS: K named classes), from ``label_table``: ``colours`` ``mean`` (each
    label in its cluster's mean RGB) or ``categorical``; ``legend``: the shared or saved
    legend the predictor's clusters come from (its colours and shares describe the labels). The
    other arguments are those of ``segment_source`` (``times`` also gets the writer's seconds
    under "write"); GDAL's block cache is capped at ``GDAL_CACHE_MB`` meanwhile.
    """
    tiling = (tiling or Tiling()).checked(predictor.stride)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    options = {"tiling": tiling, "progress": progress, "times": times}
    if output.suffix.lower() not in GEOTIFF_SUFFIXES:
        with open_source(path, alpha=alpha) as source:
            labels = np.empty((source.height, source.width), np.uint8)

            def fill_rows(y: int, rows: np.ndarray) -> None:
                labels[y : y + rows.shape[0]] = rows

            used = segment_source(predictor, source, write_rows=fill_rows, **options)
        with timed(times, "write"):
            described = label_table(predictor.model, used, legend, colours)
            return write_label_png(labels, output, k=predictor.k, profile=source.profile, table=described)

    import rasterio

    # rasterio hands an integer GDAL_CACHEMAX to GDAL as bytes: the cap is given in bytes.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), open_source(path, alpha=alpha) as source:
        with (
            label_geotiff(output, label_profile(source), predictor.k, overviews=overviews) as dst,
            RowWriter(dst.write, times=times) as writer,
        ):

            def write_rows(y: int, rows: np.ndarray) -> None:
                dst.open()  # here, in this thread: the output exists once the first rows are labelled
                writer(y, rows)

            used = segment_source(predictor, source, write_rows=write_rows, **options)
            dst.table = label_table(predictor.model, used, legend, colours)
    return output
