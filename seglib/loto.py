"""Leave-one-tile-out evaluation of several methods on a labelled folder, in one run.

    python -m seglib.loto --data ../shared/data/dubai_aerial_dev --threads 1 --out experiments/loto/loto.json
    python -m seglib.loto --data DIR --methods rgb_kmeans,student_dubai --folds t1,t2   # screening
    python -m seglib.loto --data DIR --select head=student_dubai,student_dubai_prior0    # nested choice
    python -m seglib.loto --list                                                         # the methods
    python -m seglib.loto --plugin my_methods.py --data DIR --methods rgb_kmeans,mine    # methods of your own
    python -m seglib.loto --data DIR --transfer --methods rgb_kmeans,teacher_random,teacher_synthetic    # elsewhere
    python -m experiments.ucmerced --data DIR --extra-images UCM --methods student_dubai,student_dubai_ucm

For each fold (a source tile of the folder, ``seglib.evaluation.loto.folds``) every method's model of
that fold is trained on the other tiles' images (no masks; cached under ``--runs``, a killed
run resumes) and scores the fold's images at K = classes present (labels in ``--ignore`` left
out, images with fewer than 2 classes skipped, Hungarian matching per image). The table shows
the image-weighted mean of every fold and of all folds; the JSON holds every image's scores,
paired differences with bootstrap intervals and the nested selections. Per-fold scores are
cached too, so a second run only computes what is new.

``--extra-images DIR`` adds the images of DIR (sub-folders too) to every fold's training images
of the methods that ask for them (``Method.extra_images``; a method's build may read DIR too,
e.g. a scene folder); they are never scored. ``--transfer`` refuses every method whose models
trained on the labelled folder, so every image is scored by models that never saw any of its
tiles; a model trained on it outside the protocol (``Method.saw_folder``: the bundled student)
is shown as a reference, listed under ``references`` in the JSON. docs/protocols.md has one
command per protocol and their results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .evaluation.loto import (
    DEFAULT_METHODS,
    METHODS,
    TILE_PATTERN,
    LotoError,
    format_table,
    get_method,
    load_plugin,
    run_protocol,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seglib.loto",
        description="Leave-one-tile-out: train every method on all tiles but one (images only), score the "
        "held-out tile's images against their masks, for every tile; baselines in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None, help="folder with images/ and masks/ (sets both)")
    p.add_argument("--images", default=None, help="folder of the images")
    p.add_argument("--masks", default=None, help="folder of their label PNGs (same stems)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods (see --list)")
    p.add_argument("--folds", default="", help="comma-separated tiles to hold out (default: every tile)")
    p.add_argument("--runs", default="runs/loto", help="root of the cached fold models and scores")
    p.add_argument("--k", default="present", help="'present' (K = classes present per image) or an integer")
    p.add_argument("--ignore", default="5,255", help="label ids left out of the scores")
    p.add_argument("--seed", type=int, default=123, help="seed of RGB k-means")
    p.add_argument("--tile-pattern", default=TILE_PATTERN, help="regex whose first group is an image stem's tile id")
    p.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="LABEL=M1,M2,...",
        help="nested choice among these methods: fold f gets the one best on the other folds (repeatable)",
    )
    p.add_argument("--compare", action="append", default=[], metavar="A:B", help="paired difference A - B (repeatable)")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing fold model")
    p.add_argument(
        "--extra-images",
        default=None,
        metavar="DIR",
        help="images (sub-folders too) added to every fold's training images, never scored (e.g. UC Merced)",
    )
    p.add_argument("--no-boundary", action="store_true", help="leave out the boundary F1 (the slowest score)")
    p.add_argument(
        "--transfer",
        action="store_true",
        help="transfer run: refuse any method whose models trained on the labelled folder; every image is unseen",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (training and evaluation)")
    p.add_argument("--out", default="runs/loto/loto.json", help="JSON result")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first (a dotted name, or a .py file): it registers methods of its own with "
        "seglib.evaluation.loto.register (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="print the registered methods and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for plugin in args.plugin:
            load_plugin(plugin)
    except LotoError as exc:
        parser.error(str(exc))
    if args.list:
        for name, m in METHODS.items():
            print(f"{name:<28} {m.kind:<8} {m.about}")
        return 0
    images = args.images or (f"{args.data}/images" if args.data else None)
    masks = args.masks or (f"{args.data}/masks" if args.data else None)
    if not images or not masks:
        parser.error("give --data DIR (with images/ and masks/) or --images DIR --masks DIR")
    for what, path in (("images", images), ("masks", masks)):
        if not Path(path).is_dir():
            parser.error(f"--{what} folder not found: {path}")
    try:
        k = "present" if args.k == "present" else int(args.k)
        ignore = [int(v) for v in args.ignore.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--k is 'present' or an integer, --ignore integers like 5,255; got {args.k!r}, {args.ignore!r}")
    select = {}
    for item in args.select:
        label, _, names = item.partition("=")
        if not label or not names:
            parser.error(f"--select expects LABEL=M1,M2,..., got {item!r}")
        select[label] = [n for n in names.split(",") if n]
    compare = []
    for item in args.compare:
        a, _, b = item.partition(":")
        if not a or not b:
            parser.error(f"--compare expects A:B, got {item!r}")
        compare.append((a, b))
    methods = [m for m in args.methods.split(",") if m]
    try:
        for name in methods + [n for names in select.values() for n in names]:
            get_method(name)
        result = run_protocol(
            images=images,
            masks=masks,
            methods=methods,
            folds=[f for f in args.folds.split(",") if f] or None,
            runs=args.runs,
            k=k,
            ignore=ignore,
            seed=args.seed,
            tile_pattern=args.tile_pattern,
            threads=args.threads,
            device=args.device,
            train=not args.no_train,
            select=select,
            compare=compare,
            extra_images=args.extra_images,
            transfer=args.transfer,
            boundary=not args.no_boundary,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except LotoError as exc:
        parser.exit(2, f"python -m seglib.loto: error: {exc}\n")
    result["command"] = "python -m seglib.loto " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
