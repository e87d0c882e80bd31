"""Benchmark of archive-scale inference (``python -m seglib.predict --workers N``): throughput
against the single-process command, the scheduler's overhead per file, and the peak memory of
the shared-legend fit, on synthetic archives written to a scratch folder.

    python -m seglib.evaluation.archive_bench throughput --files 100 --size 512 --repeats 2
    python -m seglib.evaluation.archive_bench overhead --files 10000
    python -m seglib.evaluation.archive_bench memory --files 100 2000 [--positions 16384]

``throughput`` runs, interleaved in each repeat, the single-process command at 1 torch thread and
at torch's default, and ``--workers 2``, each a fresh process (Python, torch, the cluster's start
included), all with ``--shared-legend``; then (``steady``) the 1-thread command and the dask run
again in one process, on a cluster started once and warmed up: the throughput without start-up.
``overhead`` runs ``--workers 2`` on many tiny files and compares the wall time with the workers'
own seconds per file: the rest is the scheduler's and the client's cost per file. ``memory`` fits
a shared legend on a new local cluster in a fresh process per archive size and reports the peak
RSS of the client and of each worker. Every command prints one JSON object (with the 1-minute
load average before and after: on a shared machine, say so next to the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _archive_there(folder: Path, files: int, size: int) -> bool:
    tiles = sorted(folder.glob("tile_*.tif"))
    if len(tiles) != files:
        return False
    import rasterio

    with rasterio.open(tiles[-1]) as src:
        return src.width == src.height == size


def _fresh(folder: Path) -> str:
    """``folder`` emptied (a rerun with the same scratch must not find outputs to skip)."""
    shutil.rmtree(folder, ignore_errors=True)
    return str(folder)


def _predict(args: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (its processes and their workers) of ``python -m
    seglib.predict ARGS`` (which must succeed)."""
    tic, cpu = time.perf_counter(), _cpu()
    subprocess.run([sys.executable, "-m", "seglib.predict", *args, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tic, _cpu() - cpu


def throughput(files: int, size: int, repeats: int, workers: int, scratch: Path, fresh: bool = True) -> dict:
    from .archive_data import write_archive

    inputs = scratch / "in"
    if not _archive_there(inputs, files, size):  # an earlier run's (--scratch): the same tiles
        write_archive(inputs, files, size=size)
    common = ["--input", str(inputs), "--k", "6", "--shared-legend"]
    load = [_load()]
    steady = _steady(common, files, repeats, workers, scratch, load)
    if not fresh:
        return {"files": files, "size": size, "steady": steady, "load_1min": load, "cores": os.cpu_count()}
    runs: dict[str, list[float]] = {"single_1_thread": [], "single_default_threads": [], f"workers_{workers}": []}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, extra in (
            ("single_1_thread", ["--threads", "1"]),
            ("single_default_threads", []),
            (f"workers_{workers}", ["--workers", str(workers)]),
        ):
            wall, used = _predict([*common, *extra, "--output", _fresh(scratch / f"{name}_{r}")])
            runs[name].append(round(wall, 2))
            cpu[name].append(round(used, 2))
            load.append(_load())
    best = {name: min(times) for name, times in runs.items()}
    dask = best[f"workers_{workers}"]
    least = {name: min(times) for name, times in cpu.items()}
    return {
        "files": files,
        "size": size,
        "wall_s": runs,
        "cpu_s": cpu,
        # An estimate for an idle machine, not a measurement: the single-process run's CPU seconds
        # on one core against the dask run's spread evenly over its workers' cores.
        "idle_speedup_estimate": round(least["single_1_thread"] / (least[f"workers_{workers}"] / workers), 2),
        "s_per_file": {name: round(t / files, 3) for name, t in best.items()},
        "speedup_vs_single_1_thread": round(best["single_1_thread"] / dask, 2),
        "speedup_vs_single_default_threads": round(best["single_default_threads"] / dask, 2),
        "steady": steady,
        "load_1min": load,
        "cores": os.cpu_count(),
    }


def _steady(common: list[str], files: int, repeats: int, workers: int, scratch: Path, load: list[float]) -> dict:
    """The same two runs without the start-up costs, interleaved in this process: the library
    functions the command calls, at 1 torch thread (``legend.fit_sources`` then ``predict_file`` per
    input, as ``python -m seglib.predict --shared-legend`` without ``--workers``), and
    ``segment_archive`` on a local cluster started once, whose workers have already loaded the model
    (a warm-up run on a few files): the throughput of an archive run on a cluster that is already up
    (``--scheduler``), or of a long ``--workers`` run."""
    import torch

    from ..inference.archive import Settings, segment_archive
    from ..inference.archive.cluster import dask_client
    from ..inference.files import output_paths, predict_file
    from ..inference.legend import fit_sources
    from ..io.images import list_inputs
    from ..io.rasters import SourceFile
    from ..models import load_model

    inputs = Path(common[common.index("--input") + 1])
    settings = Settings(k=int(common[common.index("--k") + 1]))

    def single_pass(output: Path) -> None:  # python -m seglib.predict --shared-legend --threads 1, in-process
        torch.set_num_threads(1)
        paths = list_inputs(inputs)
        model = load_model(None)
        legend = fit_sources(model, [SourceFile(p) for p in paths], settings.k, tiling=settings.tiling)
        output.mkdir(parents=True, exist_ok=True)
        for path, target in output_paths(paths, output).items():
            predict_file(path, target, model, settings.k, tiling=settings.tiling, legend=legend, progress=False)

    def on_dask(client, source, output: Path) -> None:  # what --scheduler runs, on this process's client
        paths = [p.resolve() for p in list_inputs(source)]
        report = segment_archive(client, paths, output, settings, shared=True, progress=False, echo=lambda line: None)
        assert report["counts"]["failed"] == 0, report["counts"]

    def cpu_seconds() -> float:  # this process (client, scheduler, the single run) and the cluster's
        import psutil

        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    single, dask = "single_1_thread", f"warm_workers_{workers}"
    runs: dict[str, list[float]] = {single: [], dask: []}
    cpu: dict[str, list[float]] = {single: [], dask: []}

    def timed(name: str, r: int, work) -> None:
        tic, used = time.perf_counter(), cpu_seconds()
        work(Path(_fresh(scratch / f"steady_{name}_{r}")))
        runs[name].append(round(time.perf_counter() - tic, 2))
        cpu[name].append(round(cpu_seconds() - used, 2))

    with dask_client(workers=workers) as client:
        on_dask(client, str(inputs / "tile_0000[0-3].tif"), Path(_fresh(scratch / "warmup")))
        for r in range(repeats):
            timed(single, r, single_pass)
            timed(dask, r, lambda output: on_dask(client, inputs, output))
            load.append(_load())
    best = {name: min(times) for name, times in runs.items()}
    least = {name: min(times) for name, times in cpu.items()}
    return {
        "wall_s": runs,
        "cpu_s": cpu,
        "s_per_file": {name: round(t / files, 3) for name, t in best.items()},
        "cpu_s_per_file": {name: round(t / files, 4) for name, t in least.items()},
        "speedup": round(best[single] / best[dask], 2),
        # An estimate for idle cores, not a measurement: the single run's CPU seconds on one core
        # against all the dask run's CPU seconds (client, scheduler, workers) spread over the workers.
        "idle_speedup_estimate": round(least[single] / (least[dask] / workers), 2),
    }


def overhead(files: int, size: int, workers: int, scratch: Path) -> dict:
    """Scheduler and client cost per file: wall time of the run beyond the workers' own time."""
    from .archive_data import write_archive

    inputs = scratch / "in"
    tic = time.perf_counter()
    write_archive(inputs, files, size=size, columns=100)
    written = time.perf_counter() - tic
    load = [_load()]
    out = scratch / "out"
    wall, _ = _predict(["--input", str(inputs), "--k", "4", "--output", _fresh(out), "--workers", str(workers)])
    load.append(_load())
    summary = json.loads((out / "seglib-run.json").read_text())
    task = sum(r.get("seconds", 0.0) for r in summary["files"])
    run = summary["seconds"]  # the archive run itself, without Python's and the cluster's start
    noop = _noop_seconds(files, workers)
    load.append(_load())
    return {
        "files": files,
        "size": size,
        "workers": workers,
        "wall_s": round(wall, 2),
        "run_s": run,
        "start_s": round(wall - run, 2),
        "task_s_per_file": round(task / files, 4),
        "run_s_per_file": round(run / files, 4),
        "overhead_s_per_file": round((run * workers - task) / files, 4),
        "noop_task_s": noop,
        "write_inputs_s": round(written, 1),
        "load_1min": load,
    }


def _noop_seconds(tasks: int, workers: int) -> float:
    """Seconds per task of the client and the scheduler alone: ``tasks`` tasks that do nothing,
    submitted and collected the way an archive run does (``as_completed``), on a new local cluster."""
    from dask.distributed import as_completed

    from ..inference.archive.cluster import dask_client

    with dask_client(workers=workers) as client:
        tic = time.perf_counter()
        futures = as_completed([client.submit(int, i, pure=False) for i in range(tasks)])
        for future in futures:
            future.result()
            future.release()
        return round((time.perf_counter() - tic) / tasks, 5)


def extrapolate(task_s: float, serial_s: float, files: int, start_s: float, workers=(2, 8, 16, 32, 64, 128)) -> dict:
    """A model, not a measurement: the run takes the cluster's start plus the larger of the work
    spread over the workers and the serial cost per file (the client's and the scheduler's)."""
    return {w: round(start_s + files * max(task_s / w, serial_s), 1) for w in workers}


def _memory_child(files: int, size: int, workers: int, scratch: Path, positions: int | None = None) -> dict:
    """In a fresh process: a shared legend over ``files`` inputs on a new local cluster."""
    from ..inference.archive import Settings, fit_archive_legend
    from ..inference.archive.cluster import dask_client
    from ..inference.archive.tasks import worker_model
    from ..inference.legend import MAX_POSITIONS

    paths = sorted((scratch / "in").glob("tile_*.tif"))  # written by ``memory``, in another process
    if len(paths) != files:
        raise SystemExit(f"{scratch / 'in'} holds {len(paths)} tiles, not {files}: run the `memory` command")
    settings = Settings(k=6)
    model, _ = worker_model(None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with dask_client(workers=workers) as client:
        tic = time.perf_counter()
        positions = positions or MAX_POSITIONS
        legend, failed = fit_archive_legend(client, model, paths, settings, positions=positions, progress=False)
        seconds = time.perf_counter() - tic

        def peak() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        worker_peaks = sorted(client.run(peak).values())
    return {
        "files": files,
        "budget_cells": positions,
        "cells_kept": legend.meta["positions"],
        "windows": legend.meta["windows"],
        "failed": len(failed),
        "fit_s": round(seconds, 1),
        "client_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "client_rss_before_fit_mib": round(before / 1024, 1),
        "worker_peak_rss_mib": [round(p / 1024, 1) for p in worker_peaks],
    }


def memory(sizes: list[int], size: int, workers: int, scratch: Path, positions: int | None = None) -> dict:
    """Each archive size in a fresh process that only fits the legend, as a real run's client does:
    the archive is written here first (writing it in the measured process added ~45 MiB to its peak)."""
    from .archive_data import write_archive

    rows, load = [], [_load()]
    for files in sizes:
        if not _archive_there(scratch / f"m{files}" / "in", files, size):
            write_archive(scratch / f"m{files}" / "in", files, size=size, columns=50)
        cmd = [sys.executable, "-m", "seglib.evaluation.archive_bench", "_memory", "--files", str(files)]
        cmd += ["--size", str(size), "--workers", str(workers), "--scratch", str(scratch / f"m{files}")]
        cmd += ["--positions", str(positions)] if positions else []
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        load.append(_load())
    return {"size": size, "workers": workers, "runs": rows, "load_1min": load}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seglib.evaluation.archive_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["throughput", "overhead", "memory", "_memory"])
    p.add_argument("--files", type=int, nargs="+", default=None, help="inputs (memory: one run per number)")
    p.add_argument("--size", type=int, default=None, help="side of each synthetic tile in pixels")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--positions", type=int, default=None, help="memory: the legend's budget of cells (default 2^17)")
    p.add_argument("--steady-only", action="store_true", help="throughput: only the runs on a warm cluster")
    p.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    defaults = {"throughput": ([100], 512), "overhead": ([10000], 32), "memory": ([100, 2000], 128)}
    files, size = defaults.get(args.what, ([100], 128))
    files, size = args.files or files, args.size or size
    with tempfile.TemporaryDirectory(prefix="seglib-archive-bench-") as tmp:
        scratch = args.scratch or Path(tmp)
        if args.what == "throughput":
            result = throughput(files[0], size, args.repeats, args.workers, scratch, fresh=not args.steady_only)
        elif args.what == "overhead":
            result = overhead(files[0], size, args.workers, scratch)
            from ..inference.archive.run import SEGMENT_BATCH

            # The serial cost per file: the workers' measured time outside tasks per file (an upper
            # bound: the scheduler's cost per task is shared by the files of a task, and the client
            # records each file), at least a no-op task's cost shared by the most files a task takes.
            serial = max(result["overhead_s_per_file"], result["noop_task_s"] / SEGMENT_BATCH)
            result["model_s_for_10000_files_of_this_size"] = extrapolate(
                result["task_s_per_file"], serial, 10000, result["start_s"]
            )
        elif args.what == "memory":
            result = memory(files, size, args.workers, scratch, args.positions)
        else:
            result = _memory_child(files[0], size, args.workers, scratch, args.positions)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
