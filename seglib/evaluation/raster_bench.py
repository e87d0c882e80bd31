"""The raster benchmark: a large compressed GeoTIFF through seglib and through the predecessor.

    python -m seglib.bench --raster                     # 6144 x 6144 (37.7 Mpx), K = 6, 3 repeats
    python -m seglib.bench --raster --raster-size 2048 --raster-repeats 1 --json

``write_mosaic`` writes the test raster once (kept under ``runs/bench_raster/``): a deterministic
mosaic of 384 px crops of the sample aerial tiles (``seglib/assets/dubai``; seeded choice of
tile, crop, flips and transpose), RGB uint8, 256 px tiles, deflate, with a UTM CRS and 0.5 m
pixels, the layout of a typical orthophoto. Two pipelines then segment it, each in a fresh
process and in turns (ours, predecessor, ours, ...), so a change of load on a shared machine
hits both alike:

* **seglib**: ``seglib.inference.engine.segment_raster`` with the bundled model at default settings;
* **predecessor**: the predecessor QGIS plugin's k-means pipeline (``seglib.evaluation.baselines``:
  3 x 3 box smoothing, 4 px block means, k-means on 20 000 sampled block means, labels
  repeated to full resolution), streamed over the raster in strips by ``predecessor_raster``
  and written the same way (uint8 deflate GeoTIFF by a writer thread).

Each run reports the wall time of the call (imports and model loading excluded, reported apart
as ``setup_s``), the CPU time of all its threads (``cpu_s``: on a machine shared with other jobs
it moves far less than the wall time does), megapixels per second, the process's peak RSS
(``VmHWM``: Python, torch and the model included), the seconds per stage and the machine's load
average before and after. Stages run in threads that overlap (a reader, two model workers, a
writer), so their sum exceeds the wall time: ``model`` sums both workers' seconds, ``wait`` is
the time the labelling thread waited for the reader.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["MOSAIC_BLOCK", "write_mosaic", "predecessor_raster", "run_pipeline", "raster_benchmark", "summary_lines"]

MOSAIC_BLOCK = 384  # side of the sample-tile crops the mosaic is made of


def write_mosaic(path: str | Path, size: int, *, seed: int = 0) -> Path:
    """Write a ``size`` x ``size`` RGB GeoTIFF mosaic of sample-tile crops (module docstring),
    one strip of crops at a time; the same ``size`` and ``seed`` give the same pixels."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    from ..io.images import read_image
    from ..paths import SAMPLE_IMAGES

    path = Path(path)
    tiles = [read_image(p)[0] for p in sorted(SAMPLE_IMAGES.iterdir())]
    rng = np.random.default_rng(seed)
    b = MOSAIC_BLOCK
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs="EPSG:32640")
    profile.update(transform=Affine(0.5, 0, 500000, 0, -0.5, 2700000), photometric="RGB", compress="deflate")
    profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(tmp, "w", **profile) as dst:
        for y in range(0, size, b):
            strip = []
            for _ in range(0, size, b):
                tile = tiles[rng.integers(len(tiles))]
                oy, ox = rng.integers(tile.shape[0] - b + 1), rng.integers(tile.shape[1] - b + 1)
                crop = tile[oy : oy + b, ox : ox + b]
                crop = crop[::-1] if rng.integers(2) else crop
                crop = crop[:, ::-1] if rng.integers(2) else crop
                strip.append(crop.transpose(1, 0, 2) if rng.integers(2) else crop)
            rows = np.concatenate(strip, 1)[: size - y, :size]  # (h, size, 3)
            dst.write(np.moveaxis(rows, -1, 0), window=Window(0, y, size, rows.shape[0]))
    os.replace(tmp, path)
    return path


def predecessor_raster(
    path: str | Path,
    output: str | Path,
    k: int,
    *,
    strip: int = 512,
    seed: int = 0,
    times: dict[str, float] | None = None,
) -> Path:
    """The predecessor's block-mean k-means over a uint8 RGB GeoTIFF, streamed in strips of
    ``strip`` rows: only the block means (3 floats per 4 x 4 block) are held for the whole raster."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from ..inference.engine import GDAL_CACHE_MB
    from ..inference.pipeline import RowWriter, timed
    from ..io.outputs import label_geotiff, label_profile
    from ..io.rasters import RasterSource
    from .baselines import BLOCK, BLOCK_SAMPLE, BLOCK_SMOOTH, block_features, kmeans

    halo = BLOCK_SMOOTH // 2  # rows the smoothing reads beyond a strip
    strip = -(-strip // BLOCK) * BLOCK
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), rasterio.open(path) as src:
        height, width = src.height, src.width
        feats = np.empty((3, math.ceil(height / BLOCK), math.ceil(width / BLOCK)), np.float32)
        for y in range(0, height, strip):
            top, bottom = max(0, y - halo), min(height, y + strip + halo)
            with timed(times, "read"):
                bands = src.read([1, 2, 3], window=Window(0, top, width, bottom - top))  # (3, h, W)
            with timed(times, "features"):
                x = torch.from_numpy(bands).float()[None]
                if BLOCK_SMOOTH > 1:  # smoothing first, on the strip with its halo, then the halo cut
                    x = torch.nn.functional.avg_pool2d(x, BLOCK_SMOOTH, 1, halo, count_include_pad=False)
                x = x[..., y - top : y - top + min(strip, height - y), :]
                part = block_features(x, smooth=1)[0]  # (3, h/4, W/4)
                feats[:, y // BLOCK : y // BLOCK + part.shape[1]] = part.numpy()
        with timed(times, "kmeans"):
            points = torch.from_numpy(feats.reshape(3, -1).T)  # (N, 3)
            labels, _ = kmeans(points, k, seed=seed, sample=BLOCK_SAMPLE)
            low = labels.to(torch.uint8).reshape(feats.shape[1:]).numpy()  # (H/4, W/4)
    with RasterSource(path) as source:
        profile = label_profile(source)
    output = Path(output)
    with label_geotiff(output, profile, k) as dst, RowWriter(dst.write, times=times) as writer:
        for y in range(0, height, strip):
            with timed(times, "upsample"):
                rows = low[y // BLOCK : (y + strip) // BLOCK].repeat(BLOCK, 0).repeat(BLOCK, 1)
                dst.open()
                writer(y, np.ascontiguousarray(rows[: min(strip, height - y), :width]))
    return output


def _peak_rss_mb() -> float:
    """This process's peak RSS in MiB (``VmHWM``; ``ru_maxrss`` survives fork + exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_pipeline(pipeline: str, source: str, output: str, k: int, threads: int) -> dict:
    """One run of ``pipeline`` (seglib | predecessor) in this process; the numbers of one row."""
    import torch

    start = time.perf_counter()
    torch.set_num_threads(threads)
    times: dict[str, float] = {}
    cpu = 0.0
    if pipeline == "seglib":
        from ..inference.engine import segment_raster
        from ..inference.predictor import Predictor
        from ..models import load_model

        predictor = Predictor(load_model(None), k)
        tic, cpu = time.perf_counter(), time.process_time()
        segment_raster(source, output, predictor, progress=False, times=times)
    elif pipeline == "predecessor":
        tic, cpu = time.perf_counter(), time.process_time()
        predecessor_raster(source, output, k, times=times)
    else:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose seglib or predecessor")
    wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "setup_s": tic - start,
        "peak_rss_mb": _peak_rss_mb(),
        "stages_s": {key: round(value, 3) for key, value in sorted(times.items())},
    }


_CHILD = "import json, sys; from seglib.evaluation.raster_bench import run_pipeline; print(json.dumps(run_pipeline(*sys.argv[1:4], int(sys.argv[4]), int(sys.argv[5]))))"  # noqa: E501


def raster_benchmark(
    *, size: int = 6144, k: int = 6, repeats: int = 3, threads: int = 2, seed: int = 0, folder: str | Path | None = None
) -> dict:
    """Write (or reuse) the mosaic in ``folder`` (default ``runs/bench_raster``) and time both
    pipelines on it, ``repeats`` times in turns, each run in a fresh process; medians per
    pipeline and every run's numbers."""
    from ..paths import runs_dir

    folder = runs_dir("bench_raster") if folder is None else Path(folder)
    source = folder / f"mosaic_{size}_seed{seed}.tif"
    if not source.is_file():
        write_mosaic(source, size, seed=seed)
    mpx = size * size / 1e6
    runs: dict[str, list[dict]] = {"seglib": [], "predecessor": []}
    for _ in range(repeats):
        for pipeline in runs:
            load_before = os.getloadavg()[0]
            cmd = [sys.executable, "-c", _CHILD, pipeline, str(source), str(folder / f"{pipeline}.tif"), str(k)]
            done = subprocess.run([*cmd, str(threads)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{pipeline} run failed:\n{done.stderr[-2000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run.update(load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
            run["mpx_per_s"] = round(mpx / run["wall_s"], 2)
            runs[pipeline].append(run)
    summary = {}
    for pipeline, rs in runs.items():
        keys = rs[0]["stages_s"]
        stages = {key: round(statistics.median(r["stages_s"].get(key, 0.0) for r in rs), 3) for key in keys}
        summary[pipeline] = {
            "wall_s": round(statistics.median(r["wall_s"] for r in rs), 3),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 3),
            "mpx_per_s": round(statistics.median(r["mpx_per_s"] for r in rs), 2),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
            "stages_s": stages,
        }
    return {
        "raster": f"{size} x {size} RGB uint8, deflate, 256 px tiles ({mpx:.1f} Mpx)",
        "k": k,
        "threads": threads,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "median": summary,
        "speed_vs_predecessor": round(summary["seglib"]["mpx_per_s"] / summary["predecessor"]["mpx_per_s"], 3),
        "runs": runs,
    }


def summary_lines(result: dict) -> list[str]:
    """The medians of ``raster_benchmark`` as a few lines of text: one per pipeline, with Mpx/s,
    wall and CPU seconds, peak RSS and the seconds per stage (the docs/performance.md table)."""
    lines = [f"{result['raster']}, K = {result['k']}, {result['threads']} threads, median of {result['repeats']}"]
    for pipeline, m in result["median"].items():
        stages = ", ".join(f"{key} {value:.2f}" for key, value in m["stages_s"].items())
        lines.append(
            f"{pipeline:>11}: {m['mpx_per_s']:6.2f} Mpx/s, {m['wall_s']:.2f} s wall, {m['cpu_s']:.2f} s CPU, "
            f"peak RSS {m['peak_rss_mb']:.0f} MiB; stages (s): {stages}"
        )
    loads = [r[key] for rs in result["runs"].values() for r in rs for key in ("load_before", "load_after")]
    lines.append(f"seglib / predecessor: {result['speed_vs_predecessor']:.2f}x; load average {min(loads)}-{max(loads)}")
    return lines
