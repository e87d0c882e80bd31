"""Command line of scene-class pretraining (``seglib.training.scene``): a ``SceneCNN`` learns the
scene classes of a folder of labelled scenes; the result is a ``scene`` model every seglib
command loads (``--checkpoint OUT/scene.pt``).

    python -m seglib.pretrain --data ../shared/data/ucmerced_landuse --out runs/scene --threads 1
    python -m seglib.pretrain --data DIR --out runs/scene_short --steps 200 --seed 1

Rerunning a killed command resumes it where its last checkpoint left it (every
``--checkpoint-every`` steps), bit for bit; a finished run is not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .checkpoint import CheckpointError
from .device import set_threads
from .io.images import ImageReadError
from .training.scene import ScenePretrainConfig, pretrain

__all__ = ["build_parser", "main"]


def _numbers(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    d = ScenePretrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m seglib.pretrain",
        description="Pretrain a SceneCNN on the scene classes of a folder of scenes (<class>/<image>).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="scene folder: one sub-folder of images per class")
    p.add_argument("--out", default=d.out_dir, help="output folder (state.pt to resume, scene.pt, history.json)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--holdout", type=int, default=d.holdout, help="fold never trained on (-1: none)")
    p.add_argument("--size", type=int, default=d.size, help="crop side fed to the network")
    p.add_argument("--zoom", type=_numbers(float), default=d.zoom, help="low,high: output px per source px")
    p.add_argument("--jitter", type=float, default=d.jitter)
    p.add_argument("--widths", type=_numbers(int), default=d.widths)
    p.add_argument("--depths", type=_numbers(int), default=d.depths)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(args.zoom) != 2:
        print("python -m seglib.pretrain: error: --zoom takes two numbers, low,high", file=sys.stderr)
        return 2
    set_threads(args.threads)
    names = {f.name for f in dataclasses.fields(ScenePretrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    cfg = ScenePretrainConfig(data_dir=args.data, out_dir=args.out, **values)
    try:
        result = pretrain(cfg)
    except (CheckpointError, ImageReadError, ValueError) as exc:
        print(f"python -m seglib.pretrain: error: {exc}", file=sys.stderr)
        return 2
    last = result["history"][-1] if result["history"] else {}
    accuracy = last.get("heldout_acc")
    print(f"{result['model']}: {cfg.steps} steps, {result['seconds']:.0f} s, held-out scene accuracy {accuracy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
