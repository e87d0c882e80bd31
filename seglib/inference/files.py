"""One input file to its outputs: the names of a run's files, the labels, the polygons and the
preview of one image, as ``python -m seglib.predict`` writes them (and the dask workers of
``seglib.inference.archive``, so both write the same bytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.images import GEOTIFF_SUFFIXES, RASTER_SUFFIXES
from ..io.outputs import write_png
from ..io.sidecars import qml_path
from .kselect import DEFAULT_RANGE
from .legend import Legend
from .vector import VECTOR_FORMATS, MinArea
from .windows import Tiling

__all__ = ["output_paths", "preview_path", "check_output_folder", "predict_file"]

PREVIEW_MAX_SIDE = 2048  # previews of large rasters are decimated to at most this many pixels


def output_paths(
    inputs: list[Path], output: Path, *, preview: bool = False, vector: str | None = None
) -> dict[Path, Path]:
    """The label file of every input: ``<stem>.tif`` for rasters GDAL reads window by window
    (GeoTIFF, JPEG 2000, VRT), ``<stem>.png`` otherwise.

    Any two files of the run that would be the same file (two inputs' labels, or one input's
    ``<stem>_preview.png`` (``preview``), polygons (``vector``) or QGIS style (``<stem>.qml``)
    and another's), or an output that is an input, raise ``ValueError`` naming both: nothing
    is overwritten by its own run."""
    sources = {p.resolve() for p in inputs}
    writes: dict[Path, str] = {}  # every file the run writes -> what writes it
    targets: dict[Path, Path] = {}
    for path in inputs:
        target = output / (path.stem + (".tif" if path.suffix.lower() in RASTER_SUFFIXES else ".png"))
        files = {target: f"the labels of {path.name}", qml_path(target): f"the QGIS style of {path.name}'s labels"}
        if preview:
            files[preview_path(target)] = f"the preview of {path.name}"
        if vector is not None:
            files[target.with_suffix(VECTOR_FORMATS[vector][1])] = f"the polygons of {path.name}"
        for file, what in files.items():
            if file in writes:
                raise ValueError(f"{writes[file]} and {what} would both be {file}; rename one of the inputs")
            if file.resolve() in sources:
                raise ValueError(f"{file} ({what}) would overwrite an input image; choose another --output folder")
            writes[file] = what
        targets[path] = target
    return targets


def preview_path(target: Path) -> Path:
    """``<stem>_preview.png`` beside a label file."""
    return target.with_name(target.stem + "_preview.png")


def check_output_folder(output: Path) -> None:
    """``ValueError`` when ``--output`` is, or lies under, something that is not a folder."""
    for folder in (output, *output.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is" if folder == output else f"lies under {folder}, which is"
                raise ValueError(f"--output {output} {where} a file, not a folder; choose a folder")
            return


def _preview(labels_file: Path, path: Path) -> None:
    """Colour preview of a label file in the colours of its colour table (the legend's; the
    categorical palette without one), nodata black; a label GeoTIFF is read decimated so
    large rasters stay cheap."""
    from ..io.outputs import NODATA
    from ..viz import PALETTE

    colours = np.zeros((256, 3), np.uint8)
    colours[: len(PALETTE)] = PALETTE
    if labels_file.suffix.lower() in GEOTIFF_SUFFIXES:
        import rasterio
        from rasterio.enums import Resampling

        with rasterio.open(labels_file) as src:
            scale = max(1.0, max(src.height, src.width) / PREVIEW_MAX_SIDE)
            shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
            labels = src.read(1, out_shape=shape, resampling=Resampling.nearest)
            try:
                table = src.colormap(1)  # the legend's colour table, from the .aux.xml beside it
            except ValueError:  # none
                table = {}
        for index, colour in table.items():
            if 0 <= index < 256:
                colours[index] = colour[:3]
    else:  # a paletted label PNG
        from PIL import Image

        with Image.open(labels_file) as image:
            palette = image.getpalette() if image.mode == "P" else None
            labels = np.asarray(image)
        if palette:
            colours[: len(palette) // 3] = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    rgb = colours[labels]
    rgb[labels == NODATA] = 0
    write_png(rgb, path)


def _check_min_area(path: Path, min_area: MinArea) -> None:
    """``ValueError`` when ``min_area`` cannot work for the polygons of ``path`` (see
    ``seglib.inference.vector.min_area_pixels``), from the input's georeferencing alone."""
    import warnings

    import rasterio

    from ..io.rasters import sidecar_georeferencing
    from .vector import min_area_pixels

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                transform, crs, size = src.transform, src.crs, src.shape
    except rasterio.errors.RasterioError:
        return  # unreadable: the segmentation says why
    if path.suffix.lower() not in RASTER_SUFFIXES:
        georef = sidecar_georeferencing(path)
        transform, crs = georef.get("transform", transform), georef.get("crs")
    min_area_pixels(min_area, transform, crs, size, path.name)


def predict_file(
    path: Path,
    target: Path,
    model,
    k: int | str | None,
    *,
    tiling: Tiling | None = None,
    lane: str | None = None,
    legend: Legend | None = None,
    k_range: tuple[int, int] = DEFAULT_RANGE,
    vector: str | None = None,
    min_area: MinArea | None = None,
    preview: bool = False,
    progress: bool = True,
    adapt_steps: int = 0,
    adapt_seconds: float | None = None,
    overviews: bool = False,
    alpha: str = "auto",
    colours: str = "mean",
) -> dict:
    """Segment one file into ``target`` (and ``<stem>_preview.png``, ``<stem>.gpkg`` beside it).

    ``legend``: assign to its clusters (shared or loaded) instead of fitting the file's own; ``k``
    ``"auto"`` picks the file's K first. ``adapt_steps`` > 0 first adapts a copy of the model to
    the file (``seglib.inference.adapt``), before any clusters are fitted; shared or loaded
    ``legend`` was fitted with the unadapted model, so they cannot be combined with it.
    ``tiling``: the windows and the fit sample (default ``Tiling()``; its seed seeds the
    adaptation too). ``alpha``: whether a
    4th band is a mask (``seglib.io.rasters.RasterSource``); ``colours``: the labels' colours,
    ``mean`` or ``categorical`` (``seglib.inference.legend.label_table``). A ``min_area`` that cannot work
    for the file (its whole area, e.g. square degrees) fails before it is segmented.
    Returns ``{"target", "k", "auto", "vector", "features"}``.
    """
    from .engine import segment_raster
    from .predictor import Predictor

    if vector is not None and min_area is not None:
        _check_min_area(path, min_area)

    tiling = tiling or Tiling()
    if adapt_steps:
        if legend is not None:
            raise ValueError("--adapt changes the features that a shared or saved legend was fitted on; drop one")
        from ..io.rasters import open_source
        from .adapt import adapt

        with open_source(path, alpha=alpha) as source:
            model = adapt(
                model, source, steps=adapt_steps, max_seconds=adapt_seconds, seed=tiling.seed, progress=progress
            )

    fitted = legend
    if fitted is None and k == "auto":
        from ..io.rasters import open_source
        from .kselect import fit_sources_auto

        with open_source(path, alpha=alpha) as source:
            fitted = fit_sources_auto(model, [source], tiling=tiling, k_range=k_range)
    if fitted is None:
        predictor = Predictor(model, k, lane=lane)
    else:
        predictor = Predictor(model, fitted.k, lane=lane, clusters=fitted.head_clusters())
    k = predictor.k
    segment_raster(
        path, target, predictor, tiling=tiling, progress=progress, overviews=overviews, alpha=alpha, colours=colours,
        legend=fitted,
    )  # fmt: skip
    result = {"target": target, "k": k, "auto": legend is None and fitted is not None, "vector": None}
    if vector is not None:
        from .vector import polygonize

        result["vector"] = target.with_suffix(VECTOR_FORMATS[vector][1])
        result["features"] = polygonize(target, result["vector"], vector_format=vector, min_area=min_area)["features"]
    if preview:
        _preview(target, preview_path(target))
    return result
