"""Reading user imagery: PNG, JPEG and GeoTIFF, with an explicit policy for every odd input.

``read_image(path)`` returns ``(rgb uint8 (H, W, 3), notes)`` where ``notes`` lists the
conversions applied (each also logged at INFO level on the ``seglib.io`` logger):

| input | policy |
|---|---|
| RGB, 8-bit | used as is |
| grayscale (1 band, mode L) | replicated to 3 channels, noted |
| grayscale + alpha, RGBA, 4-band GeoTIFF | extra band dropped (alpha or NIR), noted |
| palette (mode P) | expanded through its palette, noted |
| 16-bit, or float | stretched per band from the 2nd to the 98th percentile to 0..255, noted |
| NaN / inf pixels (float rasters) | set to 0 before the stretch, noted |
| 2 bands, or more than 4 | rejected: ``ImageReadError`` says how to pick RGB bands |
| corrupt / truncated file | ``ImageReadError`` naming the file |

GeoTIFFs are read with rasterio (its wheels carry GDAL); other formats with Pillow. Large
rasters should not go through ``read_image``: ``seglib.raster`` reads them window by window.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = [
    "ImageReadError",
    "IMAGE_SUFFIXES",
    "GEOTIFF_SUFFIXES",
    "read_image",
    "to_uint8_rgb",
    "list_images",
    "read_mask",
]

log = logging.getLogger("seglib.io")

GEOTIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + GEOTIFF_SUFFIXES


class ImageReadError(ValueError):
    """An image that cannot be used; the message names the file, the problem and the fix."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files (PNG, JPEG, GeoTIFF) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageReadError(
            f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); "
            "point --data-dir/--input at a folder of RGB tiles"
        )
    return files


def to_uint8_rgb(bands: np.ndarray, name: str = "image") -> tuple[np.ndarray, list[str]]:
    """Bands-last array (H, W, C) of any dtype -> (uint8 (H, W, 3), notes), by the module policy."""
    notes: list[str] = []
    if bands.ndim == 2:
        bands = bands[..., None]
    if bands.ndim != 3:
        raise ImageReadError(f"{name}: expected a 2-D image with bands, got shape {bands.shape}")
    c = bands.shape[-1]
    if c == 1:
        bands = np.repeat(bands, 3, axis=-1)
        notes.append("grayscale: replicated to 3 channels")
    elif c == 2:
        bands = np.repeat(bands[..., :1], 3, axis=-1)
        notes.append("grayscale + alpha: alpha dropped, grey replicated to 3 channels")
    elif c == 4:
        bands = bands[..., :3]
        notes.append("4 bands: used bands 1-3 as RGB, band 4 (alpha or NIR) ignored")
    elif c != 3:
        raise ImageReadError(
            f"{name}: {c} bands, but seglib needs RGB (3 bands); extract the red, green and blue bands first, "
            "e.g. `gdal_translate -b 3 -b 2 -b 1 in.tif rgb.tif` (band numbers depend on the sensor)"
        )
    if bands.dtype == np.uint8:
        return np.ascontiguousarray(bands), notes
    data = bands.astype(np.float64)
    bad = ~np.isfinite(data)
    if bad.any():
        notes.append(f"{int(bad.any(-1).sum())} pixels were NaN/inf: set to 0")
        data[bad] = 0
    if np.issubdtype(bands.dtype, np.floating) and data.min() >= 0 and data.max() <= 1:
        notes.append("float in [0, 1]: scaled by 255")
        return np.round(data * 255).astype(np.uint8), notes
    lo = np.percentile(data, 2, axis=(0, 1))
    hi = np.percentile(data, 98, axis=(0, 1))
    scaled = (data - lo) / np.maximum(hi - lo, 1e-12)
    notes.append(f"{bands.dtype} data: stretched per band from the 2nd-98th percentile to 0..255")
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), notes


def read_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read one image file as uint8 RGB (H, W, 3); see the module docstring for the policy."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r}; use PNG, JPEG or GeoTIFF")
    if suffix in GEOTIFF_SUFFIXES:
        bands = _read_tiff(path)
    else:
        bands = _read_pillow(path)
    rgb, notes = to_uint8_rgb(bands, str(path))
    if min(rgb.shape[:2]) < 1:
        raise ImageReadError(f"{path}: empty image")
    for note in notes:
        log.info("%s: %s", path.name, note)
    return rgb, notes


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated file fails here, not later
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                log.info("%s: palette image expanded to RGB", path.name)
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
                log.info("%s: mode %s converted to RGB", path.name, mode)
            arr = np.asarray(im)
            if mode.startswith("I;16") or mode in ("I", "F"):
                arr = arr.astype(np.uint16 if mode.startswith("I;16") else np.float64)
            return arr
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"{path}: cannot decode ({type(exc).__name__}: {exc}); the file is corrupt or truncated, re-export it"
        ) from exc


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import rasterio
    except ImportError:  # plain TIFFs still work through Pillow
        return _read_pillow(path)
    try:
        with rasterio.open(path) as src:
            if src.count > 4 or src.count == 2:
                raise ImageReadError(
                    f"{path}: {src.count} bands, but seglib needs RGB (3 bands); extract them first, e.g. "
                    "`gdal_translate -b 3 -b 2 -b 1 in.tif rgb.tif` (band numbers depend on the sensor)"
                )
            return np.moveaxis(src.read(), 0, -1)  # (H, W, C)
    except ImageReadError:
        raise
    except Exception as exc:  # rasterio raises its own error types for corrupt files
        raise ImageReadError(
            f"{path}: cannot decode ({type(exc).__name__}: {exc}); the file is corrupt or truncated, re-export it"
        ) from exc


def read_mask(path: str | Path) -> np.ndarray:
    """A label mask (PNG of class indices) as int64 (H, W)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ImageReadError(f"{path}: mask must be single-channel class indices, got mode {im.mode}")
            return np.asarray(im).astype(np.int64)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot decode mask ({exc})") from exc
