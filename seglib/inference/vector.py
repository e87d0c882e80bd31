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
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.outputs import committed
from ..io.sidecars import read_attribute_table

__all__ = [
    "VECTOR_FORMATS",
    "MinArea",
    "parse_min_area",
    "check_vector_format",
    "min_area_pixels",
    "pixel_space",
    "raster_frame",
    "polygonize",
    "ring_area",
]

log = logging.getLogger("seglib.inference.vector")

# --vector NAME -> (GDAL/OGR driver, file suffix)
VECTOR_FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson"), "fgb": ("FlatGeobuf", ".fgb")}
BATCH = 4096  # features handed to the writer at a time
GPKG_DATE = "2000-01-01T00:00:00.000Z"  # gpkg_contents.last_change of every GeoPackage written
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


def pixel_space(transform, crs) -> bool:
    """True for a raster with neither a CRS nor a transform (a PNG without a world file, a GCP-
    or RPC-georeferenced raster): its polygons can only be in pixel coordinates."""
    return crs is None and transform.is_identity


def raster_frame(transform, crs):
    """The transform polygons are traced with: the raster's, or for a raster in pixel space
    (``pixel_space``) x = column, y = -row, the frame QGIS shows such a raster in (its top-left
    corner at 0, 0 and rows going down), so the polygons lie on it and are not upside down."""
    from affine import Affine

    return Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0) if pixel_space(transform, crs) else transform


def units(crs) -> str:
    """The square units of a CRS's map coordinates, in words ("m2", "square degrees", ...)."""
    if crs is None:
        return "px"
    if crs.is_geographic:
        return "square degrees"
    unit = (crs.linear_units or "").lower()
    return {"metre": "m2", "meter": "m2", "foot": "ft2", "us survey foot": "US ft2"}.get(
        unit, f"square {unit or 'map units'}"
    )


def min_area_pixels(min_area: MinArea | None, transform, crs, size: tuple[int, int], name: str) -> tuple[int, str]:
    """(the smallest region kept, in pixels; the ``--min-area`` in words, units included) for a
    raster of ``size`` (H, W). ``ValueError`` naming the units and the fix when it covers the
    whole raster (50 square degrees on EPSG:4326: the sieve cannot work)."""
    if min_area is None:
        return 0, ""
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
    if min_area.pixels or pixel_space(transform, crs):
        n = math.ceil(min_area.value)
        return n, f"--min-area {min_area.value:g} px"
    n = min_area.to_pixels(pixel_area)
    text = f"--min-area {min_area.value:g} {units(crs)} ({crs.to_string()} units) = {n} px"
    if n >= size[0] * size[1]:
        hint = ("it is a geographic CRS, so the units are degrees: give pixels instead (e.g. --min-area 12px), or "
                "reproject to a projected CRS first (gdalwarp -t_srs EPSG:...)") if crs.is_geographic else (
                "give a smaller area, or pixels (e.g. --min-area 12px)")  # fmt: skip
        raise ValueError(
            f"{name}: {text}, at least the whole {size[1]} x {size[0]} px raster, so every segment would merge; {hint}"
        )
    return n, text


def ring_area(ring: list) -> float:
    """Unsigned shoelace area of a closed ring of (x, y) points."""
    xy = np.asarray(ring, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2


def _polygon_area(geometry: dict) -> float:
    rings = geometry["coordinates"]
    return ring_area(rings[0]) - sum(ring_area(r) for r in rings[1:])


def _check_written(path: Path, count: int, *, layer: str) -> None:
    """``OSError`` unless the closed file reads back with ``count`` features in ``layer`` (fiona
    reports most write errors, not all of GDAL's at closing)."""
    import fiona

    with fiona.open(path, layer=layer if path.suffix == ".gpkg" else None) as src:
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
    PNG) as polygons to ``output``; returns ``{"features", "min_pixels", "crs", "legend"}``.
    A GeoPackage also gets the raster's legend (its attribute table, ``seglib.io.sidecars``) as
    the table ``<layer>_legend``: per label its name, colour, mean RGB and shares.

    ``min_area`` sieves regions below it into their largest neighbour first (``min_area_pixels``:
    ``ValueError`` when it covers the whole raster). A raster without georeferencing (a PNG
    without a world file) gets polygons in pixel coordinates, y = -row (``raster_frame``), no
    CRS, and a warning that says so.
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
        crs = src.crs
        min_pixels, what = min_area_pixels(min_area, src.transform, crs, src.shape, Path(labels).name)
        transform = raster_frame(src.transform, crs)
        pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
        if pixel_space(src.transform, crs):
            log.warning(
                "%s: not georeferenced (no CRS or transform%s), so its polygons are in pixel coordinates: x = column, "
                "y = -row (where QGIS shows the raster), no CRS; areas in px",
                Path(labels).name, "; GCPs and RPCs are not applied" if src.gcps[0] or src.rpcs else "",
            )  # fmt: skip
        if what:
            log.info("%s: %s", Path(output).name, what)
        mask = src.read_masks(1) > 0 if src.nodata is not None else None
        if min_pixels > 1:
            source = sieve(src.read(1), min_pixels, mask=mask, connectivity=4)
        else:
            source = rasterio.band(src, 1)  # GDAL reads the band block by block
        count = 0
        # A fixed date in the GeoPackage's metadata (it would be the time of writing): reruns write the same bytes.
        with committed(output, keep_suffix=True) as tmp, fiona.Env(OGR_CURRENT_DATE=GPKG_DATE):
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
            rows = read_attribute_table(Path(labels)) if driver == "GPKG" else []
            if rows:
                _write_lookup_table(tmp, f"{layer or output.stem}_legend", rows)
            _check_written(tmp, count, layer=layer or output.stem)
    return {"features": count, "min_pixels": min_pixels, "crs": crs.to_string() if crs else None, "legend": bool(rows)}


def _write_lookup_table(path: Path, layer: str, rows: list[dict]) -> None:
    """The label raster's attribute table as a table of the GeoPackage (no geometry): per label
    its name, colour (``#rrggbb``), mean RGB, pixels and shares; join it to the polygons on ``label``."""
    import fiona

    kinds = {int: "int", float: "float", str: "str"}
    records = [{"label" if key == "value" else key: value for key, value in row.items()} for row in rows]
    for record in records:
        record["colour"] = f"#{record['red']:02x}{record['green']:02x}{record['blue']:02x}"
    schema = {"geometry": None, "properties": {key: kinds[type(value)] for key, value in records[0].items()}}
    with fiona.open(path, "w", driver="GPKG", schema=schema, layer=layer) as table:
        table.writerecords([{"geometry": None, "properties": record} for record in records])
