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

import dataclasses
import logging
import math
import os
import uuid
import warnings
from dataclasses import dataclass, field
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
    "valid_box",
    "write_png",
    "temporary_path",
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
      fill: uint8 RGB (3,) that masked (nodata) pixels are given before the model sees them:
        the mean colour of the valid pixels, so the model sees no false edge of black.
    """

    bands: tuple[int, int, int]
    lo: np.ndarray | None
    hi: np.ndarray | None
    notes: tuple[str, ...]
    fill: np.ndarray = field(default_factory=lambda: np.full(3, 128, np.uint8))

    @classmethod
    def measure(
        cls,
        sample: np.ndarray,
        name: str = "image",
        *,
        overview: bool = False,
        valid: np.ndarray | None = None,
        float_is_rgb: bool = False,
    ) -> BandStretch:
        """The stretch for a bands-last (h, w, C) ``sample``: the whole image, or (``overview``)
        a decimated read of a raster whose every window then gets the same stretch.

        Only pixels that are ``valid`` (h, w) and finite count: nodata never sets the contrast.
        Every dtype but uint8 is stretched from the 2nd to the 98th percentile per band;
        ``float_is_rgb`` keeps float data in [0, 1] as it is (RGB arrays of the Python API)."""
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
        where = "overview" if overview else "image"
        data = sample[..., list(bands)]
        finite = np.isfinite(data).all(-1) if np.issubdtype(data.dtype, np.floating) else np.ones(data.shape[:2], bool)
        if not finite.all():
            notes.append(f"NaN/inf pixels: nodata ({int((~finite).sum())} in the {where})")
        ok = finite if valid is None else finite & valid
        if not ok.any():
            raise ImageReadError(f"{name}: no valid pixels (all nodata, masked or NaN); check the file's nodata value")
        values = data[ok].astype(np.float64)  # (N, 3) valid pixels
        if sample.dtype == np.uint8:
            return cls(bands, None, None, tuple(notes), _mean_colour(values))
        if float_is_rgb and np.issubdtype(sample.dtype, np.floating) and values.min() >= 0 and values.max() <= 1:
            notes.append("float in [0, 1]: scaled by 255")
            lo, hi = np.zeros(3), np.ones(3)
        else:
            lo, hi = np.percentile(values, 2, axis=0), np.percentile(values, 98, axis=0)
            every = ", the same for every window" if overview else ""
            of = " of an overview" if overview else ""
            valid_only = ", valid pixels only" if valid is not None and not valid.all() else ""
            notes.append(
                f"{sample.dtype} data: stretched per band from the 2nd-98th percentile{of}{valid_only} "
                f"(lo {np.round(lo, 3).tolist()}, hi {np.round(hi, 3).tolist()}) to 0..255{every}"
            )
        scaled = np.clip((values - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255
        return cls(bands, lo, hi, tuple(notes), _mean_colour(scaled))

    @property
    def identity(self) -> bool:
        """True when the source's first three bands are the uint8 RGB as they are."""
        return self.lo is None and self.bands == (0, 1, 2)

    def apply(self, window: np.ndarray) -> np.ndarray:
        """(h, w, C) source pixels of any dtype -> uint8 (h, w, 3)."""
        return np.moveaxis(self.apply_bands(np.moveaxis(window, -1, 0)), 0, -1)

    def apply_bands(self, bands: np.ndarray) -> np.ndarray:
        """Bands-first (C, h, w) source pixels of any dtype -> C-contiguous uint8 (3, h, w), the
        layout GDAL reads and the model takes, so the common uint8 RGB case copies nothing more."""
        rgb = bands[:3] if self.identity else bands[list(self.bands)]
        if self.lo is None:
            return np.ascontiguousarray(rgb)
        data = np.nan_to_num(rgb.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo = self.lo.astype(np.float32)[:, None, None]
        scale = np.maximum(self.hi - self.lo, 1e-12).astype(np.float32)[:, None, None]
        return np.round(np.clip((data - lo) / scale, 0, 1) * 255).astype(np.uint8)


def _mean_colour(values: np.ndarray) -> np.ndarray:
    """uint8 (3,) mean of (N, 3) values on the 0..255 scale."""
    return np.round(values.mean(0)).clip(0, 255).astype(np.uint8)


def fill_masked(rgb: np.ndarray, valid: np.ndarray | None, fill: np.ndarray) -> np.ndarray:
    """uint8 (3, h, w) with the pixels that are not ``valid`` (h, w) set to ``fill`` (3,), in place."""
    if valid is not None:
        rgb[:, ~valid] = fill[:, None]
    return rgb


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
      valid: optional (H, W) bool, True where the pixel is image data (False: nodata), the
        meaning of a GDAL mask; NaN pixels of a float image count as nodata too.
      float_is_rgb: float data in [0, 1] is RGB as it is (the Python API's contract; the
        default), not stretched like any other non-uint8 data (False: the file policy).
    """

    def __init__(
        self, image: np.ndarray, *, name: str = "image", valid: np.ndarray | None = None, float_is_rgb: bool = True
    ):
        image = image[..., None] if image.ndim == 2 else image
        self.image, self.name, self.profile = image, name, {}
        self.height, self.width = image.shape[:2]
        if valid is not None and valid.all():
            valid = None
        self.valid = valid
        step = _overview_step(self.height, self.width)
        sample_valid = None if valid is None else valid[::step, ::step]
        self.stretch = BandStretch.measure(
            image[::step, ::step], name, overview=step > 1, valid=sample_valid, float_is_rgb=float_is_rgb
        )
        if valid is not None:
            note = (
                f"nodata (mask or alpha): {100 * (1 - valid.mean()):.1f} % of the pixels; left out of the "
                "stretch, the clusters and the labels (written as nodata)"
            )
            self.stretch = dataclasses.replace(self.stretch, notes=(note, *self.stretch.notes))
        self.masked = valid is not None or np.issubdtype(image.dtype, np.floating)  # NaN is nodata too
        self.valid_box = None if valid is None else valid_box(valid)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) of rows y..y+h and columns x..x+w (nodata in the fill colour)."""
        return np.moveaxis(self.read_bands(y, x, h, w), 0, -1)

    def read_bands(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The same window bands-first: C-contiguous uint8 (3, h, w)."""
        return self.read_masked(y, x, h, w)[0]

    def read_masked(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 RGB (3, h, w), valid (h, w) bool or None when every pixel is valid)."""
        window = np.moveaxis(self.image[y : y + h, x : x + w], -1, 0)  # (C, h, w)
        rgb = self.stretch.apply_bands(window)
        if not self.masked:
            return rgb, None
        valid = np.ones((h, w), bool) if self.valid is None else self.valid[y : y + h, x : x + w].copy()
        if np.issubdtype(window.dtype, np.floating):
            valid &= np.isfinite(window[list(set(self.stretch.bands))]).all(0)
        return _masked(rgb, valid, self.stretch.fill)


def valid_box(valid: np.ndarray, size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the pixels that are ``valid`` (h, w), in an image of ``size``
    (H, W) when ``valid`` is a decimated overview of it: then widened by one overview pixel on
    every side, so the box holds every valid pixel the decimation may have skipped."""
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    box = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    if size is None or size == valid.shape:
        return tuple(int(v) for v in box)
    sy, sx = size[0] / valid.shape[0], size[1] / valid.shape[1]
    top, left = max(0, math.floor((box[0] - 1) * sy)), max(0, math.floor((box[1] - 1) * sx))
    return top, left, min(size[0], math.ceil((box[2] + 1) * sy)), min(size[1], math.ceil((box[3] + 1) * sx))


def _masked(rgb: np.ndarray, valid: np.ndarray, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if valid.all():
        return rgb, None
    return fill_masked(rgb, valid, fill), valid


class RasterSource(_WindowReader):
    """A raster file (GeoTIFF or anything GDAL reads) read window by window with rasterio.

    Arguments:
      path: the raster; a missing, corrupt or non-RGB file raises ``ImageReadError``.

    Use as a context manager (``with RasterSource(path) as src:``) so the file is closed.
    ``profile`` is the file's rasterio profile (CRS, transform, GCPs, ...). Nodata comes from
    the file the way GDAL defines it: an alpha band (0 is nodata), an internal or sidecar mask
    band, a nodata value (a pixel is nodata when every band has it), NaN in float bands.
    ``masked`` says whether the file has any of these (for a float raster, only when its
    overview holds NaN). A single band with a colour table is expanded through it (entries
    with alpha 0 are nodata), as ``gdal_translate -expand rgb`` would.
    """

    def __init__(self, path: str | Path):
        import rasterio

        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise ImageReadError(f"image not found: {self.path}")
        try:
            with warnings.catch_warnings():  # rasters without georeferencing are fine (noted below)
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.dataset = rasterio.open(self.path)
        except Exception as exc:  # rasterio raises its own error types for corrupt files
            raise _decode_error(self.path, exc) from exc
        try:
            self._open()
        except ImageReadError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise _decode_error(self.path, exc) from exc

    def _open(self) -> None:
        from rasterio.enums import ColorInterp, MaskFlags, Resampling

        ds = self.dataset
        self.height, self.width, self.profile = ds.height, ds.width, dict(ds.profile)
        if self.height < 1 or self.width < 1:
            raise ImageReadError(f"{self.path}: empty image")
        gcps, gcp_crs = ds.gcps
        self.gcps = (gcps, gcp_crs) if gcps and gcp_crs is not None else None
        notes = ["GCPs without a CRS: not copied to the output (GDAL needs both)"] if gcps and gcp_crs is None else []
        self.lut = None  # (256, 4) uint8 colour table of a paletted band
        if ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette:
            table = ds.colormap(1)
            self.lut = np.zeros((256, 4), np.uint8)
            for index, colour in table.items():
                if 0 <= index < 256:
                    self.lut[index] = colour
            notes.append(f"paletted band: expanded to RGB through its colour table ({len(table)} entries)")
        count = 3 if self.lut is not None else ds.count
        self.alpha = next((i for i, ci in enumerate(ds.colorinterp) if ci == ColorInterp.alpha), None)
        if self.alpha is not None and count in (2, 4):
            count -= 1  # the alpha band is a mask, not a colour
        elif count == 2 or count > 4:
            raise _bands_error(str(self.path), ds.count)
        flags = ds.mask_flag_enums[0]
        self.mask_band = MaskFlags.per_dataset in flags and self.alpha is None
        self.nodata = ds.nodata if MaskFlags.nodata in flags else None
        self.float = any(np.issubdtype(np.dtype(t), np.floating) for t in ds.dtypes)
        kinds = [
            *(["alpha band (0 is nodata)"] if self.alpha is not None else []),
            *(["mask band"] if self.mask_band else []),
            *([f"nodata value {self.nodata:g}"] if self.nodata is not None else []),
        ]
        self.masked = bool(kinds)
        self.valid_box = None
        self.colour_bands = [b for b in range(ds.count) if b != self.alpha][:count] if self.lut is None else [0]
        if set(ds.dtypes) == {"uint8"} and not self.masked:
            # Used as they are: nothing to measure, no pass over the file for an overview.
            self.stretch = BandStretch.measure(np.zeros((1, 1, count), np.uint8), self.name)
        else:
            step = _overview_step(self.height, self.width)
            shape = (math.ceil(self.height / step), math.ceil(self.width / step))
            sample, valid = self._read(None, shape, Resampling.nearest)
            if valid is not None and valid.any():
                self.valid_box = valid_box(valid, (self.height, self.width))
            if self.float and not np.isfinite(sample).all():
                self.masked, kinds = True, [*kinds, "NaN"]
            self.stretch = BandStretch.measure(np.moveaxis(sample, 0, -1), self.name, overview=True, valid=valid)
            if valid is not None and not valid.all():
                share = 100 * (1 - valid.mean())
                notes.append(
                    f"nodata ({', '.join(kinds)}): {share:.1f} % of the overview; left out of the stretch, "
                    f"the clusters and the labels (written as the output's nodata)"
                )
        if not (ds.crs or self.gcps) and ds.transform.is_identity:
            notes.append("not georeferenced (no CRS, transform or GCPs): neither is the output")
        self.stretch = dataclasses.replace(self.stretch, notes=(*notes, *self.stretch.notes))

    def _read(self, window, out_shape=None, resampling=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(colour bands (C, h, w) in the file's dtype, the palette expanded; valid (h, w) or
        None) of a window, or of the whole raster decimated to ``out_shape``."""
        kw = {"window": window}
        if out_shape is not None:
            kw.update(out_shape=(len(self.colour_bands) + (self.alpha is not None), *out_shape), resampling=resampling)
        indexes = [b + 1 for b in self.colour_bands] + ([self.alpha + 1] if self.alpha is not None else [])
        try:
            data = self.dataset.read(indexes, **kw)  # (C [+ alpha], h, w)
            mask = None
            if self.mask_band:
                mask_kw = dict(kw, out_shape=data.shape[1:]) if out_shape is not None else kw
                mask = self.dataset.read_masks(1, **mask_kw) > 0
        except Exception as exc:  # a truncated file can open fine and fail on a later block
            raise _decode_error(self.path, exc) from exc
        bands = data[: len(self.colour_bands)]
        valid = mask
        if self.alpha is not None:
            valid = data[-1] > 0
        if self.nodata is not None:
            has_value = ~np.isnan(bands) if np.isnan(self.nodata) else bands != self.nodata
            valid = has_value.any(0) if valid is None else valid & has_value.any(0)
        if self.lut is not None:
            colours = self.lut[bands[0]]  # (h, w, 4)
            transparent = colours[..., 3] == 0
            if transparent.any():
                valid = ~transparent if valid is None else valid & ~transparent
            bands = np.ascontiguousarray(np.moveaxis(colours[..., :3], -1, 0))
        if self.float:
            finite = np.isfinite(bands).all(0)
            if not finite.all():
                valid = finite if valid is None else valid & finite
        return bands, valid

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) of rows y..y+h and columns x..x+w (nodata in the fill colour)."""
        return np.moveaxis(self.read_bands(y, x, h, w), 0, -1)

    def read_bands(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The same window bands-first: C-contiguous uint8 (3, h, w)."""
        return self.read_masked(y, x, h, w)[0]

    def read_masked(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 RGB (3, h, w), valid (h, w) bool or None when every pixel is valid)."""
        from rasterio.windows import Window

        bands, valid = self._read(Window(x, y, w, h))
        rgb = self.stretch.apply_bands(bands)
        return (rgb, None) if valid is None else _masked(rgb, valid, self.stretch.fill)

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
    bands = _read_bands(path)
    if min(bands.shape[:2]) < 1:
        raise ImageReadError(f"{path}: empty image")
    # The last band of grey + alpha and of RGBA (Pillow's LA, RGBA) is transparency: a mask.
    alpha = bands[..., -1] if bands.ndim == 3 and bands.shape[-1] in (2, 4) else None
    return ArraySource(bands, name=str(path), valid=None if alpha is None else alpha > 0, float_is_rgb=False)


def _read_bands(path: Path) -> np.ndarray:
    """The decoded bands (H, W[, C]) of an image file, after the checks every reader makes."""
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r}; use PNG, JPEG or GeoTIFF")
    return _read_tiff(path) if suffix in GEOTIFF_SUFFIXES else _read_pillow(path)


def read_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read one image file as uint8 RGB (H, W, 3); see the module docstring for the policy."""
    path = Path(path)
    rgb, notes = to_uint8_rgb(_read_bands(path), str(path))
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
