"""Representation probe on a scene folder (UC Merced): scene-class accuracy of pooled features.

    python -m seglib.probe --data ../shared/data/ucmerced_landuse \
        --model scene=runs/scene/scene.pt --model bundled=bundled --out runs/probe.json

Only fold ``--fold`` (default 0) of the scene folder is read (``seglib.data.scenes``: folds
are class-stratified and fixed by the file names): scene-class pretraining leaves it out
(``python -m seglib.pretrain --holdout 0``, the default), so a model trained on the scene labels
is scored on scenes it never saw. The fold's scenes (420 of UC Merced's 2,100: 20 per class) are
resized to ``--size`` px, each model's feature maps averaged over positions, and the class
predicted by cosine k-nearest neighbours and by a linear probe, each under class-stratified
5-fold cross-validation inside the fold (``seglib.evaluation.probe``). Chance is one over the
number of classes (1/21 = 0.048 on UC Merced).

``--model NAME=PATH``: any seglib checkpoint, repeatable; a scene model is probed at each of its
maps (s4, s8, s16, and the three side by side), a teacher or student at its learned stride-4
features; ``bundled`` is the bundled student. Compare a trained model with the same
architecture at random weights (``--model NAME=PATH@random``) in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


def _embedder(model):
    from .models.scene import SceneSegmenter

    if isinstance(model, SceneSegmenter):
        return model.cnn.pyramid
    return lambda x: {"s4": model.features(x)}


def _load(path: str):
    """``bundled``, a checkpoint path, either with ``@random``: the same architecture at random weights."""
    from .models import load_model, random_init_like

    base, _, suffix = path.partition("@")
    if suffix not in ("", "random"):
        raise ValueError(f"--model ...={path}: the only suffix is @random")
    model = load_model(None if base == "bundled" else base)
    return random_init_like(model) if suffix == "random" else model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seglib.probe",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="scene folder: one sub-folder of images per class")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="repeatable")
    p.add_argument("--fold", type=int, default=0, help="the one fold read (the fold pretraining left out)")
    p.add_argument("--size", type=int, default=128, help="side the scenes are resized to (128: zoom 0.5)")
    p.add_argument("--k", type=int, default=10, help="neighbours of the kNN probe")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="", help="JSON result (optional)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data.scenes import load_scenes, resize_batch
    from .device import set_threads
    from .evaluation.probe import pooled_features, probe_features
    from .io.images import ImageReadError

    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    try:
        scenes = load_scenes(args.data)
        if args.fold not in set(scenes.folds.tolist()):
            raise ValueError(f"--fold {args.fold}: the folds are {sorted(set(scenes.folds.tolist()))}")
        held = scenes.fold(args.fold)
        models = {}
        for item in args.model:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--model {item!r}: expected NAME=PATH (PATH: a checkpoint or 'bundled')")
            models[name] = (path, _load(path))
    except (CheckpointError, ImageReadError, ValueError, FileNotFoundError) as exc:
        print(f"python -m seglib.probe: error: {exc}", file=sys.stderr)
        return 2
    batches = [resize_batch(held.images[i : i + 32], args.size) for i in range(0, len(held), 32)]
    result = {
        "command": "python -m seglib.probe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": str(args.data),
        "fold": args.fold,
        "images": len(held),
        "names": held.names,
        "size": args.size,
        "k": args.k,
        "chance": 1 / len(held.classes),
        "models": {},
    }
    for name, (path, model) in models.items():
        scores = probe_features(pooled_features(_embedder(model), batches), held.labels, k=args.k)
        result["models"][name] = {"checkpoint": path, "levels": scores}
        for level, s in scores.items():
            print(
                f"{name:<20} {level:<4} kNN {s['knn']['mean']:.3f} +- {s['knn']['std']:.3f}   "
                f"linear {s['linear']['mean']:.3f} +- {s['linear']['std']:.3f}",
                flush=True,
            )
    if args.out:
        from .io.outputs import write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
