"""Representation probe on UC Merced: scene-class accuracy of pooled features, trained vs random.

    python -m experiments.ucmerced.probe --data ../shared/data/ucmerced_landuse \
        --model scene=runs/ucmp/scene/shared/scene.pt --model scene_random=runs/ucmp/scene_random/shared/scene.pt \
        --model bundled=bundled --out experiments/ucmerced/probe.json

Only fold ``--fold`` (default 0) is read: the scene-label pretraining never trains on it
(``seglib.training.scene``, ``holdout``). Its 420 scenes (20 per class) are resized to
``--size`` px, their feature maps averaged over positions, and the class predicted by cosine
k-nearest neighbours and by a linear probe, each under class-stratified 5-fold cross-validation
inside the fold (``seglib.evaluation.probe``). Chance is 1/21 = 0.048.

``--model NAME=PATH``: any seglib checkpoint; a scene model is probed at each of its maps
(s4, s8, s16, and all three side by side), a teacher or student at its learned stride-4
features; ``bundled`` is the bundled student.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from seglib.data.scenes import load_scenes, resize_batch
from seglib.evaluation.probe import pooled_features, probe_features
from seglib.models import load_model
from seglib.models.scene import SceneSegmenter


def embedder(model):
    if isinstance(model, SceneSegmenter):
        return model.cnn.pyramid
    return lambda x: {"s4": model.features(x)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="UC Merced (class sub-folders)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="side the scenes are resized to (128: zoom 0.5)")
    p.add_argument("--k", type=int, default=10, help="neighbours of the kNN probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    held = load_scenes(args.data).fold(args.fold)
    batches = [resize_batch(held.images[i : i + 32], args.size) for i in range(0, len(held), 32)]
    result = {
        "command": "python -m experiments.ucmerced.probe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "fold": args.fold,
        "images": len(held),
        "size": args.size,
        "k": args.k,
        "chance": 1 / len(held.classes),
        "models": {},
    }
    for item in args.model:
        name, _, path = item.partition("=")
        model = load_model(None if path == "bundled" else path)
        scores = probe_features(pooled_features(embedder(model), batches), held.labels, k=args.k)
        result["models"][name] = {"checkpoint": path, "levels": scores}
        for level, s in scores.items():
            print(
                f"{name:<20} {level:<4} kNN {s['knn']['mean']:.3f} +- {s['knn']['std']:.3f}   "
                f"linear {s['linear']['mean']:.3f} +- {s['linear']['std']:.3f}",
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
