"""Files beside an output that GIS software reads with it: a world file (the affine transform of
a PNG), GDAL's ``.aux.xml`` (the CRS, a colour table, a raster attribute table), a QGIS style.

Each function returns the text of one file; ``seglib.io.outputs`` writes them through the same
checked path as the output itself, renamed together with it.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

__all__ = ["world_file_path", "world_file", "pam_path", "pam_xml"]

WORLD_SUFFIXES = {".png": ".pgw", ".jpg": ".jgw", ".jpeg": ".jgw", ".tif": ".tfw", ".tiff": ".tfw"}


def world_file_path(raster: Path) -> Path:
    """``a.png`` -> ``a.pgw`` (the name GDAL, QGIS and ArcGIS look for first; ``.wld`` otherwise)."""
    return raster.with_suffix(WORLD_SUFFIXES.get(raster.suffix.lower(), ".wld"))


def _number(value: float) -> str:
    return format(float(value), ".17g")


def world_file(transform) -> str:
    """The six lines of a world file for an ``affine.Affine`` ``transform``: pixel size in x,
    rotation terms, pixel size in y, and the map coordinates of the *centre* of the upper-left
    pixel (the transform gives its corner)."""
    a, b, c, d, e, f = transform[:6]
    return "\n".join(_number(v) for v in (a, d, b, e, c + a / 2 + b / 2, f + d / 2 + e / 2)) + "\n"


def pam_path(raster: Path) -> Path:
    """``a.png`` -> ``a.png.aux.xml``, GDAL's persistent auxiliary metadata beside a raster."""
    return raster.with_name(raster.name + ".aux.xml")


def pam_xml(*, crs_wkt: str | None = None, band: str = "") -> str:
    """GDAL's ``.aux.xml`` (PAMDataset) with the CRS (``crs_wkt``) and ``band``, the inner XML of
    band 1 (colour table, attribute table; ``seglib.io.legend_files``)."""
    lines = ["<PAMDataset>"]
    if crs_wkt:
        lines.append(f"  <SRS dataAxisToSRSAxisMapping={quoteattr('1,2')}>{escape(crs_wkt)}</SRS>")
    if band:
        lines += ['  <PAMRasterBand band="1">', band.rstrip("\n"), "  </PAMRasterBand>"]
    lines.append("</PAMDataset>")
    return "\n".join(lines) + "\n"
