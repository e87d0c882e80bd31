"""Scene-class pretraining: a ``SceneCNN`` learns the scene classes of a scene folder
(UC Merced Land Use: 21 classes from many US places), so that its maps describe texture and
context; ``SceneSegmenter`` then clusters them per image. Only scene labels are read, never a
pixel mask, and the images that are segmented later need not be of the same place.

    state = pretrain(ScenePretrainConfig(data_dir="../shared/data/ucmerced_landuse", out_dir="runs/scene"))

One step: ``batch`` scenes drawn without replacement from the training folds, one augmented
crop of each (``seglib.data.scenes.random_crops``: random zoom, flips, quarter turns, jitter),
cross-entropy of ``SceneCNN.classify``, AdamW with a linear warm-up and a cosine decay. The
fold ``holdout`` is never read, so the representation probe can score on it. Every
``checkpoint_every`` steps the whole state (weights, BatchNorm statistics, optimiser, step,
history) goes to ``out_dir/state.pt`` (atomic write); ``pretrain`` with the same config resumes
from it. A step's crops come from a generator seeded by (seed, step), so a resumed run
continues bit for bit the run it resumes. The finished model is ``out_dir/scene.pt``, a
``scene`` checkpoint any seglib command loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_checkpoint, model_checkpoint, save_atomic
from ..data.scenes import SceneFolder, load_scenes, random_crops, resize_batch
from ..models.scene import SceneModelConfig, SceneSegmenter

__all__ = ["ScenePretrainConfig", "pretrain", "heldout_accuracy", "lr_at"]

log = logging.getLogger("seglib.training")


@dataclass
class ScenePretrainConfig:
    data_dir: str = ""  # scene folder: <class>/<image> (seglib.data.scenes)
    out_dir: str = "runs/scene"  # state.pt (resume), scene.pt (the model), history.json
    steps: int = 3200  # optimiser steps
    batch: int = 48  # scenes per step
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # on the convolution and linear weights only
    warmup: float = 0.05  # share of the steps with a linear warm-up
    seed: int = 0  # initial weights and every step's crops
    holdout: int = 0  # fold never trained on (the probe's); -1: train on every fold
    size: int = 96  # crop side fed to the network
    zoom: tuple[float, float] = (0.375, 1.0)  # output px per source px, log-uniform
    jitter: float = 0.2  # brightness / contrast / saturation factors in 1 -+ jitter
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 2, 2, 2)
    checkpoint_every: int = 100
    eval_every: int = 400  # held-out scene accuracy (fold ``holdout``) every this many steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What decides the trained weights (not where they are written, nor how often)."""
        skip = ("out_dir", "data_dir", "checkpoint_every", "eval_every")
        return {k: v for k, v in json.loads(json.dumps(self.to_dict())).items() if k not in skip}


def lr_at(step: int, cfg: ScenePretrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine decay to 0."""
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def heldout_accuracy(model: SceneSegmenter, scenes: SceneFolder, size: int = 128) -> float:
    """Scene-class accuracy of the classifier on whole images resized to ``size``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(scenes), 64):
        logits = model.cnn.classify(resize_batch(scenes.images[i : i + 64], size))
        correct += int((logits.argmax(1).numpy() == scenes.labels[i : i + 64]).sum())
    model.train(was_training)
    return correct / max(1, len(scenes))


def _model_config(cfg: ScenePretrainConfig, classes: int) -> SceneModelConfig:
    return SceneModelConfig(widths=tuple(cfg.widths), depths=tuple(cfg.depths), classes=classes)


def pretrain(cfg: ScenePretrainConfig, *, scenes: SceneFolder | None = None, progress=None) -> dict[str, Any]:
    """Train (or resume, or return the finished run of) ``cfg``; returns
    {"model": path of scene.pt, "history": [...], "seconds": training seconds}.

    ``scenes``: the loaded folder, when the caller has it (else ``cfg.data_dir`` is read).
    Raises ``CheckpointError`` when ``out_dir`` holds a run of another config."""
    out = Path(cfg.out_dir)
    final, state_path = out / "scene.pt", out / "state.pt"
    if final.is_file():
        return _finished(final, cfg)
    scenes = scenes if scenes is not None else load_scenes(cfg.data_dir)
    if cfg.holdout >= 0 and cfg.holdout not in set(scenes.folds.tolist()):
        raise ValueError(f"holdout fold {cfg.holdout} does not exist (folds {sorted(set(scenes.folds.tolist()))})")
    train = scenes.without_fold(cfg.holdout if cfg.holdout >= 0 else None)
    held = scenes.fold(cfg.holdout) if cfg.holdout >= 0 else None
    if len(train) < cfg.batch:
        raise ValueError(f"{len(train)} training scenes, fewer than a batch of {cfg.batch}; lower batch")
    torch.manual_seed(cfg.seed)
    model = SceneSegmenter(_model_config(cfg, len(scenes.classes)))
    cnn = model.cnn
    decay = [p for p in cnn.parameters() if p.ndim > 1]
    other = [p for p in cnn.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": other, "weight_decay": 0.0}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    step, history, seconds = _resume(state_path, cfg, cnn, opt)
    cnn.train()
    tic, losses = time.perf_counter(), []
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(train), cfg.batch, replace=False)
        x, _ = random_crops([train.images[i] for i in idx], rng, size=cfg.size, zoom=tuple(cfg.zoom), jitter=cfg.jitter)
        y = torch.from_numpy(train.labels[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = F.cross_entropy(cnn.classify(x), y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"scene pretraining: loss {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = heldout_accuracy(model, held) if held is not None else None
            history.append({"step": step, "loss": float(np.mean(losses[-cfg.eval_every :])), "heldout_acc": acc})
            log.info("step %d: loss %.3f, held-out scene accuracy %s", step, history[-1]["loss"], acc)
        if progress is not None:
            progress(step, loss.item())
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            seconds, tic = seconds + now - tic, now
            state = model_checkpoint(
                "train-state",
                model.config.to_dict(),
                cnn.state_dict(),
                task="scene",
                optimizer=opt.state_dict(),
                step=step,
                history=history,
                seconds=seconds,
                pretrain=cfg.fingerprint(),
            )
            save_atomic(state, state_path)
    cnn.eval()
    extra = {"pretrain": cfg.fingerprint(), "history": history, "seconds": seconds, "classes": scenes.classes}
    save_atomic(model.checkpoint(**extra), final)
    (out / "history.json").write_text(
        json.dumps({"config": cfg.to_dict(), "history": history, "seconds": seconds}, indent=1)
    )
    return {"model": str(final), "history": history, "seconds": seconds}


def _finished(final: Path, cfg: ScenePretrainConfig) -> dict[str, Any]:
    """``pretrain``'s answer for a run that finished already (``final``, its ``scene.pt``)."""
    saved = load_checkpoint(final, kind="scene")
    if saved.get("pretrain") != cfg.fingerprint():
        raise CheckpointError(f"{final} was trained with other settings; choose another out_dir")
    return {"model": str(final), "history": saved["history"], "seconds": saved["seconds"]}


def _resume(
    state_path: Path, cfg: ScenePretrainConfig, cnn: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[int, list[dict[str, Any]], float]:
    """Load the run's last state (``state_path``) into ``cnn`` and ``opt``: (step, history,
    training seconds); (0, [], 0.0) when there is none."""
    if not state_path.is_file():
        return 0, [], 0.0
    state = load_checkpoint(state_path, kind="train-state")
    if state.get("task") != "scene" or state.get("pretrain") != cfg.fingerprint():
        raise CheckpointError(f"{state_path} belongs to a run with other settings; choose another out_dir")
    cnn.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    log.info("resumed %s at step %d", state_path.parent, state["step"])
    return state["step"], state["history"], state["seconds"]
