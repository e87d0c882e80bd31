"""Reading user imagery: PNG, JPEG and GeoTIFF, with an explicit policy for every odd input.

``read_image(path)`` returns ``(rgb uint8 (H, W, 3), notes)`` where ``notes`` lists the
conversions applied (each also logged at INFO level on the ``seglib.io.images`` logger):

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

``shrink`` resizes an image (and its label mask) to a longest side.

``BandStretch`` is that policy, decided once from a sample of the image (the whole image for
``read_image``; a decimated overview for a large raster, ``seglib.io.rasters``).
"""

from __future__ import annotations

import glob
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ImageReadError",
    "IMAGE_SUFFIXES",
    "GEOTIFF_SUFFIXES",
    "RASTER_SUFFIXES",
    "KINDS",
    "unsupported_error",
    "complex_error",
    "BandStretch",
    "bands_error",
    "decode_error",
    "read_file_bands",
    "read_image",
    "to_uint8_rgb",
    "list_images",
    "list_inputs",
    "read_mask",
    "shrink",
]

log = logging.getLogger("seglib.io.images")


GEOTIFF_SUFFIXES = (".tif", ".tiff")
# Rasters read through GDAL (rasterio), window by window, their labels written as GeoTIFF:
# GeoTIFFs, JPEG 2000 (Sentinel-2 tiles, many orthophoto deliveries) and GDAL virtual rasters
# (VRT mosaics, ``seglib.io.vrt``). A folder is listed for IMAGE_SUFFIXES only: a mosaic VRT
# beside its tiles would otherwise be segmented a second time; a VRT is named as the input itself.
RASTER_SUFFIXES = GEOTIFF_SUFFIXES + (".jp2", ".vrt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + GEOTIFF_SUFFIXES + (".jp2",)
KINDS = "PNG, JPEG, GeoTIFF, JPEG 2000 or VRT"


class ImageReadError(ValueError):
    """An image that cannot be used; the message names the file, the problem and the fix."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files (PNG, JPEG, GeoTIFF, JPEG 2000) directly in ``folder``, sorted by name."""
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


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def list_inputs(spec: str | Path) -> list[Path]:
    """The input files of ``--input``: a folder (its images, sorted by name), a glob pattern
    (the images and rasters it matches, sorted), or one file (PNG, JPEG, GeoTIFF, JPEG 2000 or VRT).
    ``ImageReadError`` when nothing usable is named."""
    text = str(spec)
    if _is_glob(text) and not Path(text).exists():
        suffixes = IMAGE_SUFFIXES + RASTER_SUFFIXES
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in suffixes and Path(p).is_file())
        if not files:
            raise ImageReadError(f"no images match {text} (looked for {', '.join(suffixes)})")
        return files
    path = Path(spec)
    if path.is_dir():
        return list_images(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES + RASTER_SUFFIXES:
            raise ImageReadError(f"{path}: unsupported file type {path.suffix!r}; use {KINDS}")
        return [path]
    raise ImageReadError(f"input not found: {path}")


def bands_error(name: str, count: int) -> ImageReadError:
    return ImageReadError(
        f"{name}: {count} bands, but seglib needs RGB (3 bands); extract the red, green and blue bands first, "
        "e.g. `gdal_translate -b 3 -b 2 -b 1 in.tif rgb.tif` (band numbers depend on the sensor)"
    )


def decode_error(path: Path, exc: Exception) -> ImageReadError:
    text = str(exc)
    if "missing codec" in text or "not supported" in text.lower():  # GDAL: a valid file this build cannot read
        return unsupported_error(path, text)
    return ImageReadError(
        f"{path}: cannot decode ({type(exc).__name__}: {exc}); the file is corrupt or truncated, re-export it"
    )


def unsupported_error(path: Path, what: str) -> ImageReadError:
    """A valid file of a kind this build cannot decode: say what, not that the file is broken."""
    return ImageReadError(
        f"{path}: {what}, which the GDAL that seglib uses cannot decode (the file itself is probably fine); "
        "convert it where it can be read, e.g. `gdal_translate -ot Byte -scale -co COMPRESS=DEFLATE in.tif out.tif`"
    )


def complex_error(path: Path | str, dtype: str) -> ImageReadError:
    """Complex pixels (SAR, interferograms, FFTs) are not imagery seglib segments: one policy for every complex type."""
    return ImageReadError(
        f"{path}: complex pixel values ({dtype}): seglib segments RGB imagery, not complex data such as SAR; "
        "derive a real image first, e.g. its amplitude: `gdal_calc.py -A in.tif --calc='abs(A)' --type=Float32 "
        "--outfile=amplitude.tif`"
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
            raise bands_error(name, c)
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
        lo, hi = self.lo.astype(np.float32)[:, None, None], self.hi.astype(np.float32)[:, None, None]
        # Clipped to [lo, hi] before any arithmetic: values far outside (a nodata value such as
        # -3.4e38, painted over later) never overflow.
        data = np.clip(np.nan_to_num(rgb.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), lo, hi)
        scale = np.maximum(self.hi - self.lo, 1e-12).astype(np.float32)[:, None, None]
        return np.round(np.clip((data - lo) / scale, 0, 1) * 255).astype(np.uint8)


def _mean_colour(values: np.ndarray) -> np.ndarray:
    """uint8 (3,) mean of (N, 3) values on the 0..255 scale."""
    return np.round(values.mean(0)).clip(0, 255).astype(np.uint8)


def to_uint8_rgb(bands: np.ndarray, name: str = "image") -> tuple[np.ndarray, list[str]]:
    """Bands-last array (H, W, C) of any dtype -> (uint8 (H, W, 3), notes), by the module policy."""
    if bands.ndim == 2:
        bands = bands[..., None]
    if bands.ndim != 3:
        raise ImageReadError(f"{name}: expected a 2-D image with bands, got shape {bands.shape}")
    stretch = BandStretch.measure(bands, name)
    return stretch.apply(bands), list(stretch.notes)


def read_file_bands(path: Path) -> np.ndarray:
    """The decoded bands (H, W[, C]) of an image file, after the checks every reader makes."""
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + RASTER_SUFFIXES:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r}; use {KINDS}")
    return _read_tiff(path) if suffix in RASTER_SUFFIXES else _read_pillow(path)


def read_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read one image file as uint8 RGB (H, W, 3); see the module docstring for the policy."""
    path = Path(path)
    rgb, notes = to_uint8_rgb(read_file_bands(path), str(path))
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
        raise decode_error(path, exc) from exc


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import rasterio
    except ImportError:  # plain TIFFs still work through Pillow
        if path.suffix.lower() not in GEOTIFF_SUFFIXES:
            raise ImageReadError(
                f"{path}: reading {path.suffix} files needs rasterio: pip install 'seglib[geo]'"
            ) from None
        return _read_pillow(path)
    try:
        with warnings.catch_warnings():  # a raster without georeferencing is fine here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(path)
        with src:
            if src.count > 4 or src.count == 2:
                raise bands_error(str(path), src.count)
            complex_type = next((t for t in src.dtypes if t.startswith("complex")), None)
            if complex_type is not None:
                raise complex_error(path, complex_type)
            return np.moveaxis(src.read(), 0, -1)  # (H, W, C)
    except ImageReadError:
        raise
    except Exception as exc:  # rasterio raises its own error types for corrupt files
        raise decode_error(path, exc) from exc


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


def shrink(rgb: np.ndarray, mask: np.ndarray | None, max_side: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``rgb`` (H, W, 3) uint8 resized (bilinear) so its longer side is ``max_side``, and its
    label ``mask`` (nearest); both unchanged when already that small or ``max_side`` <= 0."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if max_side <= 0 or scale >= 1:
        return rgb, mask
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
    return rgb, mask
