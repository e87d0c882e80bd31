"""Command line: segment one image or a folder of images into K segments.

    python -m seglib.predict --input ortho.tif --k 6 --output out/              # out/ortho.tif
    python -m seglib.predict --input tiles/ --k 4 --output out/ --preview       # every image
    python -m seglib.predict --input photo.jpg --k 5 --output out/ --checkpoint teacher.pt
    python -m seglib.predict --input tiles/ --k 6 --output out/ --shared-legend --save-legend legend.json
    python -m seglib.predict --input new/ --legend legend.json --output out2/  # the same legend later
    python -m seglib.predict --input ortho.tif --k auto --output out/ --vector gpkg --min-area 50
    python -m seglib.predict --input 'tiles/*.tif' --k 6 --output out/ --shared-clusters --workers 2 --mosaic m.vrt

Every file takes one route, ``seglib.inference.engine.segment_raster``: GeoTIFF inputs give ``<stem>.tif``,
uint8 labels with the input's CRS, transform and size, read window by window so rasters of any
size fit in memory; PNG and JPEG inputs give ``<stem>.png``, a paletted uint8 label image. Beside
each, its legend: ``<name>.aux.xml`` (a colour table of the K labels, each in its cluster's mean
RGB, or ``--colours categorical``; an attribute table) and ``<stem>.qml`` (QGIS: K named classes).
Images up to ``--tile`` pixels go through the model in one piece, larger ones window by window.
``--preview`` adds ``<stem>_preview.png`` in the same colours (decimated for large rasters).
Label ids follow the brightness of each cluster's colour, darkest first.

``--shared-legend`` fits one set of clusters on windows sampled from every input before any
file is written, so a label means the same land cover in every output; ``--legend FILE`` reuses
a set saved with ``--save-legend FILE`` (refused for another model or K). ``--k auto`` picks K
in ``--k-range`` without labels (per file, or once for the set with ``--shared-legend``) and
prints it. ``--vector gpkg`` also writes ``<stem>.gpkg``: one polygon per segment, with its label
and area, traced from the finished label raster after an optional ``--min-area`` sieve.

``--workers N`` / ``--scheduler ADDRESS`` run the same work on dask (``seglib.inference.archive``:
the same outputs, a run summary, resume after a kill, large rasters split into blocks); VRT
inputs and ``--mosaic``/``--overviews`` work either way.

A file that cannot be read is reported by name and skipped; the exit status is 1 if any file
failed, 2 for unusable arguments (K out of range, empty folder, bad checkpoint) before any work.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .config import K_MAX, K_MIN, LANES, check_k
from .inference.files import check_output_folder, output_paths, predict_file
from .inference.kselect import DEFAULT_RANGE, check_k_range
from .inference.legend import Legend
from .inference.vector import VECTOR_FORMATS, check_vector_format, parse_min_area
from .inference.windows import DEFAULT_OVERLAP, DEFAULT_TILE, FIT_PIXELS, Tiling
from .io.images import list_inputs
from .io.outputs import remove_stale_temporaries
from .io.rasters import ALPHA_CHOICES
from .io.sidecars import COLOUR_MODES

__all__ = ["build_parser", "output_paths", "predict_file", "main"]

log = logging.getLogger("seglib.predict")


def _k_arg(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"K must be an integer in {K_MIN}..{K_MAX}, got {text!r} (or auto)") from None
    try:
        return check_k(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _arg(check):
    """An argparse type from a checker that raises ValueError with the message to show."""

    def parse(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments: one ``add_argument`` per flag, in the order ``--help`` lists
    them (longer than 80 lines because it is that list)."""
    p = argparse.ArgumentParser(
        prog="python -m seglib.predict",
        description="Unsupervised segmentation of RGB aerial imagery into K segments. "
        "GeoTIFF in -> uint8 label GeoTIFF (same CRS, transform and size); PNG/JPEG in -> uint8 label PNG.",
    )
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        help="an image (GeoTIFF, PNG, JPEG) or raster GDAL reads (VRT), a folder of images, or a quoted glob "
        "pattern ('tiles/*.tif')",
    )
    p.add_argument(
        "--k",
        type=_k_arg,
        default=None,
        help=f"number of segments, an integer in {K_MIN}..{K_MAX}, or auto (picked in --k-range without labels); "
        "may be left out with --legend",
    )
    p.add_argument("--output", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="teacher.pt or student.pt to use (default: the model bundled with seglib)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=DEFAULT_TILE,
        help=f"window size in pixels for large images (default {DEFAULT_TILE}); memory grows with it",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        help=f"minimum overlap of neighbouring windows, blended smoothly (default {DEFAULT_OVERLAP}, at most tile/2)",
    )
    p.add_argument(
        "--lane",
        choices=LANES,
        default=None,
        help="boundary refinement: fast (edge-aware guided filter), learned, or none (default: the model's)",
    )
    p.add_argument(
        "--fit-windows",
        type=int,
        default=16,
        help="windows sampled to fit the clusters shared by all windows of a large image (default 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that window sample (default 0)")
    p.add_argument(
        "--k-range",
        type=_arg(check_k_range),
        default=DEFAULT_RANGE,
        help=f"range searched by --k auto, e.g. 3..10 (default {DEFAULT_RANGE[0]}..{DEFAULT_RANGE[1]})",
    )
    p.add_argument(
        "--shared-legend",
        action="store_true",
        help="fit one set of clusters on windows sampled from every input, so a label means the same in every output",
    )
    p.add_argument("--legend", type=Path, default=None, help="use the clusters saved in FILE (--save-legend)")
    p.add_argument(
        "--save-legend",
        type=Path,
        default=None,
        help="write the clusters used to FILE (JSON): with --shared-legend, or for a single input",
    )
    p.add_argument(
        "--vector",
        type=_arg(check_vector_format),
        default=None,
        help=f"also write the segments as polygons: {', '.join(VECTOR_FORMATS)} (<stem>.gpkg, ...)",
    )
    p.add_argument(
        "--min-area",
        type=_arg(parse_min_area),
        default=None,
        help="with --vector: merge segments smaller than this into a neighbour first; square map units of the "
        "input's CRS (e.g. 50 = 50 m2 in UTM) or pixels (e.g. 12px)",
    )
    p.add_argument(
        "--adapt",
        type=int,
        default=0,
        metavar="N",
        help="first train the model N unsupervised steps on windows of each input (seglib.inference.adapt; "
        "default 0: off)",
    )
    p.add_argument(
        "--adapt-seconds",
        type=float,
        default=None,
        metavar="S",
        help="stop the adaptation of each input after S seconds even if fewer than N steps ran",
    )
    p.add_argument(
        "--alpha",
        choices=ALPHA_CHOICES,
        default="auto",
        help="is the 4th band of a 4-band raster (2nd of 2) transparency, a mask? auto (default): when it is tagged "
        "alpha and holds only 0 and its maximum (a NIR band that GDAL tagged alpha is ignored); yes; no",
    )
    p.add_argument(
        "--colours",
        choices=COLOUR_MODES,
        default="mean",
        help="the labels' colours (colour table, QGIS style, preview): mean (default), each label in its cluster's "
        "mean RGB, so water looks like water; categorical, distinct colours",
    )
    p.add_argument("--preview", action="store_true", help="also write <stem>_preview.png in label colours")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or conversion notes")
    p.add_argument("--overviews", action="store_true", help="build internal overviews in label GeoTIFFs")
    p.add_argument(
        "--mosaic", type=Path, default=None, help="also write a VRT (FILE.vrt) over all label GeoTIFFs of the run"
    )
    scale = p.add_argument_group("many rasters and large mosaics (dask.distributed; pip install 'seglib[dask]')")
    where = scale.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=0, help="run on a local dask cluster of N worker processes")
    where.add_argument("--scheduler", default=None, help="run on a running dask cluster, e.g. tcp://host:8786")
    scale.add_argument("--summary", type=Path, default=None, help="run summary JSON (default: OUTPUT/seglib-run.json)")
    scale.add_argument(
        "--block-size",
        type=int,
        default=8192,
        help="split rasters of more than N x N pixels into row blocks of about that many, segmented on "
        "different workers (default 8192; 0: never)",
    )
    return p


def _clean_folder(folder: Path) -> None:
    """Remove what runs killed on this machine left in ``folder`` (their temporary files), and say so."""
    removed, others = remove_stale_temporaries(folder)
    if removed:
        log.info("%s: removed %d temporary file(s) left by killed runs: %s", folder, len(removed),
                 ", ".join(p.name for p in removed))  # fmt: skip
    if others:
        log.info("%s: %d temporary file(s) of runs still going or of other machines left alone: %s", folder,
                 len(others), ", ".join(p.name for p in others))  # fmt: skip


def _check_options(args: argparse.Namespace, n_inputs: int) -> None:
    """ValueError for option combinations that cannot work, before any work."""
    if args.k is None and args.legend is None:
        raise ValueError("give --k K (2..16 or auto), or --legend FILE")
    if args.legend is not None and args.k == "auto":
        raise ValueError("--k auto picks K for a new fit; with --legend the file's K is used (drop --k)")
    if args.legend is not None and args.shared_legend:
        raise ValueError("--legend already gives every file the same clusters; drop --shared-legend")
    if args.adapt and (args.legend is not None or args.shared_legend):
        raise ValueError(
            "--adapt changes each file's features, so clusters shared between files no longer fit; drop one"
        )
    if args.save_legend is not None and n_inputs > 1 and not args.shared_legend:
        raise ValueError(
            "--save-legend with several inputs needs --shared-legend (otherwise every file has its own clusters)"
        )
    if args.save_legend is not None and args.save_legend.suffix.lower() != ".json":
        raise ValueError(f"--save-legend writes JSON: name the file *.json, got {args.save_legend}")
    if args.min_area is not None and args.vector is None:
        raise ValueError("--min-area sieves the polygons of --vector; add --vector gpkg")
    if args.workers < 0 or args.block_size < 0:
        raise ValueError("--workers and --block-size must be 0 or more")
    if args.summary is not None and not (args.workers or args.scheduler):
        raise ValueError("--summary is written by runs on dask (--workers N or --scheduler ADDRESS)")
    if args.mosaic is not None and args.mosaic.suffix.lower() != ".vrt":
        raise ValueError(f"--mosaic writes a GDAL VRT: name the file *.vrt, got {args.mosaic}")
    if (args.workers or args.scheduler) and args.adapt:
        raise ValueError("--adapt is not supported on dask workers yet; run without --workers")
    if (args.workers or args.scheduler) and args.k == "auto" and args.shared_legend:
        raise ValueError("--k auto with --shared-legend is not supported on dask workers yet; give --k K")


def _fit(args: argparse.Namespace, model, paths: list[Path], *, skip_unreadable: bool = False) -> Legend:
    """Clusters fitted once on windows sampled from ``paths`` (K or auto, as the arguments say)."""
    from .inference.kselect import fit_sources_auto
    from .inference.legend import fit_sources
    from .io.rasters import SourceFile

    paths = [SourceFile(Path(p), alpha=args.alpha) for p in paths]  # opened one at a time, with --alpha
    if args.k == "auto":
        return fit_sources_auto(
            model, paths, tiling=_tiling(args), k_range=args.k_range, skip_unreadable=skip_unreadable
        )
    return fit_sources(model, paths, args.k, tiling=_tiling(args), skip_unreadable=skip_unreadable)


def _tiling(args: argparse.Namespace) -> Tiling:
    return Tiling(args.tile, args.overlap, args.fit_windows, FIT_PIXELS, args.seed)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop), raised in the main thread like Ctrl-C so the
    same clean-up runs on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:  # the temporary files are already removed on the way out
        what, status = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"{what}: stopped, no partial output left", file=sys.stderr)
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _shared_legend(args: argparse.Namespace, model, targets: dict[Path, Path], failed: list[Path]) -> Legend:
    """``--shared-legend``: one legend fitted on every input (an unreadable one is printed and
    added to ``failed``), reported in one line."""
    start = time.perf_counter()
    legend = _fit(args, model, list(targets), skip_unreadable=True)
    for name, reason in legend.meta["skipped"]:  # unreadable files: reported, not written
        failed.append(Path(name))
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    if not args.quiet or args.k == "auto":
        how = f"K={legend.k}" + (f" (auto, {legend.meta['k_auto']['rule']})" if args.k == "auto" else "")
        print(
            f"shared legend: {how}, fitted on {legend.meta['windows']} windows of "
            f"{len(legend.meta['files'])} file(s) ({time.perf_counter() - start:.1f} s)"
        )
    return legend


def _predict_all(args: argparse.Namespace, model, legend, targets: dict[Path, Path], failed: list[Path]):
    """Every input not in ``failed`` to its target (a failure is printed and added to
    ``failed``); returns the legend to save (``--save-legend``), if any."""
    saved = legend
    for path, target in targets.items():
        if path in failed:
            continue
        start = time.perf_counter()
        try:
            if args.save_legend is not None and legend is None:  # one input: fit it here to save it
                saved = _fit(args, model, [path])
            result = predict_file(
                path,
                target,
                model,
                args.k,
                tiling=_tiling(args),
                lane=args.lane,
                legend=legend if legend is not None else saved,
                k_range=args.k_range,
                vector=args.vector,
                min_area=args.min_area,
                preview=args.preview,
                progress=not args.quiet,
                adapt_steps=args.adapt,
                adapt_seconds=args.adapt_seconds,
                overviews=args.overviews,
                alpha=args.alpha,
                colours=args.colours,
            )
        except (ValueError, OSError) as exc:  # ImageReadError is a ValueError
            failed.append(path)
            print(f"FAILED {path}: {exc}", file=sys.stderr)
            continue
        auto = args.k == "auto" and not args.shared_legend
        if not args.quiet or auto:
            extra = f", {result['features']} polygons -> {result['vector']}" if result["vector"] else ""
            print(
                f"{path} -> {target} (K={result['k']}{' auto' if auto else ''}{extra}; "
                f"{time.perf_counter() - start:.1f} s)"
            )
    return saved


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s")
    if args.fit_windows < 1:
        parser.error("--fit-windows must be at least 1")
    if args.adapt < 0:
        parser.error(f"--adapt must be 0 or more steps, got {args.adapt}")
    if args.adapt_seconds is not None and not args.adapt_seconds > 0:
        parser.error(f"--adapt-seconds must be positive, got {args.adapt_seconds}")

    # Everything that can fail without touching an image fails here, before any work.
    try:
        inputs = list_inputs(args.input)
        check_output_folder(args.output)
        targets = output_paths(inputs, args.output, preview=args.preview, vector=args.vector)
        _check_options(args, len(targets))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for folder in {args.output, *([args.save_legend.parent] if args.save_legend else [])}:
        _clean_folder(folder)
    if args.workers or args.scheduler:  # the same run on dask workers (seglib.inference.archive)
        from .inference.archive.command import run_on_dask

        return run_on_dask(args, inputs)

    from .device import resolve_device, set_threads
    from .inference.legend import load_legend
    from .inference.predictor import model_stride
    from .models import load_model

    set_threads(args.threads)
    try:
        device = resolve_device(args.device)
        model = load_model(args.checkpoint).to(device)
        _tiling(args).checked(model_stride(model))
        legend = None if args.legend is None else load_legend(args.legend, model=model, k=args.k)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    failed: list[Path] = []
    if args.shared_legend:
        try:
            legend = _shared_legend(args, model, targets, failed)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    saved = _predict_all(args, model, legend, targets, failed)
    if args.save_legend is not None and saved is not None:
        try:
            saved.save(args.save_legend)
        except OSError as exc:
            failed.append(args.save_legend)
            print(f"FAILED {args.save_legend}: {exc}", file=sys.stderr)
        else:
            if not args.quiet:
                print(f"legend (K={saved.k}) -> {args.save_legend}")
    if args.mosaic is not None:
        from .io.vrt import write_vrt

        written = [t for p, t in targets.items() if p not in failed and t.suffix == ".tif"]
        try:
            write_vrt(args.mosaic, written)
            if not args.quiet:
                print(f"mosaic of {len(written)} label GeoTIFF(s) -> {args.mosaic}")
        except (ValueError, OSError) as exc:
            print(f"error: --mosaic: {exc}", file=sys.stderr)
            return 1
    if failed:
        print(
            f"{len(failed)} of {len(targets)} file(s) failed: {', '.join(p.name for p in failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
