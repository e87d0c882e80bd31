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

GeoTIFFs are read with rasterio (its wheels carry GDAL); other formats with Pillow.

``BandStretch`` is that policy, decided once from a sample of the image (the whole image for
``read_image``; a decimated overview for a large raster, so that every window gets the same
stretch). Window readers (``RasterSource`` for files GDAL reads, ``ArraySource`` for arrays, both
``read(y, x, h, w) -> uint8 (h, w, 3)``) apply it; ``open_source`` picks one for a file, so a
raster of any size is never read whole (``seglib.raster`` segments it window by window).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ImageReadError",
    "IMAGE_SUFFIXES",
    "GEOTIFF_SUFFIXES",
    "BandStretch",
    "ArraySource",
    "RasterSource",
    "open_source",
    "read_image",
    "to_uint8_rgb",
    "list_images",
    "read_mask",
    "write_png",
]

log = logging.getLogger("seglib.io")

GEOTIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + GEOTIFF_SUFFIXES
OVERVIEW_PIXELS = 1 << 20  # a large raster's stretch comes from an overview of at most ~1 Mpx


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


def _bands_error(name: str, count: int) -> ImageReadError:
    return ImageReadError(
        f"{name}: {count} bands, but seglib needs RGB (3 bands); extract the red, green and blue bands first, "
        "e.g. `gdal_translate -b 3 -b 2 -b 1 in.tif rgb.tif` (band numbers depend on the sensor)"
    )


def _decode_error(path: Path, exc: Exception) -> ImageReadError:
    return ImageReadError(
        f"{path}: cannot decode ({type(exc).__name__}: {exc}); the file is corrupt or truncated, re-export it"
    )


@dataclass(frozen=True)
class BandStretch:
    """How an image of any dtype and band count becomes uint8 RGB (the policy of this module).

    Arguments:
      bands: source band indices (0-based) used as R, G and B.
      lo, hi: per output channel, the values mapped to 0 and 255 (``None``: uint8, used as is).
      notes: the conversions, in words.
    """

    bands: tuple[int, int, int]
    lo: np.ndarray | None
    hi: np.ndarray | None
    notes: tuple[str, ...]

    @classmethod
    def measure(cls, sample: np.ndarray, name: str = "image", *, overview: bool = False) -> BandStretch:
        """The stretch for a bands-last (h, w, C) ``sample``: the whole image, or (``overview``)
        a decimated read of a raster whose every window then gets the same stretch."""
        c = sample.shape[-1]
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
            raise _bands_error(name, c)
        notes += [note] if note else []
        if sample.dtype == np.uint8:
            return cls(bands, None, None, tuple(notes))
        data = sample[..., list(bands)].astype(np.float64)
        bad = ~np.isfinite(data)
        if bad.any():
            notes.append(
                f"NaN/inf pixels: set to 0 ({int(bad.any(-1).sum())} in the {'overview' if overview else 'image'})"
            )
            data[bad] = 0
        if np.issubdtype(sample.dtype, np.floating) and data.min() >= 0 and data.max() <= 1:
            notes.append("float in [0, 1]: scaled by 255")
            return cls(bands, np.zeros(3), np.ones(3), tuple(notes))
        lo = np.percentile(data, 2, axis=(0, 1))
        hi = np.percentile(data, 98, axis=(0, 1))
        where = " of an overview" if overview else ""
        every = ", the same for every window" if overview else ""
        notes.append(
            f"{sample.dtype} data: stretched per band from the 2nd-98th percentile{where} "
            f"(lo {np.round(lo, 3).tolist()}, hi {np.round(hi, 3).tolist()}) to 0..255{every}"
        )
        return cls(bands, lo, hi, tuple(notes))

    def apply(self, window: np.ndarray) -> np.ndarray:
        """(h, w, C) source pixels of any dtype -> uint8 (h, w, 3)."""
        rgb = window[..., list(self.bands)]
        if self.lo is None:
            return np.ascontiguousarray(rgb)
        data = np.nan_to_num(rgb.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = (data - self.lo.astype(np.float32)) / np.maximum(self.hi - self.lo, 1e-12).astype(np.float32)
        return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def to_uint8_rgb(bands: np.ndarray, name: str = "image") -> tuple[np.ndarray, list[str]]:
    """Bands-last array (H, W, C) of any dtype -> (uint8 (H, W, 3), notes), by the module policy."""
    if bands.ndim == 2:
        bands = bands[..., None]
    if bands.ndim != 3:
        raise ImageReadError(f"{name}: expected a 2-D image with bands, got shape {bands.shape}")
    stretch = BandStretch.measure(bands, name)
    return stretch.apply(bands), list(stretch.notes)


def _overview_step(height: int, width: int) -> int:
    return max(1, math.ceil(math.sqrt(height * width / OVERVIEW_PIXELS)))


class _WindowReader:
    """What the window readers share: ``with reader:`` closes it."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArraySource(_WindowReader):
    """An in-memory (H, W, C) array read window by window.

    Arguments:
      image: bands-last array of any dtype this module accepts (uint8, 16-bit, float).
      name: how messages refer to it.
    """

    def __init__(self, image: np.ndarray, *, name: str = "image"):
        image = image[..., None] if image.ndim == 2 else image
        self.image, self.name, self.profile = image, name, {}
        self.height, self.width = image.shape[:2]
        step = _overview_step(self.height, self.width)
        self.stretch = BandStretch.measure(image[::step, ::step], name, overview=step > 1)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) of rows y..y+h and columns x..x+w."""
        return self.stretch.apply(self.image[y : y + h, x : x + w])


class RasterSource(_WindowReader):
    """A raster file (GeoTIFF or anything GDAL reads) read window by window with rasterio.

    Arguments:
      path: the raster; a missing, corrupt or non-RGB file raises ``ImageReadError``.

    Use as a context manager (``with RasterSource(path) as src:``) so the file is closed.
    ``profile`` is the file's rasterio profile (CRS, transform, ...).
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
            self.height, self.width, self.profile = ds.height, ds.width, dict(ds.profile)
            if self.height < 1 or self.width < 1:
                raise ImageReadError(f"{self.path}: empty image")
            if ds.count == 2 or ds.count > 4:
                raise _bands_error(str(self.path), ds.count)
            step = _overview_step(self.height, self.width)
            shape = (ds.count, math.ceil(self.height / step), math.ceil(self.width / step))
            overview = ds.read(out_shape=shape, resampling=Resampling.nearest)  # (C, h, w), decimated
            self.stretch = BandStretch.measure(np.moveaxis(overview, 0, -1), self.name, overview=True)
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


def open_source(path: str | Path) -> ArraySource | RasterSource:
    """A window reader for an image file: GeoTIFFs through rasterio, window by window (never
    read whole); PNG and JPEG decoded whole by ``read_image``."""
    path = Path(path)
    if path.suffix.lower() in GEOTIFF_SUFFIXES:
        try:
            import rasterio  # noqa: F401
        except ImportError:  # plain TIFFs still work through Pillow
            pass
        else:
            return RasterSource(path)
    rgb, _ = read_image(path)  # its conversions are logged here
    return ArraySource(rgb, name=str(path))


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
        raise _decode_error(path, exc) from exc


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import rasterio
    except ImportError:  # plain TIFFs still work through Pillow
        return _read_pillow(path)
    try:
        with rasterio.open(path) as src:
            if src.count > 4 or src.count == 2:
                raise _bands_error(str(path), src.count)
            return np.moveaxis(src.read(), 0, -1)  # (H, W, C)
    except ImageReadError:
        raise
    except Exception as exc:  # rasterio raises its own error types for corrupt files
        raise _decode_error(path, exc) from exc


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


def write_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (a temporary file renamed)."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
    return path
