"""Writing results, one checked path for every file seglib writes (labels, previews, polygons,
legend files, styles): a temporary name beside the final one, the writer's status checked,
the bytes forced to disk, then a rename. Nothing reaches a final name unless it is complete; a
failed write raises ``OutputWriteError`` (an ``OSError``) with one line that names the file and
leaves the previous file untouched.

    with committed(out / "a.json") as tmp:   # tmp: .a.json.<host>-<pid>-<random>.tmp
        tmp.write_text(text)                 # any error: tmp removed, OutputWriteError raised
    # here out/a.json is the complete new file (fsync'ed, renamed atomically)

``AtomicFiles`` does the same for a set of files renamed together (a label raster and its
sidecars). Label GeoTIFFs (``label_geotiff``) are created only when their first rows arrive,
and read back before the rename: rasterio does not report errors that GDAL meets while it
flushes and closes a dataset (a full disk at that moment gives a corrupt file and no exception,
rasterio 1.4), so the rows on disk are compared with the rows written (CRC-32 per block of rows).

Temporary names carry a host tag and the process id (``temporary_path``), so
``remove_stale_temporaries`` can delete what runs killed on this machine left behind, and only that.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import uuid
import warnings
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

from ..viz import PALETTE
from .rasters import Source
from .sidecars import LabelTable, band_xml, pam_path, pam_xml, qml, qml_path, world_file, world_file_path

__all__ = [
    "NODATA",
    "OutputWriteError",
    "temporary_path",
    "AtomicFiles",
    "committed",
    "write_png",
    "write_label_png",
    "palette_table",
    "add_legend_files",
    "write_text",
    "remove_stale_temporaries",
    "label_profile",
    "overview_factors",
    "LabelGeoTIFF",
    "label_geotiff",
]

log = logging.getLogger("seglib.io")

NODATA = 255  # the label of masked (nodata) pixels, outside every K's labels 0..K-1
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
# .<name>.<host>-<pid>-<random>.tmp[<suffix>][-journal|-wal|-shm]: the files temporary_path names,
# and what SQLite (GeoPackage) adds beside them.
_TEMPORARY = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{12}\.tmp(\.[^.]+)?(-journal|-wal|-shm)?$"
)
_SQLITE_SIDECARS = ("-journal", "-wal", "-shm")


class OutputWriteError(OSError):
    """An output that could not be written (disk full, no permission, a writer's error); the
    message names the file and says that the previous one, if any, is unchanged."""


def temporary_path(output: Path, *, keep_suffix: bool = False) -> Path:
    """A unique temporary name beside ``output``: ``.<name>.<host>-<pid>-<random>.tmp`` (host
    tag, process id, random part), so runs that write the same output at the same time each
    write their own file and the last to finish replaces ``output`` (``os.replace`` is atomic).
    ``keep_suffix`` appends the output's suffix for writers that choose a format by it (GPKG)."""
    name = f".{output.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    return output.with_name(name + (output.suffix if keep_suffix else ""))


def _remove(tmp: Path) -> None:
    for path in (tmp, *(tmp.with_name(tmp.name + s) for s in _SQLITE_SIDECARS)):
        path.unlink(missing_ok=True)


def _is_write_error(exc: BaseException) -> bool:
    """Errors of writing, as opposed to bugs: OS errors and what GDAL's bindings raise (fiona
    raises CPLE_* errors, DriverError or RuntimeError("GDAL Error ...") for a full disk)."""
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("fiona", "rasterio") or (
        isinstance(exc, RuntimeError) and str(exc).startswith("GDAL Error")
    )


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    for unit in ("bytes", "kB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1000
    return ""


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if reason.startswith(("b'", 'b"')):  # fiona's GDAL errors show their bytes
        reason = reason[2:-1]
    return " ".join(reason.split())[:300]


def write_error(output: Path, exc: BaseException, gdal: list[str] | None = None) -> OutputWriteError:
    """``OutputWriteError`` for ``output`` in one line: the first error GDAL logged meanwhile
    (``gdal``), else the writer's exception."""
    reason = " ".join(gdal[0].split())[:300] if gdal else _reason(exc)  # GDAL's first error is the cause
    free = _free_space(output.parent)
    where = f" ({free} free there)" if free else ""
    kept = f"the previous {output.name} is unchanged" if output.exists() else "nothing was written"
    err = OutputWriteError(
        f"cannot write {output}: {reason}{where}; {kept}; free some space or choose another --output folder"
    )
    err.errno = getattr(exc, "errno", None) or errno.EIO
    return err


def _sync(path: Path) -> None:
    """Force ``path``'s bytes to disk: a full disk that the writes did not report (delayed
    allocation, network file systems) is reported here, before the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every system opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFiles:
    """Files written under temporary names and renamed to their final names together, once all
    are complete and on disk; removed if anything fails.

        with AtomicFiles() as files:
            write_labels(files.path(out / "a.tif"))
            write_style(files.path(out / "a.qml"))
        # both renamed here (a.tif last), or neither if the block raised

    An error of the fsync or the rename is raised as ``OutputWriteError`` naming the file;
    exceptions of the block pass unchanged (``committed`` translates a writer's errors).
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []  # (temporary, final)
        self._stale: list[Path] = []  # removed at the commit: files a previous run wrote beside

    def remove(self, path: str | Path) -> None:
        """Remove ``path`` (if it exists) when the set is committed: a sidecar of an earlier run
        that this output does not have (a world file of a now ungeoreferenced image)."""
        self._stale.append(Path(path))

    def write_text(self, output: str | Path, text: str) -> Path:
        """Add ``output`` with ``text`` (UTF-8) to the set; a write error names ``output``."""
        tmp = self.path(output)
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise write_error(Path(output), exc) from exc
        return tmp

    def path(self, output: str | Path, *, keep_suffix: bool = False) -> Path:
        """The temporary path to write ``output`` to (its folder is created)."""
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(output, keep_suffix=keep_suffix)
        self._files.append((tmp, output))
        return tmp

    def commit(self) -> None:
        """fsync every file, then rename each to its final name, the first one added last."""
        for tmp, output in self._files:
            try:
                _sync(tmp)
            except OSError as exc:
                raise write_error(output, exc) from exc
        for path in self._stale:
            path.unlink(missing_ok=True)
        for tmp, output in reversed(self._files):  # the first file last: its arrival means all are there
            os.replace(tmp, output)
        for folder in {output.parent for _, output in self._files}:
            _sync_folder(folder)
        self._files = []

    def discard(self) -> None:
        """Remove every temporary file (and SQLite's journals beside them)."""
        for tmp, _ in self._files:
            _remove(tmp)
        self._files = []

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is None:
                self.commit()
        finally:
            self.discard()


class _GDALMessages(logging.Filter):
    """What GDAL's bindings log while a thread writes (the errors of a failing write come one
    per call, some before the exception), kept from the console for that thread: its one-line
    error quotes the first. One filter, installed on the bindings' loggers while any thread
    captures and removed with the last capture (under a lock: writers in several threads,
    dask's, share it); records of threads that do not capture pass as the loggers' levels
    before said. Captures nest: a record goes to every open capture of its thread."""

    LOGGERS = ("fiona._env", "rasterio._err", "rasterio._env")

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.captures: dict[int, list[list[str]]] = {}  # thread id -> its open captures
        self.levels: dict[str, tuple[int, int]] = {}  # logger -> (own, effective) level before

    def filter(self, record: logging.LogRecord) -> bool:
        # The filter runs in the thread that logs (record.thread is None without logThreads).
        captures = self.captures.get(threading.get_ident())
        if not captures:
            return record.levelno >= self.levels.get(record.name, (0, logging.WARNING))[1]
        if record.levelno >= logging.WARNING or "error" in record.getMessage().lower():
            for messages in captures:
                messages.append(record.getMessage())
        return False

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        messages: list[str] = []
        me = threading.get_ident()
        with self.lock:
            if not self.captures:
                for name in self.LOGGERS:
                    logger = logging.getLogger(name)
                    self.levels[name] = (logger.level, logger.getEffectiveLevel())
                    logger.addFilter(self)
                    # rasterio logs GDAL's errors at INFO; a lower level set by the user stays
                    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
            self.captures.setdefault(me, []).append(messages)
        try:
            yield messages
        finally:
            with self.lock:
                mine = self.captures[me]
                del mine[[m is messages for m in mine].index(True)]  # by identity: [] == []
                if not mine:
                    del self.captures[me]
                if not self.captures:
                    for name in self.LOGGERS:
                        logger = logging.getLogger(name)
                        logger.removeFilter(self)
                        logger.setLevel(self.levels.pop(name)[0])


_gdal = _GDALMessages()


def gdal_messages() -> AbstractContextManager[list[str]]:
    """The messages GDAL's bindings log in this thread during the block, kept from the console."""
    return _gdal.capture()


@contextmanager
def committed(output: str | Path, *, keep_suffix: bool = False) -> Iterator[Path]:
    """The temporary path to write ``output`` to, renamed to ``output`` when the block ends
    without an error (``AtomicFiles`` for one file). The block is the writer: a write error in it
    (``OSError``, GDAL's errors through rasterio or fiona) leaves as ``OutputWriteError``, with
    the first error GDAL logged meanwhile."""
    output = Path(output)
    with AtomicFiles() as files, gdal_messages() as messages:
        tmp = files.path(output, keep_suffix=keep_suffix)
        try:
            yield tmp
        except Exception as exc:
            if _is_write_error(exc) and not isinstance(exc, OutputWriteError):
                raise write_error(output, exc, messages) from exc
            raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``committed``."""
    path = Path(path)
    with committed(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG through ``committed``."""
    from PIL import Image

    path = Path(path)
    with committed(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def write_label_png(
    labels: np.ndarray, output: str | Path, *, k: int, profile: dict | None = None, table: LabelTable | None = None
) -> Path:
    """Write uint8 labels (H, W) as a paletted PNG (the legend's colours, nodata transparent; the
    pixel values are the labels), with what GIS software needs beside it: a world file
    when ``profile`` has a transform, the legend files (``add_legend_files``: ``table``, else
    the categorical palette; the CRS in the ``.aux.xml``); a world file of an earlier run that
    this one does not write is removed. All through ``AtomicFiles``."""
    from PIL import Image

    output, profile = Path(output), profile or {}
    counts = np.bincount(labels.ravel(), minlength=256)
    transform, crs = profile.get("transform"), profile.get("crs")
    table = table if table is not None else palette_table(k)
    palette = np.zeros((256, 3), np.uint8)  # the legend's colours; nodata (255) transparent
    palette[: table.k] = table.colours
    with AtomicFiles() as files:
        tmp = files.path(output)
        try:
            image = Image.fromarray(np.ascontiguousarray(labels, np.uint8), "L")
            image.putpalette(palette.tobytes())  # a paletted PNG: the values are still the labels
            image.save(tmp, format="PNG", transparency=NODATA)
        except OSError as exc:
            raise write_error(output, exc) from exc
        world = world_file_path(output)
        if transform is not None and not transform.is_identity:
            files.write_text(world, world_file(transform))
        else:
            files.remove(world)
        add_legend_files(files, output, table, counts, crs_wkt=crs.to_wkt() if crs else None)
    return output


def remove_stale_temporaries(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove the temporary files that runs on this machine left in ``folder`` when they were
    killed (their process is gone); returns (removed, others). ``others`` are temporary files of
    runs still going or of other machines (a shared folder): left alone."""
    folder = Path(folder)
    removed, others = [], []
    if not folder.is_dir():
        return removed, others
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.match(path.name)
        if match is None or not path.is_file():
            continue
        if match["host"] == _HOST and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
        else:
            others.append(path)
    return removed, others


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ----------------------------------------------------------------------------- label GeoTIFFs


def label_profile(source: Source) -> dict:
    """The source's georeferencing (CRS and transform, its GCPs and their CRS, or its RPCs) with
    a uint8 single-band, tiled, deflate layout and ``NODATA`` as the nodata value."""
    src = source.profile
    gcps = getattr(source, "gcps", None)
    if gcps:  # georeferenced by ground control points only: the transform is a meaningless identity
        keep = {"gcps": gcps[0], "crs": gcps[1]}
    else:
        keep = {key: src[key] for key in ("crs", "transform") if src.get(key) is not None}
    rpcs = getattr(source, "rpcs", None)
    if rpcs is not None:
        keep["rpcs"] = rpcs
    h, w = source.height, source.width
    profile = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "uint8", **keep}
    profile.update(compress="deflate", predictor=2, nodata=NODATA)
    if min(h, w) >= 256:  # TIFF tiles are multiples of 16; tiny rasters stay striped
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    return profile


def overview_factors(height: int, width: int, smallest: int = 256) -> list[int]:
    """Decimation factors 2, 4, 8, ... of a raster's overviews, down to one whose larger side is
    at most ``smallest`` pixels (none for a raster that small already)."""
    factors, f = [], 2
    while max(height, width) / (f // 2) > smallest:
        factors.append(f)
        f *= 2
    return factors


class LabelGeoTIFF:
    """Label rows written into a GeoTIFF at a temporary path; see ``label_geotiff``.

    ``write(y, rows)`` takes uint8 rows (h, W) top to bottom; the file is created at the first
    call, so an input that fails before its first rows are labelled never creates an output.
    ``counts`` holds each label's pixel count so far (256,), for the legend's shares; ``table``
    (a ``seglib.io.sidecars.LabelTable``, set before the block ends) is what its sidecars describe.
    """

    def __init__(self, tmp: Path, profile: dict, tags: dict[str, str], *, output: Path, overviews: bool = False):
        self.tmp, self.profile, self.tags, self.output = tmp, profile, tags, output
        self.overviews = overviews
        self.table: LabelTable | None = None
        self.dataset = None
        self.counts = np.zeros(256, np.int64)
        self._written: list[tuple[int, int, int]] = []  # (y, h, CRC-32 of the rows)

    def _create(self) -> None:
        import rasterio

        with warnings.catch_warnings():  # an input without georeferencing gives an output without
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self.dataset = rasterio.open(self.tmp, "w", **self.profile)
        self.dataset.update_tags(1, **self.tags)

    def open(self) -> None:
        """Create the file now (``write`` does it at its first call otherwise)."""
        if self.dataset is None:
            self._create()

    def write(self, y: int, rows: np.ndarray) -> None:
        from rasterio.windows import Window

        rows = np.ascontiguousarray(rows, np.uint8)
        try:
            self.open()
            self.dataset.write(rows[None], window=Window(0, y, rows.shape[1], rows.shape[0]))
        except Exception as exc:
            if _is_write_error(exc):
                raise write_error(self.output, exc) from exc
            raise
        self.counts += np.bincount(rows.ravel(), minlength=256)
        self._written.append((y, rows.shape[0], zlib.crc32(rows)))

    def close(self) -> None:
        """Close the dataset and check the file: every row written reads back the same."""
        try:
            self.open()
            factors = overview_factors(self.dataset.height, self.dataset.width) if self.overviews else []
            if factors:  # nearest label: an overview pixel is one of the labels
                from rasterio.enums import Resampling

                self.dataset.build_overviews(factors, Resampling.nearest)
                self.dataset.update_tags(ns="rio_overview", resampling="nearest")
            self.dataset.close()
            self.verify()
        except Exception as exc:
            if _is_write_error(exc):
                raise write_error(self.output, exc) from exc
            raise

    def abort(self) -> None:
        """Close the dataset without checking it (the run failed; the file is removed)."""
        if self.dataset is not None and not self.dataset.closed:
            try:
                self.dataset.close()
            except Exception:  # noqa: BLE001 - already failing; the original error is raised
                pass

    def verify(self) -> None:
        """``OSError`` unless the file on disk holds exactly the rows written, and all of them."""
        import rasterio
        from rasterio.windows import Window

        expected = sum(h for _, h, _ in self._written)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(self.tmp) as src:
                    if (src.height, src.width) != (self.profile["height"], self.profile["width"]):
                        raise OSError(errno.EIO, "the file reads back with another size")
                    for y, h, crc in self._written:
                        if zlib.crc32(src.read(1, window=Window(0, y, src.width, h))) != crc:
                            raise OSError(errno.EIO, f"rows {y}-{y + h} read back differently")
        except rasterio.errors.RasterioError as exc:
            raise OSError(errno.EIO, "the file written is incomplete (it does not read back)") from exc
        if expected != self.profile["height"]:
            raise OSError(errno.EIO, f"{expected} of {self.profile['height']} rows were written")


def palette_table(k: int) -> LabelTable:
    """The categorical legend: label i in ``seglib.viz.PALETTE[i]`` (the previews' colours)."""
    return LabelTable(colours=PALETTE[np.arange(k) % len(PALETTE)], mode="categorical")


def add_legend_files(
    files: AtomicFiles, output: Path, table: LabelTable, counts: np.ndarray, *, crs_wkt: str | None = None
) -> None:
    """Add the sidecars that explain a label raster to ``files``: ``<name>.aux.xml`` (GDAL: the
    CRS when given, a colour table of exactly K entries, the attribute table) and ``<stem>.qml``
    (the style QGIS loads with it: K named classes)."""
    files.write_text(pam_path(output), pam_xml(crs_wkt=crs_wkt, band=band_xml(table, counts)))
    files.write_text(qml_path(output), qml(table, counts))


@contextmanager
def label_geotiff(
    output: str | Path,
    profile: dict,
    k: int,
    *,
    overviews: bool = False,
) -> Iterator[LabelGeoTIFF]:
    """A ``LabelGeoTIFF`` writing ``output`` (``profile`` from ``label_profile``, K in its tags).

    When the block ends without an error the dataset is closed and read back (``verify``), the
    files that explain it are added (``add_legend_files``: the writer's ``table``, else the
    categorical palette, with its pixel counts), and all are renamed together (``AtomicFiles``);
    the temporary files are removed otherwise. Errors of the writer leave as ``OutputWriteError``;
    the block's own pass unchanged. ``overviews``: internal overviews (``overview_factors``)
    are built before it is closed."""
    tags = {"seglib_k": str(k), "seglib_label_order": "brightness of the cluster colour, darkest first"}
    output = Path(output)
    with AtomicFiles() as files:
        writer = LabelGeoTIFF(files.path(output), profile, tags, output=output, overviews=overviews)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()
        table = writer.table if writer.table is not None else palette_table(k)
        add_legend_files(files, output, table, writer.counts)
        files.remove(world_file_path(output))  # a world file of an earlier run would override the GeoTIFF's own
