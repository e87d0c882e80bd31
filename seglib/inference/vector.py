"""Segments as polygons: the finished label raster, sieved, traced by GDAL, written with fiona.

    from seglib.inference.vector import polygonize
    polygonize("out/ortho.tif", "out/ortho.gpkg", min_area=MinArea(50.0))  # drop < 50 m2 (metric CRS)
    # python -m seglib.predict --input ortho.tif --k 6 --output out --vector gpkg --min-area 50

One feature per 4-connected region of equal label, with fields ``label`` (the cluster id),
``area`` (in the square units of the raster's CRS, e.g. m2; pixels when it has none) and
``pixels``. The polygons come from the whole, finished label raster (never from windows), so a
segment that crosses a window edge of the windowed prediction is one polygon.

* **Sieve** (optional minimum mapping unit): ``rasterio.features.sieve`` merges every region
  smaller than ``min_area`` into its largest neighbour before tracing (4-connectivity, like the
  tracing), so every feature has at least that area.
* **Tracing**: ``rasterio.features.shapes`` (GDAL's polygonize) follows pixel edges, so the
  polygons tile the raster exactly: their areas add up to the raster's area.
* **Writing**: fiona, features streamed in batches into a temporary file, read back, then renamed
  (``seglib.io.outputs.committed``).

Memory: without a sieve GDAL reads the label raster block by block; with one the labels are
held in memory twice (one byte per pixel each: 2 x 38 MB for a 37.7 Mpx raster), plus the
polygons of one batch.
"""

from __future__ import annotations

import errno
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.outputs import committed

__all__ = ["VECTOR_FORMATS", "MinArea", "parse_min_area", "check_vector_format", "polygonize", "ring_area"]

# --vector NAME -> (GDAL/OGR driver, file suffix)
VECTOR_FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson"), "fgb": ("FlatGeobuf", ".fgb")}
BATCH = 4096  # features handed to the writer at a time
SCHEMA = {"geometry": "Polygon", "properties": {"label": "int", "area": "float", "pixels": "int"}}


def check_vector_format(name: str) -> str:
    """The format's key (``gpkg``, ...); ``ValueError`` naming the choices for anything else."""
    key = str(name).lower().lstrip(".")
    if key not in VECTOR_FORMATS:
        raise ValueError(f"unknown vector format {name!r}; choose one of {', '.join(VECTOR_FORMATS)}")
    return key


@dataclass(frozen=True)
class MinArea:
    """A minimum mapping unit: ``value`` square map units (the CRS's, e.g. m2), or pixels."""

    value: float
    pixels: bool = False

    def to_pixels(self, pixel_area: float) -> int:
        """The smallest region kept, in pixels, for pixels of ``pixel_area`` square map units."""
        if self.pixels:
            return math.ceil(self.value)
        return math.ceil(self.value / pixel_area - 1e-9)


def parse_min_area(text: str) -> MinArea:
    """``"50"`` (square map units) or ``"12px"`` (pixels); ``ValueError`` naming the forms."""
    raw = str(text).strip().lower()
    pixels = raw.endswith("px")
    try:
        value = float(raw[:-2] if pixels else raw)
    except ValueError:
        raise ValueError(
            f"--min-area must be a number of square map units (e.g. 50) or of pixels (e.g. 12px), got {text!r}"
        ) from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--min-area must be 0 or more, got {text!r}")
    return MinArea(value, pixels)


def ring_area(ring: list) -> float:
    """Unsigned shoelace area of a closed ring of (x, y) points."""
    xy = np.asarray(ring, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2


def _polygon_area(geometry: dict) -> float:
    rings = geometry["coordinates"]
    return ring_area(rings[0]) - sum(ring_area(r) for r in rings[1:])


def _check_written(path: Path, count: int) -> None:
    """``OSError`` unless the closed file reads back with ``count`` features (fiona reports most
    write errors, not all of GDAL's at closing)."""
    import fiona

    with fiona.open(path) as src:
        if len(src) != count:
            raise OSError(errno.EIO, f"{len(src)} of {count} polygons read back")


def polygonize(
    labels: str | Path,
    output: str | Path,
    *,
    vector_format: str = "gpkg",
    min_area: MinArea | None = None,
    layer: str | None = None,
) -> dict:
    """Write the segments of the label raster ``labels`` (a single-band integer GeoTIFF or
    PNG) as polygons to ``output``; returns ``{"features", "min_pixels", "crs"}``.

    ``min_area`` sieves regions below it into their largest neighbour first. A raster without
    georeferencing (a PNG) gets polygons in pixel coordinates and no CRS.
    """
    import fiona
    import rasterio
    import rasterio.errors
    from rasterio.features import shapes, sieve

    driver, _ = VECTOR_FORMATS[check_vector_format(vector_format)]
    output = Path(output)
    with warnings.catch_warnings():  # a label PNG has no georeferencing: pixel coordinates, on purpose
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        src = rasterio.open(labels)
    with src:
        transform, crs = src.transform, src.crs
        pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
        min_pixels = 0 if min_area is None else min_area.to_pixels(pixel_area)
        mask = src.read_masks(1) > 0 if src.nodata is not None else None
        if min_pixels > 1:
            source = sieve(src.read(1), min_pixels, mask=mask, connectivity=4)
        else:
            source = rasterio.band(src, 1)  # GDAL reads the band block by block
        count = 0
        with committed(output, keep_suffix=True) as tmp:  # GDAL picks the format by the suffix too
            with fiona.open(
                tmp, "w", driver=driver, schema=SCHEMA, crs=crs.to_wkt() if crs else None, layer=layer or output.stem
            ) as dst:
                batch = []
                for geometry, value in shapes(source, mask=mask, connectivity=4, transform=transform):
                    area = _polygon_area(geometry)
                    batch.append(
                        {
                            "geometry": geometry,
                            "properties": {"label": int(value), "area": area, "pixels": round(area / pixel_area)},
                        }
                    )
                    if len(batch) == BATCH:
                        dst.writerecords(batch)
                        count, batch = count + len(batch), []
                dst.writerecords(batch)
                count += len(batch)
            _check_written(tmp, count)
    return {"features": count, "min_pixels": min_pixels, "crs": crs.to_string() if crs else None}
