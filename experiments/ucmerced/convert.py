"""Turn a checkpoint of ``experiments/ucmerced/pretrain.py`` (``OUT/last.pt`` or ``OUT/model.pt``)
into a seglib ``scene`` checkpoint that ``python -m seglib.loto`` and the probe load.

    python -m experiments.ucmerced.convert runs/ucm/scene_16x_s0/model.pt runs/ucmp/scene/shared/scene.pt

The two trainers draw the same crops and build the same network from the same seed (a 200-step
run of each gave identical weights), so a finished run converted here is the run
``python -m seglib.pretrain`` with the same settings would have written: it gets that run's
``pretrain`` fingerprint, and ``seglib.training.scene.pretrain`` accepts it as finished. A
``last.pt`` taken before its last step is marked ``partial`` (its step), so it is never taken
for a finished run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from seglib.checkpoint import save_atomic
from seglib.models.scene import SceneModelConfig, SceneSegmenter
from seglib.training.scene import ScenePretrainConfig


def pretrain_config(args: dict) -> ScenePretrainConfig:
    """The seglib pretraining config of the experiment script's recorded arguments."""
    numbers = lambda text, kind: tuple(kind(v) for v in str(text).split(","))  # noqa: E731
    return ScenePretrainConfig(
        steps=args["steps"],
        batch=args["batch"],
        lr=args["lr"],
        weight_decay=args["weight_decay"],
        warmup=args["warmup"],
        seed=args["seed"],
        holdout=args["holdout"],
        size=args["size"],
        zoom=numbers(args["zoom"], float),
        jitter=args["jitter"],
        widths=numbers(args["widths"], int),
        depths=numbers(args["depths"], int),
    )


def convert(src: str | Path, dst: str | Path) -> Path:
    state = torch.load(src, map_location="cpu", weights_only=False)
    cfg = pretrain_config(state["args"])
    weights = {k: v for k, v in state["model"].items() if k not in ("mean", "std")}
    classes = weights["fc.weight"].shape[0]
    model = SceneSegmenter(SceneModelConfig(widths=cfg.widths, depths=cfg.depths, classes=classes))
    model.cnn.load_state_dict(weights)
    step = state.get("step", cfg.steps)
    extra = {
        "history": state["history"],
        "seconds": state["seconds"],
        "converted_from": str(src),
        "step": step,
    }
    if step == cfg.steps:
        extra["pretrain"] = cfg.fingerprint()
    else:
        extra["partial"] = {"step": step, "of": cfg.fingerprint()}
    if "classes" in state:
        extra["classes"] = state["classes"]
    return save_atomic(model.eval().checkpoint(**extra), Path(dst))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m experiments.ucmerced.convert SRC.pt DST/scene.pt")
    Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
    print(convert(sys.argv[1], sys.argv[2]))
