"""Window readers: an image of any size read window by window, every window with the same band
policy (``seglib.io.images.BandStretch``) and with its nodata mask.

``RasterSource`` reads files GDAL reads, ``ArraySource`` arrays; both have
``read(y, x, h, w) -> uint8 (h, w, 3)`` and ``read_masked(y, x, h, w) -> (uint8 (3, h, w), valid)``.
They measure one ``BandStretch`` from a decimated overview and apply it to every window, so
windows do not get their own brightness. ``open_source`` picks one for a file, so a raster of
any size is never read whole (``seglib.inference.engine`` segments it window by window).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np

from .images import RASTER_SUFFIXES, BandStretch, ImageReadError, bands_error, decode_error, read_file_bands

__all__ = ["ArraySource", "RasterSource", "Source", "open_source", "valid_box", "fill_masked"]


OVERVIEW_PIXELS = 1 << 20  # a large raster's stretch comes from an overview of at most ~1 Mpx


def fill_masked(rgb: np.ndarray, valid: np.ndarray | None, fill: np.ndarray) -> np.ndarray:
    """uint8 (3, h, w) with the pixels that are not ``valid`` (h, w) set to ``fill`` (3,), in place."""
    if valid is not None:
        rgb[:, ~valid] = fill[:, None]
    return rgb


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
            raise decode_error(self.path, exc) from exc
        try:
            self._open()
        except ImageReadError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise decode_error(self.path, exc) from exc

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
            raise bands_error(str(self.path), ds.count)
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
            raise decode_error(self.path, exc) from exc
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
    """A window reader for an image file: GeoTIFFs and VRTs through rasterio, window by window
    (never read whole); PNG and JPEG decoded whole by ``read_image``."""
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        try:
            import rasterio  # noqa: F401
        except ImportError:  # plain TIFFs still work through Pillow
            pass
        else:
            return RasterSource(path)
    bands = read_file_bands(path)
    if min(bands.shape[:2]) < 1:
        raise ImageReadError(f"{path}: empty image")
    # The last band of grey + alpha and of RGBA (Pillow's LA, RGBA) is transparency: a mask.
    alpha = bands[..., -1] if bands.ndim == 3 and bands.shape[-1] in (2, 4) else None
    return ArraySource(bands, name=str(path), valid=None if alpha is None else alpha > 0, float_is_rgb=False)


Source = ArraySource | RasterSource  # what the inference engine reads windows from
