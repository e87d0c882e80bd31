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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import (
    RASTER_SUFFIXES,
    BandStretch,
    ImageReadError,
    bands_error,
    complex_error,
    decode_error,
    read_file_bands,
    unsupported_error,
)

__all__ = [
    "ArraySource",
    "RasterSource",
    "Source",
    "open_source",
    "sidecar_georeferencing",
    "SourceFile",
    "valid_box",
    "fill_masked",
    "check_alpha",
    "ALPHA_CHOICES",
]


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
      profile: georeferencing to carry to the outputs (``crs``, ``transform``), e.g. what a
        PNG's world file and .aux.xml say.
    """

    def __init__(
        self,
        image: np.ndarray,
        *,
        name: str = "image",
        valid: np.ndarray | None = None,
        float_is_rgb: bool = True,
        profile: dict | None = None,
    ):
        image = image[..., None] if image.ndim == 2 else image
        self.image, self.name, self.profile = image, name, dict(profile or {})
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


ALPHA_CHOICES = ("auto", "yes", "no")
MAX_BLOCK_BYTES = 256 << 20  # a block GDAL must decode whole to read any window of it, at most
BLOCK_CHECKS = 64  # blocks per band whose offset and size are checked against the file's size


def check_alpha(alpha: str) -> str:
    """``auto``, ``yes`` or ``no``; ``ValueError`` naming them for anything else."""
    if alpha not in ALPHA_CHOICES:
        raise ValueError(f"alpha must be one of {', '.join(ALPHA_CHOICES)}, got {alpha!r}")
    return alpha


class RasterSource(_WindowReader):
    """A raster file (GeoTIFF, JPEG 2000 or anything GDAL reads) read window by window with rasterio.

    Arguments:
      path: the raster; a missing, corrupt, complex or non-RGB file raises ``ImageReadError``.
      alpha: whether the last band of a 2- or 4-band raster is transparency (a mask, 0 is
        nodata): ``auto`` (default) when it is tagged alpha *and* holds only 0 and its maximum
        (a 4-band RGBN GeoTIFF that GDAL wrote with its defaults tags the NIR band alpha: its
        content says otherwise, it is ignored), ``yes`` whatever its tag or content, ``no`` never.

    Use as a context manager (``with RasterSource(path) as src:``) so the file is closed.
    ``profile`` is the file's rasterio profile (CRS, transform, GCPs, ...); ``gcps`` and
    ``rpcs`` the georeferencing a label GeoTIFF copies. Bands tagged red, green and blue are
    used in that order, whatever their order in the file. Nodata comes from the file the way
    GDAL defines it: an alpha band, an internal or sidecar mask band, a nodata value (a pixel
    is nodata when every band has it), NaN in float bands. ``valid_box`` is the box around
    every valid pixel (found at full resolution). A single band with a colour table is expanded
    through it (entries with alpha 0 are nodata), as ``gdal_translate -expand rgb`` would.
    Before any pixel is read, the header's sizes are checked against the file (a header that
    claims more than the file holds is refused at once, not decoded for minutes).
    """

    def __init__(self, path: str | Path, *, alpha: str = "auto"):
        import rasterio

        self.path = Path(path)
        self.name = str(self.path)
        self.alpha_policy = check_alpha(alpha)
        if not self.path.is_file():
            raise ImageReadError(f"image not found: {self.path}")
        try:
            with warnings.catch_warnings():  # rasters without georeferencing are fine (noted below)
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.dataset = rasterio.open(self.path)
        except Exception as exc:  # rasterio raises its own error types for corrupt files
            raise decode_error(self.path, exc) from exc
        self.unsupported = None  # what this GDAL may not decode, said if a read fails
        try:
            self._open()
        except ImageReadError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise decode_error(self.path, exc) from exc

    def _open(self) -> None:
        from rasterio.enums import ColorInterp, Compression, MaskFlags, Resampling

        ds = self.dataset
        self.height, self.width, self.profile = ds.height, ds.width, dict(ds.profile)
        if self.height < 1 or self.width < 1:
            raise ImageReadError(f"{self.path}: empty image")
        complex_type = next((t for t in ds.dtypes if t.startswith("complex")), None)
        if complex_type is not None:
            raise complex_error(self.path, complex_type)
        self._check_blocks()
        if ds.compression == Compression.jpeg and ds.dtypes[0] != "uint8":
            self.unsupported = "12-bit JPEG compression inside a TIFF"
        gcps, gcp_crs = ds.gcps
        self.gcps = (gcps, gcp_crs) if gcps and gcp_crs is not None else None
        self.rpcs = ds.rpcs
        notes = ["GCPs without a CRS: not copied to the output (GDAL needs both)"] if gcps and gcp_crs is None else []
        if self.rpcs is not None:
            notes.append("RPCs (rational polynomial coefficients): copied to the output")
        self.lut = None  # (256, 4) uint8 colour table of a paletted band
        if ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette:
            table = ds.colormap(1)
            self.lut = np.zeros((256, 4), np.uint8)
            for index, colour in table.items():
                if 0 <= index < 256:
                    self.lut[index] = colour
            notes.append(f"paletted band: expanded to RGB through its colour table ({len(table)} entries)")
        self.alpha, self.colour_bands = self._bands(notes)
        flags = ds.mask_flag_enums[0]
        # A mask band of its own (internal or .msk), not GDAL's view of a band tagged alpha.
        self.mask_band = MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags and self.alpha is None
        self.nodata = ds.nodata if MaskFlags.nodata in flags else None
        self.float = any(np.issubdtype(np.dtype(t), np.floating) for t in ds.dtypes)
        kinds = [
            *(["alpha band (0 is nodata)"] if self.alpha is not None else []),
            *(["mask band"] if self.mask_band else []),
            *([f"nodata value {self.nodata:g}"] if self.nodata is not None else []),
        ]
        self.masked = bool(kinds)
        self.valid_box = None
        count = len(self.colour_bands) if self.lut is None else 3
        if set(ds.dtypes) == {"uint8"} and not self.masked:
            # Used as they are: nothing to measure, no pass over the file for an overview.
            self.stretch = BandStretch.measure(np.zeros((1, 1, count), np.uint8), self.name)
        else:
            step = _overview_step(self.height, self.width)
            shape = (math.ceil(self.height / step), math.ceil(self.width / step))
            sample, valid = self._read(None, shape, Resampling.nearest)
            if valid is not None and valid.any():
                self.valid_box = self._exact_box(valid)
            if self.float and not np.isfinite(sample).all():
                self.masked, kinds = True, [*kinds, "NaN"]
            self.stretch = BandStretch.measure(np.moveaxis(sample, 0, -1), self.name, overview=True, valid=valid)
            if valid is not None and not valid.all():
                share = 100 * (1 - valid.mean())
                notes.append(
                    f"nodata ({', '.join(kinds)}): {share:.1f} % of the overview; left out of the stretch, "
                    f"the clusters and the labels (written as the output's nodata)"
                )
        if not (ds.crs or self.gcps or self.rpcs) and ds.transform.is_identity:
            notes.append("not georeferenced (no CRS, transform, GCPs or RPCs): neither is the output")
        self.stretch = dataclasses.replace(self.stretch, notes=(*notes, *self.stretch.notes))

    def _check_blocks(self) -> None:
        """Refuse a header that claims more than the file holds (blocks ending past its end) or
        blocks too large to decode for a window, before anything is decoded (GDAL's test raster
        dos_strip_chop.tif claims 2048 x 1,073,741,824 px in a file of a few hundred bytes)."""
        ds = self.dataset
        size = self.path.stat().st_size
        bh, bw = ds.block_shapes[0]
        rows, cols = math.ceil(self.height / bh), math.ceil(self.width / bw)
        per_block = bh * bw * np.dtype(ds.dtypes[0]).itemsize * (ds.count if ds.interleaving is not None and
                                                                   ds.interleaving.value == "PIXEL" else 1)  # fmt: skip
        claim = f"its header claims {self.width} x {self.height} px"
        n = rows * cols
        picks = sorted({0, n - 1, *np.linspace(0, n - 1, min(n, BLOCK_CHECKS)).astype(int).tolist()})
        for band in sorted({1, ds.count}):
            for index in picks:
                y, x = divmod(index, cols)
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
                length = ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
                if offset is None or length is None:
                    break  # not a TIFF: nothing to check this way
                end = int(offset) + int(length)
                if int(offset) and end > size:
                    raise ImageReadError(
                        f"{self.path}: cannot decode: {claim}, but block {index} of band {band} would end at byte "
                        f"{end:,} of a {size:,}-byte file; the file is corrupt or truncated, re-export it"
                    )
        if ds.driver == "GTiff" and per_block > MAX_BLOCK_BYTES:
            raise ImageReadError(
                f"{self.path}: {claim} in blocks of {bw} x {bh} px ({per_block / 2**20:.0f} MiB each, decoded "
                "whole to read any window of them); re-tile it, e.g. "
                "`gdal_translate -co TILED=YES -co COMPRESS=DEFLATE in.tif tiled.tif`"
            )

    def _bands(self, notes: list[str]) -> tuple[int | None, list[int]]:
        """(the alpha band or None, the colour bands as R, G, B (or the grey band)), 0-based, by
        the colour interpretation, the ``alpha`` policy and, for ``auto``, the alpha band's content."""
        from rasterio.enums import ColorInterp

        ds = self.dataset
        if self.lut is not None:
            return None, [0]
        interp = list(ds.colorinterp)
        alpha = next((i for i, ci in enumerate(interp) if ci == ColorInterp.alpha), None)
        if self.alpha_policy == "yes" and ds.count in (2, 4):
            alpha = ds.count - 1
        elif self.alpha_policy == "no":
            alpha = None
        elif alpha is not None and not self._looks_like_alpha(alpha):
            notes.append(
                f"band {alpha + 1} is tagged alpha but holds a range of values, not a mask (0 and its maximum): "
                "read as a colour band (NIR?) and ignored; pass --alpha yes if it is transparency"
            )
            alpha = None
        tagged = [interp.index(c) if interp.count(c) == 1 else None for c in (ColorInterp.red, ColorInterp.green,
                                                                              ColorInterp.blue)]  # fmt: skip
        if None not in tagged and alpha not in tagged:
            rest = [b + 1 for b in range(ds.count) if b not in tagged and b != alpha]
            if tagged != [0, 1, 2]:
                order = ", ".join(interp[b].name for b in range(ds.count) if b in tagged)
                notes.append(
                    f"bands tagged {order}: used as red = band {tagged[0] + 1}, green = band {tagged[1] + 1}, "
                    f"blue = band {tagged[2] + 1}"
                )
            if rest:
                used = ", ".join(str(b + 1) for b in tagged)
                notes.append(
                    f"{ds.count} bands: used bands {used} as RGB, band(s) {', '.join(map(str, rest))} (NIR or "
                    "another band, not a mask) ignored"
                )
            return alpha, tagged
        colour = [b for b in range(ds.count) if b != alpha]
        if len(colour) == 4:
            notes.append("4 bands: used bands 1-3 as RGB, band 4 (NIR or another band, not a mask) ignored")
            colour = colour[:3]
        if len(colour) not in (1, 3):
            raise bands_error(str(self.path), ds.count)
        return alpha, colour

    def _looks_like_alpha(self, band: int) -> bool:
        """Whether a band tagged alpha holds a mask: at least 99 % of its overview 0 or its maximum."""
        from rasterio.enums import Resampling

        dtype = np.dtype(self.dataset.dtypes[band])
        if not np.issubdtype(dtype, np.integer):
            return True
        step = _overview_step(self.height, self.width)
        shape = (math.ceil(self.height / step), math.ceil(self.width / step))
        try:
            values = self.dataset.read(band + 1, out_shape=shape, resampling=Resampling.nearest)
        except Exception as exc:
            raise self._read_error(exc) from exc
        return np.isin(values, [0, np.iinfo(dtype).max]).mean() >= 0.99

    def _exact_box(self, overview: np.ndarray) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of every valid pixel, exactly. A decimated ``overview`` of
        the valid mask can miss a strip a few pixels wide, so it only gives a core that surely
        lies inside the valid pixels' box (its valid samples, less one sample step on every side);
        everything outside the core is read at full resolution, window by window."""
        from rasterio.windows import Window

        sy, sx = self.height / overview.shape[0], self.width / overview.shape[1]
        rows, cols = np.flatnonzero(overview.any(1)), np.flatnonzero(overview.any(0))
        top, bottom = math.ceil((rows[0] + 1) * sy), math.floor(rows[-1] * sy)
        left, right = math.ceil((cols[0] + 1) * sx), math.floor(cols[-1] * sx)
        if top >= bottom or left >= right:  # no core: read it all
            top, left, bottom, right = 0, 0, 0, 0
        found = [top, left, bottom, right] if bottom else [self.height, self.width, 0, 0]
        outside = [(0, 0, top, self.width), (bottom, 0, self.height, self.width), (top, 0, bottom, left),
                   (top, right, bottom, self.width)]  # fmt: skip
        step = 1024
        for y0, x0, y1, x1 in outside:
            for y in range(y0, y1, step):
                for x in range(x0, x1, step):
                    h, w = min(step, y1 - y), min(step, x1 - x)
                    valid = self._read(Window(x, y, w, h))[1]
                    if valid is not None and not valid.any():
                        continue
                    r = np.arange(h) if valid is None else np.flatnonzero(valid.any(1))
                    c = np.arange(w) if valid is None else np.flatnonzero(valid.any(0))
                    found = [min(found[0], y + r[0]), min(found[1], x + c[0]),
                             max(found[2], y + r[-1] + 1), max(found[3], x + c[-1] + 1)]  # fmt: skip
        return tuple(int(v) for v in found)

    def _read_error(self, exc: Exception) -> ImageReadError:
        if self.unsupported is not None:
            return unsupported_error(self.path, self.unsupported)
        return decode_error(self.path, exc)

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
            raise self._read_error(exc) from exc
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


def open_source(path: str | Path, *, alpha: str = "auto") -> ArraySource | RasterSource:
    """A window reader for an image file: GeoTIFF, JPEG 2000 and VRT through rasterio, window by
    window (never read whole); PNG and JPEG decoded whole, with the georeferencing GDAL finds in
    their sidecars (world file, .aux.xml). ``alpha`` as ``RasterSource`` takes it; the alpha of
    a PNG (grey + alpha, RGBA) is transparency unless ``alpha="no"``."""
    path = Path(path)
    check_alpha(alpha)
    if path.suffix.lower() in RASTER_SUFFIXES:
        try:
            import rasterio  # noqa: F401
        except ImportError:  # plain TIFFs still work through Pillow
            pass
        else:
            return RasterSource(path, alpha=alpha)
    bands = read_file_bands(path)
    if min(bands.shape[:2]) < 1:
        raise ImageReadError(f"{path}: empty image")
    # The last band of grey + alpha and of RGBA (Pillow's LA, RGBA) is transparency: a mask.
    has_alpha = bands.ndim == 3 and bands.shape[-1] in (2, 4) and alpha != "no"
    valid = bands[..., -1] > 0 if has_alpha else None
    profile = sidecar_georeferencing(path)
    source = ArraySource(bands, name=str(path), valid=valid, float_is_rgb=False, profile=profile)
    if profile:
        note = (
            "georeferenced by its world file or .aux.xml: carried to the labels (world file and .aux.xml beside them)"
        )
        source.stretch = dataclasses.replace(source.stretch, notes=(note, *source.stretch.notes))
    return source


@dataclass(frozen=True)
class SourceFile:
    """A file to open when its turn comes, with its read options (``open_source``): a list of
    them is fitted on one file at a time (``seglib.inference.legend.sample_embeddings``)."""

    path: Path
    alpha: str = "auto"

    def open(self) -> ArraySource | RasterSource:
        return open_source(self.path, alpha=self.alpha)

    def __str__(self) -> str:
        return str(self.path)


def sidecar_georeferencing(path: Path) -> dict:
    """The CRS and transform GDAL finds for a PNG or JPEG in the files beside it (a world file
    ``.wld``/``.pgw``/``.jgw``..., an ``.aux.xml``), as ``{"crs", "transform"}`` (either may be
    missing), or ``{}`` (none, or rasterio not installed)."""
    try:
        import rasterio
    except ImportError:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                crs, transform = ds.crs, ds.transform
    except Exception:  # noqa: BLE001 - Pillow decoded it; GDAL's view is only for georeferencing
        return {}
    found = {} if transform.is_identity else {"transform": transform}
    return found | ({"crs": crs} if crs else {})


Source = ArraySource | RasterSource  # what the inference engine reads windows from
