"""The README's main job: train a teacher on synthetic tiles for a few minutes on CPU, evaluate
it beside RGB k-means and random-init features on the seeded test set, print a table.

    python -m seglib.demo                    # the 800-step recipe (seglib.recipes.TEACHER_SYNTHETIC_CPU)
    python -m seglib.demo --steps 200        # a shorter run of the same recipe

The training takes 3.5-4.5 minutes on a lightly loaded 2-core CPU, the evaluation about 20 s; both
take several times longer on a busy machine (README, "Quick start").

TensorBoard logs and checkpoints go to ``runs/demo/`` (``tensorboard --logdir runs``), the
evaluation JSON to ``runs/demo/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import Config
from .device import resolve_device, training_threads
from .recipes import get_recipe
from .training.run import run


def recipe_config() -> Config:
    """The documented CPU recipe, ``teacher_synthetic_cpu``."""
    return Config.from_dict(get_recipe("teacher_synthetic_cpu"))


def _cpu_threads(n: int) -> str:
    return f"{n} CPU thread{'s' * (n != 1)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seglib.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800, help="teacher training steps (the full recipe uses its own count)")
    p.add_argument("--out", default="runs/demo", help="checkpoints, TensorBoard logs and eval.json")
    p.add_argument("--eval-images", type=int, default=32, help="synthetic test tiles (512x512, seed 123)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    cfg = recipe_config()
    cfg.train.steps, cfg.train.seed, cfg.train.checkpoint_dir = args.steps, args.seed, args.out
    cfg.train.warmup = min(cfg.train.warmup, max(1, args.steps // 10))
    device = resolve_device(cfg.train.device)
    n = training_threads(cfg.train.threads, device)  # what run() will use: 1 on a 2-core CPU
    where = _cpu_threads(n) if device.type == "cpu" else str(device)
    print(f"training a teacher for {args.steps} steps on synthetic tiles ({where}) ...")
    tic = time.perf_counter()
    run(cfg)
    train_s = time.perf_counter() - tic

    from .evaluation.scores import evaluate_synthetic, summarize
    from .models import random_init_like
    from .models.teacher import MonolithicSegmenter

    model = MonolithicSegmenter.from_checkpoint(Path(args.out) / "teacher.pt")
    print(
        f"evaluating on {args.eval_images} synthetic test tiles (512x512, seed 123) at K = classes present "
        f"({_cpu_threads(torch.get_num_threads())}) ..."
    )
    tic = time.perf_counter()
    result = evaluate_synthetic(model, n=args.eval_images, size=512, seed=123, random_init=random_init_like(model))
    eval_s = time.perf_counter() - tic
    print()
    print(summarize(result))
    print(f"\nteacher - RGB k-means: {result['model']['miou'] - result['rgb_kmeans']['miou']:+.3f} mIoU")
    print(f"train {train_s / 60:.1f} min, eval {eval_s:.0f} s; TensorBoard: tensorboard --logdir {args.out}")
    summary = {k: result[k] for k in ("model", "random_init", "rgb_kmeans")}
    summary.update(train_seconds=round(train_s, 1), steps=args.steps, config=cfg.to_dict())
    Path(args.out, "eval.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
