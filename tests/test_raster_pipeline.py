"""The raster pipeline's plumbing: GDAL's block cache, one read per window, the reader and writer
threads, the fast argmax, and the predecessor's block-mean k-means used as the benchmark's
baseline. (Speed itself is measured by ``python -m seglib.bench --raster``, not here.)"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest
import torch

from seglib.evaluation.baselines import block_features, block_kmeans
from seglib.evaluation.raster_bench import predecessor_raster, write_mosaic
from seglib.inference.engine import GDAL_CACHE_MB, segment_raster
from seglib.inference.pipeline import RowWriter, prefetch
from seglib.inference.predictor import Predictor, argmax_labels, to_tensor
from seglib.inference.windows import Tiling, axis_windows
from seglib.io.rasters import RasterSource

rasterio = pytest.importorskip("rasterio")
from test_raster import smooth_image, tiny_teacher, write_geotiff  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def gdal_cache_max() -> int:
    """GDAL's block cache size in bytes, read from the GDAL library rasterio has loaded (fiona's
    wheels bring a second copy of GDAL into the process: rasterio's is the one under its wheel's
    libraries, or the only one)."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libgdal" in line.rsplit("/", 1)[-1]})
    except OSError:
        libs = []
    ours = [lib for lib in libs if "rasterio" in lib] or (libs if len(libs) == 1 else [])
    if len(ours) != 1:
        pytest.skip(f"needs Linux and one shared libgdal of rasterio's to read GDAL's cache size, found {libs}")
    gdal = ctypes.CDLL(ours[0])
    gdal.GDALGetCacheMax64.restype = ctypes.c_int64
    return gdal.GDALGetCacheMax64()


def test_gdal_block_cache_in_force_during_a_raster_run_is_the_cap_in_mib(tmp_path, monkeypatch):
    """rasterio hands an integer GDAL_CACHEMAX to GDAL as bytes: ``GDAL_CACHEMAX=64`` made a
    64-byte cache, and every compressed block was decoded again for every row reading it."""
    write_geotiff(tmp_path / "in.tif", smooth_image(256), tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    model, seen = tiny_teacher(), []
    predict = model.predict

    def spy(*args, **kwargs):  # runs once per window, while the raster is open
        seen.append(gdal_cache_max())
        return predict(*args, **kwargs)

    monkeypatch.setattr(model, "predict", spy)
    segment_raster(
        tmp_path / "in.tif", tmp_path / "out.tif", Predictor(model, 3), tiling=Tiling(128, 32), progress=False
    )
    assert len(seen) > 4  # the windowed path ran
    assert set(seen) == {GDAL_CACHE_MB * 2**20}
    assert GDAL_CACHE_MB * 2**20 >= 16 * 2**20  # a cache that holds many 256 px RGB blocks


def test_every_window_is_read_once_and_uint8_needs_no_overview(tmp_path, monkeypatch):
    """One pass over the file: the fitting sample's windows are reused by the labelling pass, and
    uint8 RGB (used as it is) is not read a first time for a band stretch."""
    write_geotiff(tmp_path / "in.tif", smooth_image(320, seed=1), tiled=True, blockxsize=64, blockysize=64)
    reads, overview = [], []
    read_masked = RasterSource.read_masked
    dataset_read = rasterio.io.DatasetReader.read

    def count_window(self, y, x, h, w):
        reads.append((y, x, h, w))
        return read_masked(self, y, x, h, w)

    def count_overview(self, *args, **kwargs):
        if "out_shape" in kwargs:
            overview.append(kwargs["out_shape"])
        return dataset_read(self, *args, **kwargs)

    monkeypatch.setattr(RasterSource, "read_masked", count_window)
    monkeypatch.setattr(rasterio.io.DatasetReader, "read", count_overview)
    segment_raster(
        tmp_path / "in.tif", tmp_path / "out.tif", Predictor(tiny_teacher(), 3), tiling=Tiling(128, 32), progress=False
    )
    starts, _ = axis_windows(320, 128, 32, 4)
    assert len(reads) == len(set(reads)) == len(starts) ** 2  # each window of the grid once, fit sample included
    assert overview == []
    with RasterSource(tmp_path / "in.tif") as src:
        assert src.stretch.identity
        np.testing.assert_array_equal(
            src.read_bands(5, 7, 20, 30), np.moveaxis(smooth_image(320, seed=1)[5:25, 7:37], -1, 0)
        )


def test_window_tensor_has_the_values_of_to_tensor():
    from seglib.inference.predictor import bands_tensor

    img = np.random.default_rng(0).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    torch.testing.assert_close(
        bands_tensor(np.ascontiguousarray(np.moveaxis(img, -1, 0))), to_tensor(img), rtol=0, atol=0
    )


def test_argmax_labels_is_argmax_with_first_index_on_ties():
    rng = np.random.default_rng(0)
    probs = rng.random((6, 50, 70)).astype(np.float32)
    probs[3, :10] = probs[1, :10] = 2.0  # a tie: the lower index wins, as np.argmax
    view = probs[:, 5:45, 3:60]  # strided, as a cell of a window is
    np.testing.assert_array_equal(argmax_labels(view), view.argmax(0))
    assert argmax_labels(view).dtype == np.uint8 and (argmax_labels(probs)[:10] == 1).all()


def test_prefetch_keeps_order_bounds_the_queue_and_reraises():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for i in prefetch(items(), depth=2):
        seen.append(i)
        assert len(produced) - len(seen) <= 3  # at most depth ahead (+ one being put)
    assert seen == list(range(20))

    def failing():
        yield 1
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        list(prefetch(failing()))
    gen = prefetch(iter(range(10**6)), depth=2)  # leaving early stops the thread
    assert next(gen) == 0
    gen.close()
    assert not any(t.name == "seglib-reader" for t in threading.enumerate())


def readers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "seglib-reader" and t.is_alive()]


def test_prefetch_stops_its_reader_after_an_interrupt_inside_start(monkeypatch):
    """Ctrl-C can land while ``Thread.start()`` waits for the new reader: the reader runs by then,
    and must be stopped before the interrupt leaves ``prefetch`` (left reading, it crashed the
    process once the caller had closed the file it reads)."""

    class InterruptedStart(threading.Thread):
        def start(self):
            super().start()
            raise KeyboardInterrupt  # as if it had landed in start()'s wait

    monkeypatch.setattr(threading, "Thread", InterruptedStart)
    gen = prefetch(iter(range(10**6)), depth=2)
    with pytest.raises(KeyboardInterrupt):
        next(gen)
    monkeypatch.undo()
    assert readers_alive() == []


def test_an_interrupt_in_the_model_stops_the_reader_before_the_raster_is_closed(tmp_path, monkeypatch):
    """The windowed pass stops its reader thread itself when an exception leaves it, not when the
    generators are collected: the exception's traceback keeps them alive while the caller closes
    the raster, and a reader still reading it then crashed the process (Ctrl-C in the QGIS plugin)."""
    write_geotiff(tmp_path / "in.tif", smooth_image(320, seed=1))
    predictor = Predictor(tiny_teacher(), 3)
    calls, window = [], Predictor.window

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return window(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "window", interrupted)
    with pytest.raises(KeyboardInterrupt) as raised:
        segment_raster(tmp_path / "in.tif", tmp_path / "out.tif", predictor, tiling=Tiling(64, 16), progress=False)
    assert raised.traceback  # still held, with the pass's frames
    assert readers_alive() == []
    assert not (tmp_path / "out.tif").exists()


def test_row_writer_writes_in_order_from_one_thread_and_reraises():
    written, threads = [], set()

    def write(y, rows):
        written.append(y)
        threads.add(threading.current_thread().name)

    with RowWriter(write) as writer:
        for y in range(0, 100, 10):
            writer(y, None)
    assert written == list(range(0, 100, 10)) and threads == {"seglib-writer"}

    def broken(y, rows):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with RowWriter(broken) as writer:
            for y in range(50):
                writer(y, None)


def test_row_writer_closes_after_an_interrupt_lost_the_writers_wake_up():
    """A Ctrl-C in the caller's put, after it woke the writer but before it deregistered the
    writer's waiter, leaves that waiter (re-acquired by the writer) at the head of the queue's
    condition: the next put wakes nobody. close() must still finish (it once hung: `seglib.predict`
    interrupted mid-run never exited)."""
    writer = RowWriter(lambda y, rows: None)
    not_empty = writer._queue.not_empty
    wait_until(lambda: len(not_empty._waiters) == 1)  # the writer waits for an item
    with writer._queue.mutex:  # what the interrupted notify() did: release the waiter, keep it listed
        stale = not_empty._waiters[0]
        stale.release()
    wait_until(lambda: len(not_empty._waiters) == 2)  # the writer woke, found nothing, waits again behind it
    closing = threading.Thread(target=writer.close, daemon=True)
    closing.start()
    closing.join(timeout=10)
    assert not closing.is_alive(), "RowWriter.close() hung after a lost wake-up"
    assert not writer._thread.is_alive()


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_block_kmeans_is_constant_on_blocks_and_separates_flat_colours():
    img = np.zeros((30, 34, 3), np.uint8)
    img[:, :16] = (200, 30, 30)  # a colour edge on a block boundary
    img[:, 16:] = (20, 20, 180)
    labels = block_kmeans(img, 2)
    assert labels.shape == (30, 34)
    assert len(np.unique(labels[:, :12])) == 1 and len(np.unique(labels[:, 20:])) == 1
    assert labels[0, 0] != labels[0, -1]
    blocks = labels[:28, :32].reshape(7, 4, 8, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()  # one label per 4 x 4 block
    # the block means average what is inside the image (edge blocks are partial)
    feats = block_features(torch.full((1, 3, 6, 6), 100.0), smooth=3)
    torch.testing.assert_close(feats, torch.full((1, 3, 2, 2), 100.0))


def test_predecessor_raster_streams_the_same_labels_as_the_whole_image(tmp_path):
    """Strips with a smoothing halo give the whole image's block means, so the same labels."""
    path = write_mosaic(tmp_path / "m.tif", 400)
    again = write_mosaic(tmp_path / "m2.tif", 400)
    with rasterio.open(path) as a, rasterio.open(again) as b:
        img = np.moveaxis(a.read(), 0, -1)
        np.testing.assert_array_equal(img, np.moveaxis(b.read(), 0, -1))  # deterministic
        assert a.profile["compress"] == "deflate" and a.profile["tiled"] and a.crs is not None
    out = predecessor_raster(path, tmp_path / "labels.tif", 5, strip=96)
    with rasterio.open(out) as dst:
        streamed = dst.read(1)
    np.testing.assert_array_equal(streamed, block_kmeans(img, 5))


def test_two_windows_at_once_give_the_labels_of_one_at_a_time(tmp_path, monkeypatch):
    """On a CPU with 2 threads the windowed pass runs two windows at once, one thread each: the
    same labels as one window at a time with both threads, no gradient recorded in the worker
    threads (grad mode is per thread), and torch's thread count restored afterwards."""
    import seglib.inference.pipeline as pipeline

    write_geotiff(tmp_path / "in.tif", smooth_image(320, seed=2), tiled=True, blockxsize=64, blockysize=64)
    model, seen = tiny_teacher(), []
    predict = model.predict

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.is_grad_enabled(), torch.get_num_threads()))
        return predict(*args, **kwargs)

    monkeypatch.setattr(model, "predict", spy)
    torch.set_num_threads(2)  # the one_thread fixture restores it
    outs = []
    for workers in (1, 2):
        monkeypatch.setattr(pipeline, "MODEL_WORKERS", workers)
        seen.clear()
        out = segment_raster(
            tmp_path / "in.tif",
            tmp_path / f"w{workers}.tif",
            Predictor(model, 4),
            tiling=Tiling(128, 32),
            progress=False,
        )
        with rasterio.open(out) as dst:
            outs.append(dst.read(1))
        windows = seen  # predict runs once per window (the fit calls fit_clusters)
        assert len(windows) == 16 and not any(grad for _, grad, _ in windows)
        assert {n for _, _, n in windows} == {2 // workers}
        if workers == 2:
            assert len({name for name, _, _ in windows}) == 2  # two worker threads
    assert torch.get_num_threads() == 2
    assert (outs[0] == outs[1]).mean() >= 0.999


@pytest.mark.slow
def test_raster_benchmark_reports_both_pipelines_from_one_run(tmp_path):
    """``bench --raster`` on a small mosaic: both pipelines ran (fresh processes), wrote full-size
    label rasters, and each reports Mpx/s, CPU seconds, peak RSS and its time split."""
    from seglib.evaluation.raster_bench import raster_benchmark, summary_lines

    result = raster_benchmark(size=256, k=4, repeats=1, threads=1, folder=tmp_path)
    assert set(result["median"]) == {"seglib", "predecessor"}
    for pipeline, m in result["median"].items():
        assert m["mpx_per_s"] > 0 and m["cpu_s"] > 0 and m["peak_rss_mb"] > 50
        with rasterio.open(tmp_path / f"{pipeline}.tif") as out:
            labels = out.read(1)
        assert labels.shape == (256, 256) and labels.max() < 4
    assert {"read", "model", "blend", "write"} <= set(result["median"]["seglib"]["stages_s"])
    assert {"read", "features", "kmeans", "write"} <= set(result["median"]["predecessor"]["stages_s"])
    lines = summary_lines(result)
    assert "Mpx/s" in lines[1] and "peak RSS" in lines[1] and lines[-1].startswith("seglib / predecessor")
