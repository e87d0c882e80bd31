"""The client side of an archive run: the legend, the tasks, the manifest, the summary, the mosaic.

from dask.distributed import Client
from seglib.inference.archive import Settings, segment_archive
with Client("tcp://scheduler:8786") as client:
    summary = segment_archive(client, "/data/ortho/*.tif", "/data/labels", Settings(k=6), shared=True,
                              mosaic="/data/labels/mosaic.vrt")
    print(summary["counts"])  # {'done': 998, 'skipped': 0, 'failed': 2}
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ...io.outputs import remove_stale_temporaries
from ...io.vrt import write_vrt
from ...viz import progress_bar
from .jobs import Settings, expand_inputs, input_identity
from .record import Manifest, output_key, write_summary
from .tasks import block_task, describe_error, sample_batch_task, segment_batch_task

__all__ = ["segment_archive", "fit_archive_legend"]

SUMMARY = "seglib-run.json"
SAMPLE_BATCH = 4  # files per legend-sample task
SEGMENT_BATCH = 16  # files per segmentation task


def _workers(client) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


def batches(items: list, workers: int, *, most: int) -> list[list]:
    """``items`` in consecutive runs of equal size, about four per worker (so a slow file does
    not leave a worker idle at the end) and at most ``most`` long: several files per dask task,
    the scheduler's and the client's cost per task shared by them."""
    size = max(1, min(most, -(-len(items) // (4 * workers))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def fit_archive_legend(
    client, model, paths: Sequence[Path], settings: Settings, *, positions: int, progress: bool = True
):
    """One legend fitted on every input's window sample, embedded on the workers a few files at a
    time (``budget.file_sample``); the client keeps a fixed budget of cells (``PositionBudget``)
    and runs the soft k-means once. Returns ``(Legend, {input: error})`` for the inputs
    that could not be read. Equal to ``legend.fit_sources`` on the same inputs."""
    from dask.distributed import as_completed

    from ...config import check_k
    from ..budget import FileSample, PositionBudget
    from ..legend import fit_positions, model_fingerprint
    from ..windows import FIT_PIXELS

    k = check_k(settings.k)
    fingerprint = model_fingerprint(model)
    budget = PositionBudget(positions, k=k, init_pool=model.head.init_pool)
    failed: dict[str, str] = {}
    # A few files per task (at most SAMPLE_BATCH: the results in flight hold their samples).
    todo = batches([(str(path), index) for index, path in enumerate(paths)], _workers(client), most=SAMPLE_BATCH)[::-1]
    in_flight = as_completed()

    def submit() -> None:
        jobs = todo.pop()
        args = (jobs, settings, k, positions, budget.threshold, fingerprint)
        key = f"seglib-sample-{jobs[0][1]}-{time.time_ns()}"
        in_flight.add(client.submit(sample_batch_task, *args, pure=False, key=key))

    for _ in range(min(len(todo), 2 * _workers(client) + 1)):  # a few ahead: later ones get a lower threshold
        submit()
    bar = progress_bar(total=len(paths), desc="legend sample", unit="file", disable=not progress)
    with bar:
        for future in in_flight:
            results = future.result()
            future.release()
            for result in results:  # each added, then dropped: only the budget's cells stay
                if isinstance(result, FileSample):
                    budget.add(result)
                else:
                    failed[result["input"]] = result["error"]
                bar.update()
            del results
            if todo:
                submit()
    meta = {"skipped": sorted(failed.items()), "tile": settings.tile, "overlap": settings.overlap}
    meta |= {"fit_windows": settings.fit_windows, "fit_pixels": FIT_PIXELS}
    return fit_positions(model, budget, k, seed=settings.seed, meta=meta), failed


def _legend_digest(legend) -> str | None:
    if legend is None:
        return None
    return hashlib.sha256(json.dumps(legend.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def segment_archive(
    client,
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    settings: Settings,
    *,
    legend=None,
    shared: bool = False,
    save_legend: str | Path | None = None,
    mosaic: str | Path | None = None,
    summary: str | Path | None = None,
    max_positions: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Segment every input on the workers of ``client`` (a ``dask.distributed.Client``) into
    ``output``; returns the run summary (also written to ``summary``, default
    ``<output>/seglib-run.json``).

    ``inputs``: a folder, a glob pattern, a file, or a list of files. ``legend``: a legend
    (``Legend`` or a legend file) every file is assigned to; ``shared``: fit one on all
    inputs first (``fit_archive_legend``, at most ``max_positions`` cells; saved to ``save_legend``).
    Inputs whose outputs are complete from an earlier run with the same model, legend and
    settings are skipped (``record.Manifest``); a failing input is recorded and the others go on.
    ``mosaic``: a VRT over every label output, written at the end. Every path must be readable
    (inputs, checkpoint) and writable (output) by the workers at the same name.
    """
    from ..files import output_paths
    from ..legend import Legend, load_legend
    from .cluster import dashboard_link
    from .tasks import worker_model

    started = time.perf_counter()
    output = Path(output)
    paths = expand_inputs(inputs) if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    targets = output_paths(paths, output, preview=settings.preview, vector=settings.vector)
    output.mkdir(parents=True, exist_ok=True)
    summary_path = Path(summary) if summary is not None else output / SUMMARY
    model, fingerprint = worker_model(settings.checkpoint, "cpu")  # the client's copy: fingerprint, legend fit
    records: dict[str, dict] = {str(p): {"input": str(p), "status": "pending"} for p in paths}
    report = {"inputs": len(paths), "output": str(output), "workers": _workers(client)}
    report["dashboard"] = dashboard_link(client)

    if isinstance(legend, (str, Path)):
        legend = load_legend(legend, model=model, k=settings.k if isinstance(settings.k, int) else None)
    elif isinstance(legend, Legend):
        legend.check_model(model)
    if shared:
        cache = output / f".seglib-legend-{_inputs_digest(paths, settings, fingerprint)[:16]}.json"
        legend = _shared_legend(client, model, paths, settings, cache, records, max_positions, progress, echo)
    if save_legend is not None and legend is not None:
        legend.save(save_legend)
    report["legend"] = None if legend is None else {"k": legend.k, "digest": _legend_digest(legend)}
    legend_digest = _legend_digest(legend)

    manifest = Manifest(output)
    removed, _ = remove_stale_temporaries(output)  # of killed runs on this machine (process gone)
    if removed:
        echo(f"removed {len(removed)} temporary file(s) left by an interrupted run")
    keys, todo = _left_to_do(targets, records, manifest, fingerprint, legend_digest, settings)
    skipped = sum(r["status"] == "skipped" for r in records.values())
    if skipped:
        echo(f"{skipped} input(s) complete from an earlier run: skipped; {len(todo)} to do")

    scattered = client.scatter(legend, broadcast=True) if legend is not None else None
    try:
        _run_tasks(client, todo, targets, settings, scattered, records, manifest, keys, progress)
    except BaseException:  # Ctrl-C, SIGTERM: the summary says how far it got ("pending": not finished)
        report.update(interrupted=True, seconds=round(time.perf_counter() - started, 3), files=list(records.values()))
        write_summary(summary_path, report)
        raise

    if mosaic is not None:
        report |= _write_mosaic(mosaic, records)
    counts = {status: sum(r["status"] == status for r in records.values()) for status in ("done", "skipped", "failed")}
    report.update(counts=counts, seconds=round(time.perf_counter() - started, 3), files=list(records.values()))
    write_summary(summary_path, report)
    report["summary"] = str(summary_path)
    return report


def _inputs_digest(paths: list[Path], settings: Settings, fingerprint: str) -> str:
    """What a shared legend's fit depends on: the settings, the model and the inputs' identities."""
    identities = [input_identity(p) for p in paths if p.exists()]
    return hashlib.sha256(json.dumps([settings.key(), fingerprint, identities]).encode()).hexdigest()


def _shared_legend(client, model, paths, settings, cache: Path, records, max_positions, progress, echo):
    """The legend fitted on all ``paths`` (``fit_archive_legend``), kept at ``cache`` and read from
    it by a later run; inputs the fit could not read are recorded as failed."""
    from ..legend import MAX_POSITIONS, load_legend

    if cache.is_file():
        legend = load_legend(cache, model=model)
        echo(f"shared legend: K={legend.k}, from the earlier run's fit ({cache.name})")
        return legend
    tic = time.perf_counter()
    legend, unreadable = fit_archive_legend(
        client, model, paths, settings, positions=max_positions or MAX_POSITIONS, progress=progress
    )
    for path, error in unreadable.items():
        records[path].update(status="failed", error=error)
    legend.save(cache)
    echo(
        f"shared legend: K={legend.k}, fitted on {legend.meta['windows']} windows of "
        f"{len(legend.meta['files'])} file(s), {legend.meta['positions']} cells "
        f"({time.perf_counter() - tic:.1f} s)"
    )
    return legend


def _left_to_do(
    targets, records, manifest: Manifest, fingerprint: str, legend_digest: str | None, settings: Settings
) -> tuple[dict, list[Path]]:
    """(each input's output key, the inputs still to segment): an input whose outputs the
    manifest holds under the same key (input, model, legend, settings) is recorded as skipped,
    one whose identity cannot be read as failed."""
    keys, todo = {}, []
    for path, target in targets.items():
        if records[str(path)]["status"] == "failed":
            continue
        try:
            keys[path] = output_key(input_identity(path), fingerprint, legend_digest, settings.key())
        except OSError as exc:
            records[str(path)].update(status="failed", error=describe_error(exc))
            continue
        if manifest.done(keys[path]):
            files = list(manifest.entries[keys[path]])
            vrt = str(target.with_suffix(".vrt"))
            records[str(path)].update(status="skipped", output=vrt if vrt in files else str(target), files=files)
        else:
            todo.append(path)
    return keys, todo


def _write_mosaic(mosaic: str | Path, records: dict[str, dict]) -> dict[str, str]:
    """A VRT over the label GeoTIFFs of the finished inputs: {"mosaic": its path}, or
    {"mosaic_error": why} (the outputs stand without it)."""
    tiles = [f for r in records.values() if r["status"] in ("done", "skipped") for f in r.get("files", [])]
    try:
        return {"mosaic": str(write_vrt(mosaic, [Path(f) for f in tiles if f.endswith(".tif")]))}
    except (ValueError, OSError) as exc:
        return {"mosaic_error": describe_error(exc)}


def _run_tasks(client, todo, targets, settings, legend, records, manifest, keys, progress) -> None:
    """Submit the inputs a few per task (``batches``; a block of a split raster is a task of its
    own) and record each input's result as its task comes back; the manifest gets an input as
    soon as all its outputs are written."""
    from dask.distributed import as_completed

    token = time.time_ns()
    futures = as_completed()
    owner: dict[str, tuple[list[Path], tuple | None]] = {}  # task key -> (its inputs, rows of a block or None)
    for i, batch in enumerate(batches(todo, _workers(client), most=SEGMENT_BATCH)):
        key = f"seglib-files-{i}-{token}"
        owner[key] = (batch, None)
        jobs = [(str(path), str(targets[path])) for path in batch]
        futures.add(client.submit(segment_batch_task, jobs, settings, legend, pure=False, key=key))
    splits: dict[Path, dict] = {}  # a split raster -> its blocks still to come, their files and errors

    def record(path: Path, result: dict) -> None:
        if result["status"] == "done":
            files = result.get("files") or [result["output"], result.get("vector")]
            if settings.preview and not result.get("files"):
                from ..files import preview_path

                files.append(str(preview_path(Path(result["output"]))))
            result["files"] = [str(f) for f in files if f]
            manifest.add(keys[path], str(path), result["files"])
        records[str(path)].update(result)
        bar.update()

    def split(path: Path, result: dict) -> None:
        plan = {key: result[key] for key in ("k", "box", "clusters")}
        edges = result["blocks"]
        splits[path] = {"left": len(edges), "errors": [], "files": [], "k": result["k"]}
        for j, block in enumerate(edges):
            key = f"seglib-block-{token}-{len(owner)}-{j}"
            owner[key] = ([path], tuple(block))
            args = (str(path), str(targets[path]), tuple(block), j == len(edges) - 1, settings, plan)
            futures.add(client.submit(block_task, *args, pure=False, key=key))

    bar = progress_bar(total=len(todo), desc="files", unit="file", disable=not progress)
    with bar:
        for future in futures:
            paths, rows = owner.pop(future.key)
            try:
                results = future.result()
            except Exception as exc:  # the worker died (killed, out of memory) while running it
                error = f"worker lost: {describe_error(exc)}"
                results = [{"input": str(path), "status": "failed", "error": error} for path in paths]
            future.release()
            if rows is not None:  # one block of a split raster
                path, result = paths[0], results if isinstance(results, dict) else results[0]
                state = splits[path]
                state["left"] -= 1
                if result["status"] == "failed":
                    state["errors"].append(f"rows {rows[0]}-{rows[1]}: {result['error']}")
                else:
                    state["files"].append((result["first_row"], result["output"]))
                if not state["left"]:
                    record(path, _finish_split(path, targets[path], state, settings))
                continue
            for path, result in zip(paths, results, strict=True):
                if result["status"] == "split":
                    split(path, result)
                else:
                    record(path, result)


def _finish_split(path: Path, target: Path, state: dict, settings: Settings) -> dict:
    """The record of a split raster once its last block is in: a VRT over its block files."""
    vrt = target.with_suffix(".vrt")
    record = {"input": str(path), "output": str(vrt), "k": state["k"], "error": None}
    if state["errors"]:
        return {**record, "status": "failed", "error": "; ".join(state["errors"])}
    rows, blocks = zip(*sorted(state["files"]), strict=True)
    write_vrt(vrt, blocks, offsets=[(row, 0) for row in rows])
    record.update(status="done", blocks=len(blocks), files=[str(vrt), *blocks])
    if settings.vector or settings.preview:
        record["note"] = "no polygons or preview for a raster split into blocks"
    return record
