"""Speed and memory benchmark of a named configuration; prints one JSON object.

    python -m seglib.bench --device cpu --batch 2 --size 256 --k 16 --cluster-iters 6 --amp 0
    python -m seglib.bench --device cuda --batch 8 --size 512 --k 16 --amp 1 --json
    python -m seglib.bench --raster        # a 37.7 Mpx GeoTIFF: seglib vs the predecessor (raster_bench)

What each number is: ``seglib.evaluation.benchmarks`` (training step, inference latencies,
memory, ``--profile``) and ``seglib.evaluation.raster_bench`` (``--raster``). ``--json`` prints
only the JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .config import LANES, Config, ConfigError, apply_overrides, load_config_file
from .device import COMPILE_MODES, set_threads
from .evaluation.benchmarks import benchmark

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seglib.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=2, help="images per training step (each gives two views)")
    p.add_argument("--size", type=int, default=256, help="training tile side")
    p.add_argument("--k", type=int, default=16, help="clusters in the training step")
    p.add_argument("--cluster-iters", type=int, default=6, help="soft k-means iterations in the training step")
    p.add_argument("--amp", type=int, choices=[0, 1], default=0, help="1: bf16 autocast")
    p.add_argument(
        "--lane",
        choices=LANES,
        default="fast",
        help="refinement lane of the training step (fast and none have no full-resolution loss)",
    )
    p.add_argument(
        "--versus-lane",
        choices=LANES,
        default=None,
        help="also time the step with this lane, in turns with --lane (train_step_s_versus, lane_step_ratio)",
    )
    p.add_argument("--infer-size", type=int, default=512, help="tile side for the inference latencies")
    p.add_argument("--infer-k", type=int, default=8, help="K for the inference latencies")
    p.add_argument(
        "--student-size",
        default="tiny",
        help="student registry name for the student latency (a fresh student with the shipped "
        "inference settings, seglib.recipes.FAST_STUDENT, at this size)",
    )
    p.add_argument(
        "--student-checkpoint",
        default=None,
        help="time this student.pt ('bundled': the default model) instead of a fresh --student-size student",
    )
    p.add_argument(
        "--teacher-checkpoint",
        default=None,
        help="time this teacher.pt instead of a fresh teacher of --config (same cost, for the record)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--config", default=None, help="Python config file (get_config/CONFIG) for the model")
    p.add_argument("--skip-train", action="store_true", help="only the inference latencies")
    p.add_argument("--skip-infer", action="store_true", help="only the training step")
    p.add_argument("--profile", action="store_true", help="profile training steps: host ms, device ms, op counts")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (after the timed ones)")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="",
        choices=[m for m in COMPILE_MODES if m],
        help="torch.compile the training forward (mode; default: 'default'); eager if it fails",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    _add_raster_arguments(p)
    return p


def _add_raster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("raster benchmark (seglib.evaluation.raster_bench)")
    g.add_argument("--raster", action="store_true", help="time a large GeoTIFF, seglib beside the predecessor")
    g.add_argument("--raster-size", type=int, default=6144, help="side of the square test raster (default 6144)")
    g.add_argument("--raster-k", type=int, default=6, help="K for the raster benchmark (default 6)")
    g.add_argument("--raster-repeats", type=int, default=3, help="runs of each pipeline, in turns (default 3)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.raster:
        from .evaluation.raster_bench import raster_benchmark

        if args.raster_size < 64 or args.raster_repeats < 1 or not 2 <= args.raster_k <= 16:
            parser.error("--raster-size must be at least 64, --raster-repeats at least 1, --raster-k in 2..16")

        result = raster_benchmark(
            size=args.raster_size, k=args.raster_k, repeats=args.raster_repeats, threads=torch.get_num_threads()
        )
        print(json.dumps(result, indent=None if args.json else 2))
        if not args.json:
            from .evaluation.raster_bench import summary_lines

            print("\n".join(summary_lines(result)), file=sys.stderr)
        return 0
    cfg = Config()
    try:
        if args.config:
            apply_overrides(cfg, load_config_file(args.config))
        cfg.validate()
    except ConfigError as exc:
        parser.error(str(exc))
    result = benchmark(cfg, args)
    if not args.json:
        print(
            f"seglib benchmark on {result['device']}, {result['threads']} threads, torch {result['torch']}",
            file=sys.stderr,
        )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
