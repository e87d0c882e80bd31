"""Evaluation against ground truth, always beside baselines computed in the same run.

``evaluate_tiles`` scores a model on a list of (rgb, labels) pairs at K = the number of classes
present (or a fixed K) with both matchings, and computes on the same images:

* ``rgb_kmeans``: k-means on RGB pixels (the QGIS plugin's free mode);
* ``random_init`` (optional): the same architecture with untrained weights, clustered by the
  same head; trained features have to beat this to mean anything.

``k_sweep`` reports both matchings for K = 2..16. Proxy metrics (utilisation, speckle,
boundary density, two-view agreement under a horizontal flip) are computed per image too,
so one can check whether label-free numbers track the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .baselines import rgb_kmeans
from .inference import predict_labels
from .metrics import aggregate, proxy_scores, segmentation_scores

__all__ = ["evaluate_tiles", "k_sweep", "summarize"]

Labeler = Callable[[np.ndarray, int], np.ndarray]


def _model_labeler(model: torch.nn.Module, **kwargs) -> Labeler:
    return lambda rgb, k: predict_labels(model, rgb, k, **kwargs)


def _score(labeler: Labeler, rgb: np.ndarray, gt: np.ndarray, k: int, ignore: Sequence[int], proxies: bool) -> dict:
    pred = labeler(rgb, k)
    row = segmentation_scores(pred, gt, ignore)
    if proxies:
        flipped = labeler(np.ascontiguousarray(rgb[:, ::-1]), k)[:, ::-1]
        row.update(proxy_scores(pred, k, labels_other_view=flipped))
    return row


def evaluate_tiles(
    model: torch.nn.Module | None,
    tiles: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    k: int | str = "present",
    ignore: Sequence[int] = (),
    random_init: torch.nn.Module | None = None,
    proxies: bool = False,
    seed: int = 0,
    names: Sequence[str] | None = None,
    min_classes: int = 2,
    **model_kwargs,
) -> dict:
    """Score ``model`` and the baselines on (rgb (H, W, 3) float, labels (H, W)) pairs.

    ``k="present"`` uses the number of ground-truth classes present after ``ignore``; images
    with fewer than ``min_classes`` such classes are skipped (and listed as skipped).
    Returns {"model": ..., "rgb_kmeans": ..., ["random_init": ...], "per_image": [...],
    "skipped": [...]} with aggregated means per method.
    """
    methods: dict[str, Labeler] = {}
    if model is not None:
        methods["model"] = _model_labeler(model, **model_kwargs)
    methods["rgb_kmeans"] = lambda rgb, kk: rgb_kmeans(rgb, kk, seed=seed)
    if random_init is not None:
        methods["random_init"] = _model_labeler(random_init, **model_kwargs)
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    per_image, skipped = [], []
    for i, (rgb, gt) in enumerate(tiles):
        name = names[i] if names is not None else str(i)
        present = np.setdiff1d(np.unique(gt), np.asarray(list(ignore), dtype=gt.dtype))
        if len(present) < min_classes:
            skipped.append(name)
            continue
        kk = len(present) if k == "present" else int(k)
        entry = {"image": name, "k": kk, "n_classes": len(present)}
        for method, labeler in methods.items():
            row = _score(labeler, rgb, gt, kk, ignore, proxies and method == "model")
            rows[method].append(row)
            entry[method] = row
        per_image.append(entry)
    out = {method: aggregate(r) for method, r in rows.items()}
    out["per_image"] = per_image
    out["skipped"] = skipped
    return out


def k_sweep(
    model: torch.nn.Module | None,
    tiles: Sequence[tuple[np.ndarray, np.ndarray]],
    ks: Sequence[int] = tuple(range(2, 17)),
    *,
    ignore: Sequence[int] = (),
    seed: int = 0,
    **model_kwargs,
) -> list[dict]:
    """Mean Hungarian and many-to-one mIoU of the model and RGB k-means at each K."""
    rows = []
    for k in ks:
        res = evaluate_tiles(model, tiles, k=k, ignore=ignore, seed=seed, **model_kwargs)
        row = {"k": k}
        for method in ("model", "rgb_kmeans"):
            if method in res:
                row[f"{method}/miou"] = res[method]["miou"]
                row[f"{method}/m2o_miou"] = res[method]["m2o_miou"]
        rows.append(row)
    return rows


def summarize(result: dict, keys: Sequence[str] = ("miou", "pixel_acc", "m2o_miou")) -> str:
    """A small text table of the aggregated numbers of ``evaluate_tiles``."""
    methods = [m for m in ("model", "random_init", "rgb_kmeans") if m in result]
    lines = [f"{'method':<12}" + "".join(f"{k:>11}" for k in keys)]
    for m in methods:
        lines.append(f"{m:<12}" + "".join(f"{result[m].get(k, float('nan')):>11.3f}" for k in keys))
    return "\n".join(lines)
