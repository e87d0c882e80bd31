"""GDAL virtual mosaics (VRT): one raster assembled from many files without copying a pixel.

    write_vrt("out/mosaic.vrt", sorted(Path("out").glob("*.tif")))  # a mosaic over label outputs

A VRT is a small XML file that GDAL (and so rasterio, QGIS, gdal_translate) reads as one raster:
for each file, which of its pixels go where in the mosaic. ``write_vrt`` places every file by its
geotransform on the grid of the first one, so the files must share a CRS and a pixel size and be
north-up (what the label GeoTIFFs of one run of rasters of one survey are). Files without
georeferencing are refused: there is nothing to place them by. The band layout (count, data type,
nodata value, colour table, colour interpretation) is the first file's.

Paths inside the VRT are relative to it when the files lie under its folder (the mosaic and its
outputs can be moved together), absolute otherwise. The VRT is written like every other output
(``seglib.io.outputs.write_text``: checked, then renamed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .outputs import write_text

__all__ = ["VrtError", "write_vrt"]

_TOLERANCE = 1e-6  # of a pixel: offsets and sizes closer than this to a whole number are that number


class VrtError(ValueError):
    """Files that cannot be put in one mosaic; the message names the file and the reason."""


def _gdal_type(dtype: str) -> str:
    names = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32"}
    names |= {"int32": "Int32", "float32": "Float32", "float64": "Float64"}
    if dtype not in names:
        raise VrtError(f"data type {dtype} is not supported in a mosaic")
    return names[dtype]


def _whole(value: float, what: str, path: Path) -> int:
    nearest = round(value)
    if abs(value - nearest) > _TOLERANCE:
        raise VrtError(
            f"{path}: {what} is {value:.6f} pixels of the mosaic's grid, not a whole number; resample it first"
        )
    return int(nearest)


def _source_path(path: Path, folder: Path) -> tuple[str, int]:
    """(the path as written in the VRT, 1 if it is relative to the VRT's folder): relative for
    files under that folder, absolute otherwise."""
    path, folder = path.resolve(), folder.resolve()
    if path.is_relative_to(folder):
        return path.relative_to(folder).as_posix(), 1
    return path.as_posix(), 0


def write_vrt(
    output: str | Path, rasters: Sequence[str | Path], *, offsets: Sequence[tuple[int, int]] | None = None
) -> Path:
    """Write a VRT at ``output`` that mosaics ``rasters`` (paths GDAL reads) and return it.

    ``offsets``: the (row, column) of each raster in the mosaic, instead of placing them by their
    geotransforms (the blocks of one raster, georeferenced or not); the mosaic then has the
    first raster's georeferencing, moved by its offset.

    Raises ``VrtError`` (a ``ValueError``) naming the file for an empty list, a file without
    georeferencing, another CRS, pixel size, band count or data type than the first, a rotated
    grid or a file off the first one's pixel grid. Where files overlap, the later one wins."""
    output, rasters = Path(output), [Path(p) for p in rasters]
    if not rasters:
        raise VrtError(
            f"{output}: no GeoTIFF to mosaic (labels are GeoTIFFs only for georeferenced GeoTIFF inputs;"
            " PNG and JPEG inputs give PNG labels, which have no place on a map: drop --mosaic or give GeoTIFFs)"
        )
    first, entries = _read_grids(rasters, georeferenced=offsets is None)
    left, top, placed = _place(entries, first["res"], offsets)
    text = _vrt_text(first, placed, left, top, output.parent)
    output.parent.mkdir(parents=True, exist_ok=True)
    return write_text(output, text)


def _read_grids(
    rasters: list[Path], *, georeferenced: bool
) -> tuple[dict[str, Any], list[tuple[Path, float, float, tuple[int, int]]]]:
    """The first raster's grid and band layout, and (path, left, top, (height, width)) of every
    raster; ``VrtError`` for a raster that does not share the first one's grid (``write_vrt``).
    ``georeferenced``: the rasters are placed by their geotransforms, so they must have one."""
    import rasterio

    entries = []
    first = None
    for path in rasters:
        with rasterio.open(path) as src:
            t = src.transform
            if georeferenced and src.crs is None and t.is_identity:
                raise VrtError(f"{path}: not georeferenced, so it has no place in a mosaic")
            if t.b or t.d:
                raise VrtError(f"{path}: a rotated grid; warp it north-up first (gdalwarp)")
            info = {
                "crs": src.crs,
                "res": (t.a, t.e),
                "count": src.count,
                "dtypes": src.dtypes,
                "nodata": src.nodata,
                "colormap": _colormap(src),
                "colorinterp": [ci.name for ci in src.colorinterp],
                "block": src.block_shapes[0],
            }
            size = (src.height, src.width)
        if first is None:
            first = info
        else:
            for key, what in (("crs", "CRS"), ("count", "band count"), ("dtypes", "data type")):
                if info[key] != first[key]:
                    raise VrtError(f"{path}: {what} {info[key]} differs from {rasters[0]}'s {first[key]}")
            if any(not math.isclose(a, b, rel_tol=1e-9) for a, b in zip(info["res"], first["res"], strict=True)):
                raise VrtError(f"{path}: pixel size {info['res']} differs from {rasters[0]}'s {first['res']}")
        entries.append((path, t.c, t.f, size))
    return first, entries


def _place(
    entries: list[tuple[Path, float, float, tuple[int, int]]],
    res: tuple[float, float],
    offsets: Sequence[tuple[int, int]] | None,
) -> tuple[float, float, list[tuple[Path, int, int, int, int]]]:
    """The mosaic's top-left corner (left, top) and (path, column, row, height, width) of each
    raster in it: at ``offsets``, or where its geotransform puts it on the first one's grid."""
    res_x, res_y = res
    if offsets is not None:
        (row0, col0), (_, c0, f0, _) = offsets[0], entries[0]
        left, top = c0 - col0 * res_x, f0 - row0 * res_y
        placed = [(path, col, row, h, w) for (path, _, _, (h, w)), (row, col) in zip(entries, offsets, strict=True)]
        return left, top, placed
    left = min(c for _, c, _, _ in entries)
    top = max(f for _, _, f, _ in entries) if res_y < 0 else min(f for _, _, f, _ in entries)
    placed = []
    for path, c, f, (h, w) in entries:
        x0 = _whole((c - left) / res_x, "the column offset", path)
        y0 = _whole((f - top) / res_y, "the row offset", path)
        placed.append((path, x0, y0, h, w))
    return left, top, placed


def _vrt_text(
    first: dict[str, Any], placed: list[tuple[Path, int, int, int, int]], left: float, top: float, folder: Path
) -> str:
    """The VRT's XML: the first raster's CRS, bands, nodata and colour table; every raster a
    ``SimpleSource`` of every band (paths relative to ``folder`` where they lie under it)."""
    res_x, res_y = first["res"]
    width = max(x0 + w for _, x0, _, _, w in placed)
    height = max(y0 + h for _, _, y0, h, _ in placed)
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">']
    if first["crs"] is not None:
        lines.append(f"  <SRS>{escape(first['crs'].to_wkt())}</SRS>")
    if first["crs"] is not None or (left, res_x, top, res_y) != (0.0, 1.0, 0.0, 1.0):
        lines.append(f"  <GeoTransform>{left!r}, {res_x!r}, 0.0, {top!r}, 0.0, {res_y!r}</GeoTransform>")
    block_y, block_x = first["block"]
    for band in range(1, first["count"] + 1):
        lines.append(f'  <VRTRasterBand dataType="{_gdal_type(first["dtypes"][band - 1])}" band="{band}">')
        if first["nodata"] is not None:
            lines.append(f"    <NoDataValue>{first['nodata']!r}</NoDataValue>")
        interp = first["colorinterp"][band - 1]
        lines.append(f"    <ColorInterp>{interp.capitalize() if interp != 'undefined' else 'Undefined'}</ColorInterp>")
        if band == 1 and first["colormap"]:
            lines.append("    <ColorTable>")
            for index in range(max(first["colormap"]) + 1):
                r, g, b, a = first["colormap"].get(index, (0, 0, 0, 0))
                lines.append(f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>')
            lines.append("    </ColorTable>")
        for path, x0, y0, h, w in placed:
            name, relative = _source_path(path, folder)
            lines += [
                "    <SimpleSource>",
                f'      <SourceFilename relativeToVRT="{relative}">{escape(name)}</SourceFilename>',
                f"      <SourceBand>{band}</SourceBand>",
                f'      <SourceProperties RasterXSize="{w}" RasterYSize="{h}" '
                f'DataType="{_gdal_type(first["dtypes"][band - 1])}" BlockXSize="{block_x}" BlockYSize="{block_y}"/>',
                f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
                f'      <DstRect xOff="{x0}" yOff="{y0}" xSize="{w}" ySize="{h}"/>',
                "    </SimpleSource>",
            ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def _colormap(src) -> dict[int, tuple[int, int, int, int]] | None:
    """Band 1's colour table, or None."""
    try:
        return dict(src.colormap(1))
    except ValueError:  # no colour table
        return None
