"""Outputs a GIS analyst can trust (docs/bad-inputs.md, "Writing outputs"): one checked write
path for labels, previews, polygons and legend files; a full disk never leaves a corrupt file
or exits 0; killed runs leave nothing behind for long.

The full disk is made two ways: a small tmpfs (needs root and a system that lets it mount;
skipped otherwise) and ``RLIMIT_FSIZE`` in the child process with ``SIGXFSZ`` ignored, which
makes every write past the limit fail with ``EFBIG`` the way a full disk fails with ``ENOSPC``
and works unprivileged anywhere."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from seglib.data.synthetic import make_tile
from seglib.io.outputs import (
    AtomicFiles,
    OutputWriteError,
    committed,
    label_geotiff,
    remove_stale_temporaries,
    temporary_path,
    write_text,
)

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 2700000.0)


def write(path: Path, bands: np.ndarray) -> Path:
    h, w, c = bands.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=bands.dtype,
                       crs="EPSG:32640", transform=TRANSFORM) as dst:  # fmt: skip
        dst.write(np.moveaxis(bands, -1, 0))
    return path


def textured(size: int = 512) -> np.ndarray:
    tile = (make_tile(256, seed=0).rgb * 255).round().astype(np.uint8)
    return np.tile(tile, (size // 256, size // 256, 1))


def noise(size: int = 512) -> np.ndarray:
    """Labels of noise compress badly: the preview PNG (3 bands) is larger than the label GeoTIFF."""
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def flat(size: int = 512) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[:, size // 2 :] = 200
    return image


def checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def predict(*args: str, file_size: int | None = None, checkpoint: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "seglib.predict", "--threads", "1", "--quiet", "--checkpoint", str(checkpoint), *args]
    preexec = None if file_size is None else limit_file_size(file_size)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, preexec_fn=preexec)


def assert_failed_cleanly(run: subprocess.CompletedProcess, *names: str) -> None:
    """Exit 1, a ``FAILED`` line per named input saying what could not be written, no traceback."""
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    failed = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == len(names), run.stderr
    for line, name in zip(failed, names, strict=True):
        assert name in line and "cannot write" in line and "is unchanged" in line


@pytest.fixture(scope="module")
def checkpoint(tiny_teacher_checkpoint):
    return tiny_teacher_checkpoint


# ----------------------------------------------------------------------------- the write path


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    out = write_text(tmp_path / "a.json", "old")
    with pytest.raises(OutputWriteError, match=r"cannot write .*a\.json: .*the previous a\.json is unchanged"):
        with committed(out) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    with pytest.raises(ZeroDivisionError):  # not a write error: passes unchanged
        with committed(out) as tmp:
            tmp.write_text("half")
            1 / 0  # noqa: B018
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_files_of_a_set_are_renamed_together_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError), AtomicFiles() as files:
        files.path(tmp_path / "a.tif").write_text("labels")
        files.path(tmp_path / "a.qml").write_text("style")
        raise RuntimeError("the style failed")
    assert os.listdir(tmp_path) == []
    with AtomicFiles() as files:
        files.path(tmp_path / "a.tif").write_text("labels")
        files.path(tmp_path / "a.qml").write_text("style")
    assert sorted(os.listdir(tmp_path)) == ["a.qml", "a.tif"]


def test_label_geotiff_is_created_only_when_rows_arrive_and_read_back(tmp_path):
    profile = {"driver": "GTiff", "height": 64, "width": 32, "count": 1, "dtype": "uint8", "nodata": 255}
    with pytest.raises(ValueError, match="cannot decode"), label_geotiff(tmp_path / "a.tif", profile, 3) as dst:
        raise ValueError("cannot decode the first window")
    assert dst.dataset is None and os.listdir(tmp_path) == []  # never created
    with label_geotiff(tmp_path / "a.tif", profile, 3) as dst:
        dst.write(0, np.zeros((32, 32), np.uint8))
        dst.write(32, np.ones((32, 32), np.uint8))
    with rasterio.open(tmp_path / "a.tif") as src:
        assert src.read(1).sum() == 32 * 32
    with pytest.raises(OutputWriteError, match="32 of 64 rows were written"):
        with label_geotiff(tmp_path / "b.tif", profile, 3) as dst:
            dst.write(0, np.zeros((32, 32), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["a.qml", "a.tif", "a.tif.aux.xml"]  # the labels and their legend


# ----------------------------------------------------------------------------- a full disk


def test_full_disk_labels_and_previews_keep_the_previous_files(tmp_path, checkpoint):
    """RLIMIT_FSIZE: 40 kB fails the label GeoTIFF (81 kB), 120 kB only the preview (159 kB in
    the categorical palette)."""
    src = write(tmp_path / "noise.tif", noise())
    out = tmp_path / "out"
    first = predict("--input", str(src), "--k", "4", "--output", str(out), "--preview", "--colours", "categorical",
                    checkpoint=checkpoint)  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = checksums(out)
    assert before["noise.tif"] and before["noise_preview.png"]
    labels_fail = predict("--input", str(src), "--k", "3", "--output", str(out), "--preview", "--colours",
                          "categorical", file_size=40_000, checkpoint=checkpoint)  # fmt: skip
    assert_failed_cleanly(labels_fail, "noise.tif")
    assert "noise.tif:" in labels_fail.stderr.splitlines()[-2] or "out/noise.tif" in labels_fail.stderr
    assert checksums(out) == before and leftovers(out) == []
    preview_fails = predict("--input", str(src), "--k", "3", "--output", str(out), "--preview", "--colours",
                            "categorical", file_size=120_000, checkpoint=checkpoint)  # fmt: skip
    assert_failed_cleanly(preview_fails, "noise.tif")
    assert "noise_preview.png" in preview_fails.stderr
    after = checksums(out)
    assert after["noise_preview.png"] == before["noise_preview.png"] and leftovers(out) == []
    assert after["noise.tif"] != before["noise.tif"]  # the labels themselves fitted: written


def test_full_disk_polygons_fail_one_file_and_the_others_are_written(tmp_path, checkpoint):
    """RLIMIT_FSIZE 200 kB: the textured tile's polygons (~700 kB) fail, the flat one's (~100 kB) not."""
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "a_textured.tif", textured())
    write(folder / "b_flat.tif", flat())
    out = tmp_path / "out"
    first = predict("--input", str(folder), "--k", "4", "--output", str(out), "--vector", "gpkg", checkpoint=checkpoint)
    assert first.returncode == 0, first.stderr
    before = checksums(out)
    (out / "b_flat.gpkg").unlink()
    run = predict("--input", str(folder), "--k", "3", "--output", str(out), "--vector", "gpkg", file_size=200_000,
                  checkpoint=checkpoint)  # fmt: skip
    assert_failed_cleanly(run, "a_textured.tif")
    assert "a_textured.gpkg" in run.stderr and "1 of 2 file(s) failed" in run.stderr
    after = checksums(out)
    assert after["a_textured.gpkg"] == before["a_textured.gpkg"] and leftovers(out) == []
    with pytest.importorskip("fiona").open(out / "b_flat.gpkg") as layer:
        assert len(layer) >= 2


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root and a system that allows mounting), else the test is skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE tests cover a full disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path, leave: int = 4096) -> None:
    """Fill the file system of ``folder`` but ``leave`` bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_full_tmpfs_fails_every_output_and_keeps_the_previous_ones(tmp_path, small_tmpfs, checkpoint):
    """A real full disk (ENOSPC): labels, preview and polygons of the second run all fail."""
    src = write(tmp_path / "a.tif", textured())
    out = small_tmpfs / "out"
    first = predict("--input", str(src), "--k", "4", "--output", str(out), "--preview", checkpoint=checkpoint)
    assert first.returncode == 0, first.stderr
    before = checksums(out)
    fill(small_tmpfs)
    run = predict("--input", str(src), "--k", "3", "--output", str(out), "--preview", "--vector", "gpkg",
                  checkpoint=checkpoint)  # fmt: skip
    assert_failed_cleanly(run, "a.tif")
    assert checksums(out) == before and leftovers(out) == []


# ----------------------------------------------------------------------------- killed runs


def test_temporaries_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temporary_path(tmp_path / "a.tif")
    killed = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    journal = killed.with_name(killed.name + ".gpkg-journal")
    other_host = tmp_path / ".b.tif.abcdef-1-0123456789ab.tmp"
    for path in (mine, killed, journal, other_host, tmp_path / ".hidden"):
        path.write_text("x")
    removed, others = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([killed, journal])
    assert sorted(others) == sorted([mine, other_host]) and (tmp_path / ".hidden").exists()


def test_sigkill_leftovers_are_removed_and_sigterm_cleans_up(tmp_path, checkpoint):
    """SIGKILL mid-write leaves a temporary file; the next run on the folder removes it (and
    says so); SIGTERM mid-write stops like Ctrl-C: one line, exit 143, nothing left."""
    src = write(tmp_path / "big.tif", np.tile(textured(256), (6, 6, 1)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "seglib.predict", "--threads", "1", "--input", str(src), "--k", "3",
           "--output", str(out), "--checkpoint", str(checkpoint), "--tile", "128", "--overlap", "32"]  # fmt: skip

    def started() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not list(out.glob(f".*-{proc.pid}-*.tmp")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # until it writes its own temporary output
        assert proc.poll() is None, "finished before it could be stopped"
        return proc

    proc = started()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = leftovers(out)
    assert left, "SIGKILL should have left the temporary output"
    proc = started()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "terminated: stopped, no partial output left"
    assert "Traceback" not in stderr and f"removed {len(left)} temporary file(s) left by killed runs" in stderr
    assert leftovers(out) == [] and not (out / "big.tif").exists()


# ----------------------------------------------------------------------------- the legend


def colour_table(path: Path) -> dict[int, tuple]:
    with rasterio.open(path) as src:
        assert src.nodata == 255
        return {i: tuple(c[:3]) for i, c in src.colormap(1).items()}


def test_legend_k_colour_entries_in_the_clusters_mean_colours_a_style_and_a_lookup_table(tmp_path, checkpoint):
    """The acceptance case. One input, K = 5, its clusters saved: the label GeoTIFF has exactly
    5 colour-table entries (nodata, 255, outside them), each its cluster's mean colour as the
    clusters file records it (rounded); the attribute table and the QGIS style name the 5
    classes with their shares; the GeoPackage has the same rows as a lookup table. The
    categorical palette on request."""
    import xml.etree.ElementTree as ET

    from seglib.io.sidecars import read_attribute_table
    from seglib.viz import PALETTE

    src = write(tmp_path / "a.tif", textured(256))
    out = tmp_path / "out"
    run = predict("--input", str(src), "--k", "5", "--output", str(out), "--save-legend", str(tmp_path / "l.json"),
                  "--vector", "gpkg", "--preview", checkpoint=checkpoint)  # fmt: skip
    assert run.returncode == 0, run.stderr
    legend = __import__("json").loads((tmp_path / "l.json").read_text())
    table = colour_table(out / "a.tif")
    assert sorted(table) == list(range(5))
    assert all(max(abs(a - b) for a, b in zip(table[i], legend["colours"][i], strict=True)) <= 0.5 for i in range(5))
    rows = read_attribute_table(out / "a.tif")
    assert [r["value"] for r in rows] == list(range(5)) and abs(sum(r["share"] for r in rows) - 100) < 0.01
    assert [round(r["legend_share"], 1) for r in rows] == [round(100 * s, 1) for s in legend["shares"]]
    with rasterio.open(out / "a.tif") as labels:
        counts = np.bincount(labels.read(1).ravel(), minlength=256)
    assert [r["pixels"] for r in rows] == counts[:5].tolist()
    palette = ET.parse(out / "a.qml").getroot().find("./pipe/rasterrenderer[@type='paletted']/colorPalette")
    entries = [(int(e.get("value")), e.get("color"), e.get("label")) for e in palette]
    assert entries == [(r["value"], "#{:02x}{:02x}{:02x}".format(*table[r["value"]]), r["class"]) for r in rows]
    with pytest.importorskip("fiona").open(out / "a.gpkg", layer="a_legend") as lookup:
        looked_up = [dict(f["properties"]) for f in lookup]
    assert [(r["label"], r["class"], r["colour"]) for r in looked_up] == [(e[0], e[2], e[1]) for e in entries]
    preview = np.asarray(__import__("PIL.Image").Image.open(out / "a_preview.png"))
    assert {tuple(c) for c in preview.reshape(-1, 3).tolist()} <= set(table.values())  # drawn like the raster
    categorical = predict("--input", str(src), "--k", "5", "--output", str(tmp_path / "cat"), "--colours",
                          "categorical", checkpoint=checkpoint)  # fmt: skip
    assert categorical.returncode == 0
    assert colour_table(tmp_path / "cat" / "a.tif") == {i: tuple(PALETTE[i].tolist()) for i in range(5)}


def test_a_files_own_fit_colours_its_labels_like_their_pixels(tmp_path, tiny_teacher_model):
    """Without a clusters file each label is drawn in its prototype's colour, the soft mean of
    its cells: within a few levels of the mean colour of the pixels it labels (weighted by
    pixels), and a label PNG is paletted in the same colours (nodata transparent)."""
    from PIL import Image

    from seglib.inference.engine import segment_raster
    from seglib.inference.predictor import Predictor
    from seglib.inference.windows import Tiling

    image = textured(256)
    write(tmp_path / "a.tif", image)
    Image.fromarray(image).save(tmp_path / "b.png")
    predictor = Predictor(tiny_teacher_model, 4)
    for name, out in (("a.tif", "a.tif"), ("b.png", "b.png")):
        segment_raster(tmp_path / name, tmp_path / "out" / out, predictor, tiling=Tiling(128, 32), progress=False)
        table = colour_table(tmp_path / "out" / out)
        with rasterio.open(tmp_path / "out" / out) as src:
            labels = src.read(1)
        assert sorted(table) == list(range(4)) if out.endswith(".tif") else len(table) == 256
        shares = np.bincount(labels.ravel(), minlength=4)[:4] / labels.size
        gaps = [np.abs(image[labels == i].mean(0) - table[i]).mean() if shares[i] else 0 for i in range(4)]
        assert float(np.dot(shares, gaps)) < 12, gaps
    with Image.open(tmp_path / "out" / "b.png") as png:
        assert png.mode == "P" and png.info.get("transparency") == 255


def qgis_python() -> str | None:
    """A Python that imports QGIS (the system one on Debian), or None."""
    for python in (os.environ.get("SEGLIB_QGIS_PYTHON"), "/usr/bin/python3"):
        if python and Path(python).exists():
            done = subprocess.run([python, "-c", "import qgis.core"], capture_output=True, timeout=120)
            if done.returncode == 0:
                return python
    return None


def test_qgis_shows_k_named_classes(tmp_path, tiny_teacher_model):
    """A real QGIS (3.22 here) opens the label GeoTIFF with the style beside it: a paletted
    renderer with the K classes, named and coloured as the attribute table says."""
    from seglib.inference.engine import segment_raster
    from seglib.inference.predictor import Predictor
    from seglib.inference.windows import Tiling
    from seglib.io.sidecars import read_attribute_table

    python = qgis_python()
    if python is None:
        pytest.skip("no Python with QGIS (set SEGLIB_QGIS_PYTHON)")
    write(tmp_path / "a.tif", textured(256))
    out = segment_raster(tmp_path / "a.tif", tmp_path / "out" / "a.tif", Predictor(tiny_teacher_model, 5),
                         tiling=Tiling(128, 32), progress=False)  # fmt: skip
    script = (
        "import json, os, sys\n"
        "os.environ.setdefault('QT_QPA_PLATFORM', 'offscreen')\n"
        "from qgis.core import QgsApplication, QgsRasterLayer\n"
        "app = QgsApplication([], False); app.initQgis()\n"
        "layer = QgsRasterLayer(sys.argv[1], 'labels')\n"
        "r = layer.renderer()\n"
        "print(json.dumps([layer.isValid(), r.type(), [[c.value, c.color.name(), c.label] for c in r.classes()]]))\n"
        "app.exitQgis()\n"
    )
    done = subprocess.run([python, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    valid, renderer, classes = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    rows = read_attribute_table(out)
    assert valid and renderer == "paletted"
    assert classes == [[r["value"], "#{:02x}{:02x}{:02x}".format(r["red"], r["green"], r["blue"]), r["class"]]
                       for r in rows]  # fmt: skip


def test_gdal_messages_are_captured_per_thread_and_the_loggers_restored():
    """Writers in several threads (dask's) each get their own GDAL messages, nested captures
    get theirs too, a thread that does not capture still shows its errors, and when the last
    capture is done the bindings' loggers are as they were."""
    import logging
    import threading

    from seglib.io.outputs import gdal_messages

    logger = logging.getLogger("fiona._env")
    before = (logger.level, list(logger.filters), logger.getEffectiveLevel())
    shown: list[str] = []

    class Shown(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.getMessage())

    handler = Shown()
    logger.addHandler(handler)
    seen, inner, started, release = {}, {}, threading.Barrier(3), threading.Event()

    def writer(name: str) -> None:
        with gdal_messages() as messages:
            started.wait(10)
            logger.error("%s: disk I/O error", name)
            if name == "a":
                with gdal_messages() as nested:
                    logger.error("a: nested error")
                inner[name] = nested
                logger.error("a: after the nested block")
            release.wait(10)
        seen[name] = messages

    try:
        threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
        for t in threads:
            t.start()
        started.wait(10)  # both capture now: this thread does not
        logger.error("main: not captured")
        release.set()
        for t in threads:
            t.join()
    finally:
        logger.removeHandler(handler)
    assert seen == {
        "a": ["a: disk I/O error", "a: nested error", "a: after the nested block"],
        "b": ["b: disk I/O error"],
    }
    assert inner == {"a": ["a: nested error"]}
    assert shown == ["main: not captured"]
    assert (logger.level, list(logger.filters), logger.getEffectiveLevel()) == before


THREADED_WRITERS = """
import json, logging, sys, threading
from pathlib import Path
from seglib.inference.vector import polygonize
from seglib.io.outputs import OutputWriteError

folder, errors = Path(sys.argv[1]), {}
loggers = [logging.getLogger(name) for name in ("fiona._env", "rasterio._err", "rasterio._env")]
before = [(lg.level, lg.propagate, len(lg.filters), len(lg.handlers)) for lg in loggers]

def writer(i):
    try:
        polygonize(folder / "labels.tif", folder / f"p{i}.gpkg")
    except OutputWriteError as exc:
        errors[i] = str(exc)

threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
after = [(lg.level, lg.propagate, len(lg.filters), len(lg.handlers)) for lg in loggers]
print(json.dumps({"errors": errors, "restored": after == before}))
"""


def test_threads_writing_polygons_onto_a_full_disk_each_fail_with_gdals_error(tmp_path):
    """Three threads polygonize at once past RLIMIT_FSIZE: each fails with one line quoting
    GDAL's SQLite error, no file or temporary is left, and the bindings' loggers are as before.
    (With one capture per write, writes that ended in the order they began restored the loggers
    to what an overlapping write had set, INFO and no propagation, when the threads happened to
    interleave so; the deterministic check is the test above.)"""
    labels = np.random.default_rng(0).integers(0, 4, (256, 256, 1), dtype=np.uint8)  # many polygons
    write(tmp_path / "labels.tif", labels)
    done = subprocess.run([sys.executable, "-c", THREADED_WRITERS, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, preexec_fn=limit_file_size(300_000))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert sorted(result["errors"]) == ["0", "1", "2"] and result["restored"]
    for i, error in result["errors"].items():
        assert error.startswith(f"cannot write {tmp_path / f'p{i}.gpkg'}: ") and "disk I/O error" in error
    assert sorted(os.listdir(tmp_path)) == ["labels.tif"]
