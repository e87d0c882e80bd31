"""``python -m seglib.predict ... --workers N | --scheduler ADDRESS``: the arguments turned into an
archive run (``segment_archive``) on a dask client, its outcome printed in a few lines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .jobs import Settings

__all__ = ["settings_from_args", "run_on_dask"]


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        k=args.k, checkpoint=None if args.checkpoint is None else str(args.checkpoint.resolve()), device=args.device,
        tile=args.tile, overlap=args.overlap, lane=args.lane, fit_windows=args.fit_windows, seed=args.seed,
        k_range=tuple(args.k_range), vector=args.vector, min_area=args.min_area, preview=args.preview,
        overviews=args.overviews, block_size=args.block_size, alpha=args.alpha, colours=args.colours,
    )  # fmt: skip


def run_on_dask(args: argparse.Namespace, inputs: list[Path]) -> int:
    """Exit status: 0 when every input is done (or was, in an earlier run), 1 when any failed
    (each named on stderr, in one line), 2 for unusable arguments."""
    from .cluster import dashboard_note, dask_client
    from .run import segment_archive
    from .tasks import worker_model

    settings = settings_from_args(args)
    try:  # local workers start with the model the client loads (forked: ``dask_client``)
        preload = lambda: worker_model(settings.checkpoint, "cpu")  # noqa: E731  (what segment_archive loads)
        with dask_client(workers=args.workers, scheduler=args.scheduler, preload=preload) as client:
            print(dashboard_note(client), flush=True)
            report = segment_archive(
                client, [p.resolve() for p in inputs], args.output.resolve(), settings,
                legend=args.legend, shared=args.shared_legend, save_legend=args.save_legend,
                mosaic=args.mosaic, summary=args.summary, progress=not args.quiet,
                echo=(lambda line: None) if args.quiet else print,
            )  # fmt: skip
    except (ValueError, OSError) as exc:  # a legend file for another model, dask missing, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in report["files"] if r["status"] == "failed"]
    for record in failed:
        print(f"FAILED {record['input']}: {record['error']}", file=sys.stderr)
    if report.get("mosaic_error"):
        print(f"error: --mosaic: {report['mosaic_error']}", file=sys.stderr)
    counts = report["counts"]
    line = (
        f"{counts['done']} done, {counts['skipped']} complete from an earlier run, {counts['failed']} failed "
        f"of {report['inputs']} input(s) in {report['seconds']:.1f} s; summary -> {report['summary']}"
    )
    if report.get("mosaic"):
        line += f"; mosaic -> {report['mosaic']}"
    print(line, file=sys.stderr if failed else sys.stdout)
    return 1 if failed or report.get("mosaic_error") else 0
