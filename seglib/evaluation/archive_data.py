"""Synthetic archives for the tests and the benchmark of archive-scale inference: folders of
georeferenced GeoTIFF tiles that abut on one grid (a survey cut into map sheets), made from
``seglib.data.synthetic`` scenes, so nothing needs downloading."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.synthetic import make_tile

__all__ = ["write_archive", "write_geotiff", "CRS", "PIXEL"]

CRS = "EPSG:32640"  # UTM zone 40N (Dubai)
PIXEL = 0.5  # metres


def write_geotiff(path: Path, rgb: np.ndarray, *, left: float, top: float, block: int = 256) -> Path:
    """Write uint8 RGB (H, W, 3) as a tiled, deflate GeoTIFF whose top-left corner is at
    (``left``, ``top``) in ``CRS``, ``PIXEL`` m pixels."""
    import rasterio
    from rasterio.transform import Affine

    h, w = rgb.shape[:2]
    profile = {"driver": "GTiff", "height": h, "width": w, "count": 3, "dtype": "uint8", "crs": CRS}
    profile |= {"transform": Affine(PIXEL, 0.0, left, 0.0, -PIXEL, top), "compress": "deflate"}
    if min(h, w) >= block:
        profile |= {"tiled": True, "blockxsize": block, "blockysize": block}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(rgb, -1, 0))
    return path


def write_archive(folder: str | Path, n: int, *, size: int = 128, columns: int = 10, seed: int = 0) -> list[Path]:
    """``n`` tiles of ``size`` px named ``tile_00000.tif``, ... in ``folder``, laid out
    ``columns`` to a row on one grid (tile i at row i // columns, column i % columns), each a
    different synthetic scene. Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rgb = (make_tile(size, seed=seed * 1_000_003 + i).rgb * 255).round().astype(np.uint8)
        left, top = 500_000.0 + (i % columns) * size * PIXEL, 2_800_000.0 - (i // columns) * size * PIXEL
        paths.append(write_geotiff(folder / f"tile_{i:05d}.tif", rgb, left=left, top=top))
    return paths
