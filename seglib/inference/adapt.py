"""Adaptation to the raster being segmented: a few unsupervised training steps of the model on
random windows of the input itself (no labels), before the final assignment.

    from seglib.inference.adapt import adapt
    adapted = adapt(model, ArraySource(image), steps=20)      # a copy; ``model`` is untouched
    labels = seglib.segment(image, 6, model, adapt_steps=20)   # the same, inside segment
    python -m seglib.predict --input ortho.tif --k 6 --output out/ --adapt 20

The objective is swapped prediction (``seglib.losses.swap``): two views of each window,
each predicting the other's Sinkhorn-balanced assignment to C prototypes. The prototypes start
as k-means centres of the model's own features on a first batch of windows, so any trained
segmenter (teacher or student, whatever stage trained it) can be adapted. Normalisation layers
keep their running statistics (the model runs in eval mode; only weights move), so a few steps on
one raster cannot shift the statistics the rest of the network relies on.

For a windowed raster the model is adapted once, on windows drawn from the whole raster; the
windows are then segmented with one set of shared clusters as usual. ``max_seconds`` bounds the
time (the steps stop early), and a progress bar shows the steps.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..augment import make_views
from ..config import AugmentConfig
from ..evaluation.baselines import kmeans
from ..io.rasters import ArraySource, RasterSource
from ..losses.swap import swapped_prediction

__all__ = ["adapt", "sample_windows"]


def sample_windows(source: ArraySource | RasterSource, n: int, side: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random windows of ``side`` pixels (fewer rows/columns when the source is smaller,
    reflect-padded up to ``side``) as (n, 3, side, side) float in [0, 1]."""
    out = []
    for _ in range(n):
        h, w = min(side, source.height), min(side, source.width)
        y = int(rng.integers(0, source.height - h + 1))
        x = int(rng.integers(0, source.width - w + 1))
        rgb = torch.from_numpy(np.ascontiguousarray(source.read(y, x, h, w))).permute(2, 0, 1).float() / 255.0
        if (h, w) != (side, side):
            mode = "reflect" if side - h < h and side - w < w else "replicate"
            rgb = F.pad(rgb[None], (0, side - w, 0, side - h), mode=mode)[0]
        out.append(rgb)
    return torch.stack(out)


def adapt(
    model: torch.nn.Module,
    source: ArraySource | RasterSource,
    *,
    steps: int,
    crop: int = 128,
    batch: int = 4,
    lr: float = 5e-4,
    prototypes: int = 16,
    temperature: float = 0.1,
    window: int = 2,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> torch.nn.Module:
    """A copy of ``model`` trained ``steps`` steps on windows of ``source`` (eval mode).

    Arguments:
      model: a seglib segmenter (its ``features`` are trained).
      source: the raster (``seglib.io.rasters.ArraySource`` for an array, ``RasterSource`` for a file).
      steps: optimizer steps (0 returns the model itself).
      crop: window side at the model's input scale (``downsample`` times more source pixels).
      batch: windows per step.
      lr: AdamW learning rate.
      prototypes, temperature, window: the swapped-prediction objective (``seglib.losses.swap``).
      max_seconds: stop after this much wall time even if fewer steps ran (None: no bound).
      seed: window positions and augmentations.
      progress: show a progress bar.
    """
    if steps < 0:
        raise ValueError(f"adaptation steps must be 0 or more, got {steps}")
    if steps == 0:
        return model
    device = next(model.parameters()).device
    ds = getattr(model.config, "downsample", 1) or 1
    multiple = getattr(model, "input_multiple", 4)
    crop = max(multiple, crop // multiple * multiple)
    adapted = copy.deepcopy(model).eval()  # eval: normalisation statistics stay as trained
    rng = np.random.default_rng(seed)
    augment = AugmentConfig()

    def windows() -> torch.Tensor:
        rgb = sample_windows(source, batch, crop * ds, rng)  # (B, 3, crop*ds, crop*ds)
        return (F.avg_pool2d(rgb, ds) if ds > 1 else rgb).to(device)  # the scale the encoder reads

    with torch.no_grad():
        first = windows()
        feats = F.normalize(adapted.features(first).float(), dim=1)  # (B, F, h, w)
        points = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (B*h*w, F)
        c = min(prototypes, points.shape[0])
        _, centres = kmeans(points.cpu(), c, seed=seed)
    protos = torch.nn.Parameter(centres.to(device))
    params = [p for p in adapted.parameters() if p.requires_grad] + [protos]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tic = time.perf_counter()
    bar = tqdm(range(steps), desc="adapt", disable=not progress, leave=False)
    for step in bar:
        rgb = first if step == 0 else windows()
        rngs = [np.random.default_rng([seed, step, i]) for i in range(rgb.shape[0])]
        view_a, view_b, transform = make_views(rgb, rngs, augment)
        feats = F.normalize(adapted.features(torch.cat([view_a, view_b])).float(), dim=1)  # (2B, F, h, w)
        logits = torch.einsum("bfhw,cf->bchw", feats, F.normalize(protos, dim=1)) / temperature  # (2B, C, h, w)
        b = rgb.shape[0]
        loss = swapped_prediction(logits[:b], logits[b:], transform, window=window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        if max_seconds is not None and time.perf_counter() - tic > max_seconds:
            break
    for p in adapted.parameters():
        p.grad = None
    return adapted.eval()
