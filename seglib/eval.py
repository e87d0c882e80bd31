"""Evaluate a model against ground truth beside RGB k-means, computed in the same run.

    python -m seglib.eval --synthetic --no-model                      # baselines on the test set
    python -m seglib.eval --synthetic --checkpoint runs/demo/teacher.pt
    python -m seglib.eval --synthetic --checkpoint ckpt.pt --k-sweep
    python -m seglib.eval --images DIR --masks DIR --k present --ignore 5,255 --checkpoint student.pt
    python -m seglib.eval --images DIR --masks DIR --k 6 --ignore 5,255 --shared-legend   # one legend
    python -m seglib.eval --images DIR --masks DIR --ignore 5,255 --checkpoint mine.pt --compare bundled

Prints one JSON summary (aggregated numbers per method; ``--per-image`` adds the rows) and
writes it to ``--out`` (default ``runs/eval/<source>.json``: ``synthetic_seed<seed>``, or the
name of the folder that holds ``--images``), then exits.
Without ``--checkpoint`` the bundled default model is evaluated when the package ships one;
``--no-model`` evaluates the baselines alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import LANES, check_k
from .device import resolve_device, set_threads
from .inference.predictor import InferenceSettings

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seglib.eval",
        description="Hungarian-matched mIoU (and many-to-one) of a model beside RGB k-means and random-init features.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("data (pick one)")
    src.add_argument("--synthetic", action="store_true", help="the seeded synthetic test set")
    src.add_argument("--images", default=None, help="folder of RGB images (ground truth in --masks)")
    src.add_argument(
        "--masks",
        default=None,
        help="folder of label masks (PNG, same stem as each image); without it, label-free proxies at --k",
    )
    p.add_argument("--seed", type=int, default=123, help="seed of the synthetic test set (and of k-means)")
    p.add_argument("--n-images", type=int, default=32, help="synthetic test tiles")
    p.add_argument("--size", type=int, default=512, help="synthetic tile side (multiple of 4)")
    p.add_argument("--checkpoint", default=None, help="teacher.pt, student.pt or a training ckpt_*.pt")
    p.add_argument("--no-model", action="store_true", help="evaluate the baselines only")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="CHECKPOINT",
        help="another model scored on the same images in the same run, with its own head settings: a "
        "checkpoint path or 'bundled' (the default model); repeatable",
    )
    p.add_argument("--k", default="present", help="'present' (K = classes present per image) or an integer 2..16")
    p.add_argument("--k-sweep", action="store_true", help="also report both matchings for K = 2..16")
    p.add_argument(
        "--shared-legend",
        action="store_true",
        help="score one set of clusters fitted on all images (dataset-level Hungarian mIoU) beside per-image "
        "fitting, for the model, random-init features and RGB k-means; needs an integer --k",
    )
    p.add_argument("--ignore", default="", help="comma-separated label ids to ignore, e.g. 5,255")
    p.add_argument(
        "--lane",
        choices=LANES,
        default=None,
        help="refinement lane (default: the model's)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="soft k-means iterations of the head (default: the model's; the bundled model uses 1)",
    )
    p.add_argument(
        "--size-prior",
        type=float,
        default=None,
        help="weight of log(cluster share) in the head's final assignment (default: the model's; "
        "the bundled model uses 3, 0 turns it off)",
    )
    p.add_argument("--no-random-init", action="store_true", help="skip the random-init baseline")
    p.add_argument("--proxies", action="store_true", help="also compute label-free proxy metrics for the model")
    p.add_argument("--per-image", action="store_true", help="include per-image rows in the printed JSON")
    p.add_argument(
        "--max-side",
        type=int,
        default=0,
        help="downscale real images so the longer side is at most this (0: full size)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", default=None, help="JSON output file")
    return p


def _parse_k(text: str) -> int | str:
    return "present" if text == "present" else check_k(int(text))


def _checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int | str, list[int]]:
    """(K, ignored labels) of the arguments; a usage error for a combination that cannot work."""
    if bool(args.synthetic) == bool(args.images):
        parser.error("choose the data: --synthetic, or --images DIR --masks DIR")
    if args.images and not args.masks and args.k == "present":
        parser.error("--images without --masks has no classes to count: give --masks DIR or an integer --k")
    if args.iters is not None and args.iters < 0:
        parser.error(f"--iters must be 0 or more, got {args.iters}")
    if args.size_prior is not None and not args.size_prior >= 0:
        parser.error(f"--size-prior must be 0 or more, got {args.size_prior}")
    if bad := [spec for spec in args.compare if spec in ("model", "rgb_kmeans", "random_init")]:
        parser.error(f"--compare {bad[0]}: a reserved name; pass a checkpoint path or 'bundled'")
    if args.k_sweep and args.images and not args.masks:
        parser.error("--k-sweep scores against ground truth: give --masks DIR")
    if len(set(args.compare)) < len(args.compare):
        parser.error("--compare: the same model named twice")
    try:
        k = _parse_k(args.k)
    except ValueError as exc:
        parser.error(f"--k: {exc}")
    ignore = [int(v) for v in args.ignore.split(",") if v.strip()]
    if args.shared_legend and not isinstance(k, int):
        parser.error("--shared-legend needs an integer --k (one K for every image), e.g. --k 6")
    return k, ignore


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    k, ignore = _checked(parser, args)
    settings = InferenceSettings(lane=args.lane, iters=args.iters, size_prior=args.size_prior)
    set_threads(args.threads)

    from .evaluation.scores import evaluate_tiles, folder_tiles, k_sweep, synthetic_tiles
    from .models import load_model, random_init_like

    # Everything that can fail on a path or a checkpoint fails here, in one line.
    try:
        device = resolve_device(args.device)
        model = None if args.no_model else load_model(args.checkpoint).to(device)
        compare = {spec: load_model(None if spec == "bundled" else spec).to(device) for spec in args.compare}
        if args.synthetic:
            names, tiles = synthetic_tiles(args.n_images, args.size, args.seed)
            source = f"synthetic_seed{args.seed}"
        else:  # without --masks every method gets the label-free proxies instead of mIoU
            names, tiles = folder_tiles(args.images, args.masks or "", max_side=args.max_side)
            source = Path(args.images).resolve().parent.name or "images"
    except (ValueError, FileNotFoundError) as exc:  # ImageReadError and CheckpointError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    random_init = None if args.no_random_init or model is None else random_init_like(model).to(device)

    tic = time.perf_counter()
    if args.shared_legend:
        return _shared_study(args, model, random_init, names, tiles, ignore, source, device)
    result = evaluate_tiles(
        model,
        tiles,
        k=k,
        ignore=ignore,
        random_init=random_init,
        compare=compare,
        proxies=args.proxies,
        seed=args.seed,
        names=names,
        settings=settings,
    )
    summary = {
        "source": source,
        "checkpoint": args.checkpoint or ("bundled default" if model is not None else None),
        "k": args.k,
        "ignore": ignore,
        "head_iters": args.iters if args.iters is not None or model is None else model.head.iters,
        "size_prior": args.size_prior if args.size_prior is not None or model is None else model.head.size_prior,
        "n_images": len(result["per_image"]),
        "skipped": result["skipped"],
        "seconds": round(time.perf_counter() - tic, 1),
        "device": str(device),
        "torch": torch.__version__,
    }
    for method in ("model", "random_init", "rgb_kmeans", *compare):
        if method in result:
            summary[method] = {key: round(v, 4) for key, v in result[method].items()}
    if "model" in result and "miou" in result["model"]:
        for other in ("rgb_kmeans", "random_init", *compare):
            if other in result:
                summary[f"model_minus_{other}"] = round(result["model"]["miou"] - result[other]["miou"], 4)
    if args.k_sweep:
        summary["k_sweep"] = [
            {key: round(v, 4) for key, v in row.items()}
            for row in k_sweep(model, tiles, ignore=ignore, seed=args.seed, settings=settings)
        ]
    full = dict(summary, per_image=result["per_image"])
    out = Path(args.out or f"runs/eval/{source}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=2))
    print(json.dumps(full if args.per_image else summary, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _shared_study(args, model, random_init, names, tiles, ignore, source, device) -> int:
    """--shared-legend: print the summary, write everything to --out."""
    from .evaluation.scores import evaluate_shared

    tic = time.perf_counter()
    head = {"checkpoint": args.checkpoint or "bundled default", "device": str(device), "torch": torch.__version__}
    full = evaluate_shared(
        model, tiles, _parse_k(args.k), ignore=ignore, random_init=random_init, seed=args.seed, names=names
    )
    summary = {key: v for key, v in full.items() if key != "images"}
    out = Path(args.out or f"runs/eval/{source}_shared_k{args.k}.json")
    full = dict(head, **full, seconds=round(time.perf_counter() - tic, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1, default=float))
    print(json.dumps(dict(head, **summary), indent=1, default=float))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
