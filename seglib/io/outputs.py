"""Writing results: every file goes to a temporary name beside its final one and is renamed
only when complete, so an interrupted or failed write never leaves a partial file at the final
name; label GeoTIFFs get the input's georeferencing, a colour table and ``NODATA``.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..viz import PALETTE
from .rasters import Source

__all__ = ["NODATA", "temporary_path", "write_png", "label_profile", "label_geotiff"]

NODATA = 255  # the label of masked (nodata) pixels, outside every K's labels 0..K-1


def temporary_path(output: Path) -> Path:
    """A unique temporary name beside ``output`` (process id and a random part): runs writing the
    same output at the same time each write their own file, and the last to finish replaces
    ``output`` (``os.replace`` is atomic), so ``output`` is always one complete file."""
    return output.with_name(f".{output.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def write_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (a temporary file renamed)."""
    from PIL import Image

    path = Path(path)
    tmp = temporary_path(path)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def label_profile(source: Source) -> dict:
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


@contextmanager
def label_geotiff(output: Path, profile: dict, k: int) -> Iterator:
    """A label GeoTIFF open for writing (a rasterio dataset) at a temporary name beside
    ``output``, with the legend as its colour table (label i in colour ``PALETTE[i]``, the
    previews'; nodata transparent) and K in its tags; renamed to ``output`` when the block ends
    without an error, removed otherwise."""
    import rasterio

    tmp = temporary_path(output)
    try:
        with warnings.catch_warnings():  # an input without georeferencing gives an output without
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            dst = rasterio.open(tmp, "w", **profile)
        with dst:
            legend = {i: (*PALETTE[i % len(PALETTE)].tolist(), 255) for i in range(k)}
            dst.write_colormap(1, {**legend, NODATA: (0, 0, 0, 0)})
            dst.update_tags(1, seglib_k=str(k), seglib_label_order="brightness of the cluster colour, darkest first")
            yield dst
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
