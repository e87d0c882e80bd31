"""The work an archive run hands to dask workers: plain functions of plain data.

Each task loads the model once per worker process (``worker_model``), runs on one torch thread
(a worker is one process with one thread; N workers use N cores) and never raises for a bad
input: it returns a record (``status`` "done", "split" or "failed", one-line ``error``) that the
client writes into the run summary. Outputs go through the same functions as the single-process
command (``predict_file``: ``segment_raster``, ``polygonize``, the preview), so a file's outputs
are byte for byte those of ``python -m seglib.predict`` without ``--workers``.
"""

from __future__ import annotations

import time
import traceback
from contextlib import closing
from pathlib import Path

import numpy as np

from .jobs import Settings, block_edges

__all__ = [
    "worker_model",
    "sample_task",
    "sample_batch_task",
    "segment_task",
    "segment_batch_task",
    "block_task",
    "describe_error",
]

_MODELS: dict = {}  # (checkpoint, device) -> (model, fingerprint), one per worker process


def worker_model(checkpoint: str | None, device: str = "cpu"):
    """The model of ``checkpoint`` (None: the bundled one) on ``device``, loaded once per process,
    with torch on one thread."""
    import torch

    torch.set_num_threads(1)
    key = (checkpoint, device)
    if key not in _MODELS:
        from ...device import resolve_device
        from ...models import load_model
        from ..legend import model_fingerprint

        model = load_model(checkpoint).to(resolve_device(device))
        _MODELS[key] = (model, model_fingerprint(model))
    return _MODELS[key]


def describe_error(exc: BaseException) -> str:
    """One line for the summary: the message of a known error (it names the file and the fix),
    else the type, the message and where it was raised."""
    from ...io.images import ImageReadError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ImageReadError, ValueError, OSError)):
        return text
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(frame[0].filename).name}:{frame[0].lineno})" if frame else ""
    return f"{type(exc).__name__}: {text}{where}"


def sample_task(path: str, index: int, settings: Settings, k: int, positions: int, threshold, fingerprint: str):
    """The fit-sample cells of one input that can be in the legend's budget
    (``budget.file_sample``), or ``{"status": "failed", ...}`` for an unreadable file."""
    from ..budget import file_sample

    model, mine = worker_model(settings.checkpoint, settings.device)
    if mine != fingerprint:
        raise RuntimeError("this worker loaded another model than the client: install the same seglib and weights")
    try:
        return file_sample(
            model, Path(path), index, k=k, tiling=settings.tiling, positions=positions, threshold=threshold
        )
    except Exception as exc:  # recorded, never raised: one bad file must not stop the others
        return {"status": "failed", "input": path, "error": describe_error(exc)}


def sample_batch_task(
    jobs: list[tuple[str, int]], settings: Settings, k: int, positions: int, threshold, fingerprint: str
):
    """``sample_task`` on each (input, index) of ``jobs``, in order: several files per task, so
    the scheduler's and the client's cost is paid once for them."""
    return [sample_task(path, index, settings, k, positions, threshold, fingerprint) for path, index in jobs]


def _raster_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of a raster GDAL reads (header only), or None for PNG/JPEG."""
    from ...io.images import RASTER_SUFFIXES

    if path.suffix.lower() not in RASTER_SUFFIXES:
        return None
    import rasterio

    with rasterio.open(path) as src:
        return src.height, src.width


def segment_task(path: str, target: str, settings: Settings, legend) -> dict:
    """Segment one input into ``target`` (and its preview and polygons) as ``python -m
    seglib.predict`` would; a raster of more than ``settings.block_size**2`` pixels is not
    segmented here but planned into blocks: ``{"status": "split", "blocks": [...], "clusters"}``."""
    from ..files import predict_file

    start = time.perf_counter()
    path_, target_ = Path(path), Path(target)
    record = {"input": path, "output": target, "status": "failed", "k": None, "vector": None, "error": None}
    try:
        model, _ = worker_model(settings.checkpoint, settings.device)
        size = _raster_size(path_) if settings.block_size else None
        if size is not None and size[0] * size[1] > settings.block_size**2 and target_.suffix == ".tif":
            return {**record, **_plan_blocks(model, path_, settings, legend), "seconds": time.perf_counter() - start}
        result = predict_file(
            path_, target_, model, settings.k, tiling=settings.tiling, lane=settings.lane, legend=legend,
            k_range=settings.k_range, vector=settings.vector, min_area=settings.min_area, preview=settings.preview,
            progress=False, overviews=settings.overviews, alpha=settings.alpha, colours=settings.colours,
        )  # fmt: skip
        record.update(
            status="done", k=int(result["k"]), vector=None if result["vector"] is None else str(result["vector"])
        )
        record["features"] = result.get("features")
    except Exception as exc:  # recorded, never raised: one bad file must not stop the others
        record["error"] = describe_error(exc)
        if target_.exists():  # the labels were written, a later step (polygons, preview) failed
            record["error"] = f"labels written, then: {record['error']}"
    record["seconds"] = time.perf_counter() - start
    return record


def segment_batch_task(jobs: list[tuple[str, str]], settings: Settings, legend) -> list[dict]:
    """``segment_task`` on each (input, target) of ``jobs``, in order: one record per input."""
    return [segment_task(path, target, settings, legend) for path, target in jobs]


def _view(source):
    """The part of a source around its valid pixels (what ``segment_source`` segments), and
    that box (top, left, bottom, right)."""
    from ..engine import _Box

    box = getattr(source, "valid_box", None)
    if box is None or box == (0, 0, source.height, source.width):
        return source, (0, 0, source.height, source.width)
    return _Box(source, box), box


def _plan_blocks(model, path: Path, settings: Settings, legend) -> dict:
    """The row blocks of a large raster and the clusters they are assigned to: the legend's, or
    the raster's own, fitted here on its sampled windows as the single-process pass fits them."""
    from ...io.rasters import open_source
    from ..engine import fit_source_clusters
    from ..legend import label_table
    from ..predictor import Predictor

    if settings.k == "auto" and legend is None:
        raise ValueError("--k auto picks K per file on one worker; a raster split into blocks needs --k K")
    k = legend.k if legend is not None else settings.k
    predictor = Predictor(model, k, lane=settings.lane)
    tiling = settings.tiling.checked(predictor.stride)
    with open_source(path, alpha=settings.alpha) as source:
        view, box = _view(source)
        layout = tiling.layout(view.height, view.width, predictor.stride)
        if legend is not None:
            clusters = legend.head_clusters("cpu")
        else:
            clusters = fit_source_clusters(predictor, view, tiling=tiling)
    _, ys, lh, _, _ = layout
    rows_per_block = max(1, settings.block_size**2 // max(1, view.width))
    edges = block_edges(ys, lh, view.height, rows_per_block)
    blocks = list(zip(edges[:-1], edges[1:], strict=True))
    described = label_table(model, clusters, legend, settings.colours)  # every block's colour table and style
    clusters = (clusters.prototypes.cpu(), None if clusters.bias is None else clusters.bias.cpu())
    return {"status": "split", "k": int(k), "blocks": blocks, "box": box, "clusters": clusters, "table": described}


def block_path(target: Path, top: int) -> Path:
    """``<stem>.blocks/<stem>_r<row>.tif`` beside ``target``: the labels of one row block."""
    return target.with_name(target.stem + ".blocks") / f"{target.stem}_r{top:07d}.tif"


def block_task(path: str, target: str, rows: tuple[int, int], last: bool, settings: Settings, plan: dict) -> dict:
    """Segment rows ``rows`` (of the raster's valid box) of a split raster into their own label
    GeoTIFF, the cells as the pass over the whole raster computes them (``blended_cells(...,
    rows=)``); the first and last blocks also carry the nodata rows above and below the box."""
    import rasterio
    import torch

    from ...io.outputs import NODATA, label_geotiff, label_profile
    from ...io.rasters import open_source
    from ...models.head import Clusters
    from ..blend import blended_cells
    from ..predictor import Predictor

    start = time.perf_counter()
    top_row, bottom_row = rows
    path_, target_ = Path(path), Path(target)
    box_top, left, box_bottom, right = plan["box"]
    record = {"input": path, "rows": list(rows), "status": "failed", "error": None}
    try:
        model, _ = worker_model(settings.checkpoint, settings.device)
        protos, bias = plan["clusters"]
        predictor = Predictor(model, plan["k"], lane=settings.lane, clusters=Clusters(protos, bias))
        tiling = settings.tiling.checked(predictor.stride)
        with open_source(path_, alpha=settings.alpha) as source:
            view, _ = _view(source)
            layout = tiling.layout(view.height, view.width, predictor.stride)
            first_out = 0 if top_row == 0 else box_top + top_row  # rows of the full raster this block writes
            last_out = source.height if last else box_top + bottom_row
            profile = label_profile(source)
            transform = source.profile.get("transform")
            profile.update(height=last_out - first_out)
            if transform is not None and "gcps" not in profile:
                profile["transform"] = transform @ rasterio.Affine.translation(0, first_out)
            if profile["height"] < 256:
                profile.pop("tiled", None), profile.pop("blockxsize", None), profile.pop("blockysize", None)
            output = block_path(target_, first_out)
            output.parent.mkdir(parents=True, exist_ok=True)
            width = source.width
            with label_geotiff(output, profile, predictor.k, overviews=settings.overviews) as dst:
                dst.table = plan.get("table")

                def write(y: int, labels: np.ndarray) -> None:  # y in the full raster's rows
                    dst.write(y - first_out, labels)

                for y in range(first_out, box_top + top_row, 1024):  # nodata above the box
                    write(y, np.full((min(1024, box_top + top_row - y), width), NODATA, np.uint8))
                pending: dict[int, list] = {}
                cells = blended_cells(predictor, view, layout, want_probs=False, progress=False, rows=rows)
                with torch.no_grad(), closing(cells):  # a failed write stops the reader before the file closes
                    for y, x, labels, _ in cells:
                        h, w = labels.shape
                        row = pending.setdefault(y, [np.full((h, width), NODATA, np.uint8), 0])
                        row[0][:, left + x : left + x + w] = labels
                        row[1] += w
                        if row[1] == view.width:
                            write(box_top + y, pending.pop(y)[0])
                for y in range(box_top + bottom_row, last_out, 1024):  # nodata below the box
                    write(y, np.full((min(1024, last_out - y), width), NODATA, np.uint8))
        record.update(status="done", output=str(output), first_row=first_out)
    except Exception as exc:  # recorded, never raised
        record["error"] = describe_error(exc)
    record["seconds"] = time.perf_counter() - start
    return record
