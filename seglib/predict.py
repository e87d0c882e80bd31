"""Command line: segment one image or a folder of images into K segments.

    python -m seglib.predict --input ortho.tif --k 6 --output out/              # out/ortho.tif
    python -m seglib.predict --input tiles/ --k 4 --output out/ --preview       # every image
    python -m seglib.predict --input photo.jpg --k 5 --output out/ --checkpoint teacher.pt

Every file takes one route, ``seglib.raster.segment_raster``: GeoTIFF inputs give ``<stem>.tif``,
uint8 labels with the input's CRS, transform and size, read window by window so rasters of any
size fit in memory; PNG and JPEG inputs give ``<stem>.png``, a uint8 label image. Images up to
``--tile`` pixels go through the model in one piece, larger ones window by window. ``--preview``
adds ``<stem>_preview.png`` in the label colours of ``seglib.viz`` (decimated for large rasters).

A file that cannot be read is reported by name and skipped; the exit status is 1 if any file
failed, 2 for unusable arguments (K out of range, empty folder, bad checkpoint) before any work.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .config import K_MAX, K_MIN, LANES, check_k
from .io import GEOTIFF_SUFFIXES, IMAGE_SUFFIXES, ImageReadError, list_images, read_mask, write_png
from .raster import DEFAULT_OVERLAP, DEFAULT_TILE

__all__ = ["build_parser", "output_paths", "predict_file", "main"]

log = logging.getLogger("seglib.predict")

PREVIEW_MAX_SIDE = 2048  # previews of large rasters are decimated to at most this many pixels


def _k_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"K must be an integer in {K_MIN}..{K_MAX}, got {text!r}") from None
    try:
        return check_k(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seglib.predict",
        description="Unsupervised segmentation of RGB aerial imagery into K segments. "
        "GeoTIFF in -> uint8 label GeoTIFF (same CRS, transform and size); PNG/JPEG in -> uint8 label PNG.",
    )
    p.add_argument("--input", required=True, type=Path, help="an image (GeoTIFF, PNG, JPEG) or a folder of them")
    p.add_argument("--k", required=True, type=_k_arg, help=f"number of segments, an integer in {K_MIN}..{K_MAX}")
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
        "--smooth",
        dest="lane",
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
    p.add_argument("--preview", action="store_true", help="also write <stem>_preview.png in label colours")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or conversion notes")
    return p


def output_paths(inputs: list[Path], output: Path) -> dict[Path, Path]:
    """The label file of every input: ``<stem>.tif`` for GeoTIFFs, ``<stem>.png`` otherwise.
    Two inputs that would write the same file, or a target that is an input, raise ``ValueError``."""
    seen: dict[Path, Path] = {}  # target -> input
    sources = {p.resolve() for p in inputs}
    for path in inputs:
        target = output / (path.stem + (".tif" if path.suffix.lower() in GEOTIFF_SUFFIXES else ".png"))
        if target in seen:
            raise ValueError(f"{seen[target].name} and {path.name} would both write {target}; rename one of them")
        if target.resolve() in sources:
            raise ValueError(f"{target} would overwrite an input image; choose another --output folder")
        seen[target] = path
    return {path: target for target, path in seen.items()}


def _preview(labels_file: Path, path: Path) -> None:
    """Colour preview of a label file; a label GeoTIFF is read decimated so large rasters stay cheap."""
    from .viz import colourize

    if labels_file.suffix.lower() in GEOTIFF_SUFFIXES:
        import rasterio
        from rasterio.enums import Resampling

        with rasterio.open(labels_file) as src:
            scale = max(1.0, max(src.height, src.width) / PREVIEW_MAX_SIDE)
            shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
            labels = src.read(1, out_shape=shape, resampling=Resampling.nearest)
    else:
        labels = read_mask(labels_file)
    write_png(colourize(labels).astype(np.uint8), path)


def predict_file(
    path: Path,
    target: Path,
    model,
    k: int,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    lane: str | None = None,
    fit_windows: int = 16,
    seed: int = 0,
    preview: bool = False,
    progress: bool = True,
) -> Path:
    """Segment one file into ``target`` (and ``<stem>_preview.png`` beside it); returns target."""
    from .raster import segment_raster

    preview_path = target.with_name(target.stem + "_preview.png")
    segment_raster(
        path,
        target,
        k,
        model,
        tile=tile,
        overlap=overlap,
        lane=lane,
        fit_windows=fit_windows,
        seed=seed,
        progress=progress,
    )
    if preview:
        _preview(target, preview_path)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s")
    if args.fit_windows < 1:
        parser.error("--fit-windows must be at least 1")

    # Everything that can fail without touching an image fails here, before any work.
    try:
        if args.input.is_dir():
            inputs = list_images(args.input)
        elif args.input.is_file():
            if args.input.suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageReadError(
                    f"{args.input}: unsupported file type {args.input.suffix!r}; use PNG, JPEG or GeoTIFF"
                )
            inputs = [args.input]
        else:
            raise ImageReadError(f"input not found: {args.input}")
        targets = output_paths(inputs, args.output)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from .device import resolve_device, set_threads
    from .models import load_model
    from .raster import check_tiling, model_stride

    set_threads(args.threads)
    try:
        device = resolve_device(args.device)
        model = load_model(args.checkpoint).to(device)
        check_tiling(args.tile, args.overlap, model_stride(model))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    failed: list[Path] = []
    for path, target in targets.items():
        start = time.perf_counter()
        try:
            predict_file(
                path,
                target,
                model,
                args.k,
                tile=args.tile,
                overlap=args.overlap,
                lane=args.lane,
                fit_windows=args.fit_windows,
                seed=args.seed,
                preview=args.preview,
                progress=not args.quiet,
            )
        except (ValueError, OSError) as exc:  # ImageReadError is a ValueError
            failed.append(path)
            print(f"FAILED {path}: {exc}", file=sys.stderr)
            continue
        if not args.quiet:
            print(f"{path} -> {target} ({time.perf_counter() - start:.1f} s)")
    if failed:
        print(
            f"{len(failed)} of {len(targets)} file(s) failed: {', '.join(p.name for p in failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
