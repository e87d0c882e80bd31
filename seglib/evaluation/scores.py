"""Evaluation against ground truth, always beside baselines computed in the same run.

``evaluate_tiles`` scores a model on a list of (rgb, labels) pairs at K = the number of classes
present (or a fixed K) with both matchings, and computes on the same images:

* ``rgb_kmeans``: k-means on RGB pixels (the QGIS plugin's free mode);
* ``random_init`` (optional): the same architecture with untrained weights, clustered by the
  same head; trained features have to beat this to mean anything.

``k_sweep`` reports both matchings for K = 2..16. Proxy metrics (utilisation, speckle,
boundary density, two-view agreement under a horizontal flip) are computed per image too, so
one can check whether label-free numbers track the ground truth: ``scores_with_proxies`` and
``proxy_picks`` ask whether they pick the checkpoint and the K ground truth picks. ``explore``
segments one image with given knobs (the function behind notebook 06's ``explorer`` panel).
``evaluate_shared`` scores one legend for a whole set (clusters fitted once on all images,
``seglib.inference.legend``) beside per-image fitting, with a dataset-level Hungarian matching (one
mapping of clusters to classes for all images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.synthetic import eval_set
from ..inference.predictor import InferenceSettings, Predictor, to_tensor
from ..inference.windows import Tiling
from ..viz import match_labels
from .baselines import rgb_kmeans
from .metrics import aggregate, proxy_scores, segmentation_scores

__all__ = [
    "PROXIES",
    "synthetic_tiles",
    "folder_tiles",
    "run_eval_tiles",
    "evaluate_tiles",
    "evaluate_synthetic",
    "k_sweep",
    "summarize",
    "scores_with_proxies",
    "proxy_picks",
    "explore",
    "explorer",
    "dataset_confusion",
    "evaluate_shared",
]

Labeler = Callable[[np.ndarray, int], np.ndarray]

# Label-free proxies of ``seglib.evaluation.metrics.proxy_scores`` and whether a larger value is better.
PROXIES: dict[str, bool] = {"view_agreement": True, "utilization": True, "speckle": False, "boundary_density": False}


def _model_labeler(model: torch.nn.Module, settings: InferenceSettings | None = None) -> Labeler:
    return lambda rgb, k: Predictor.of(model, k, settings).labels(rgb)


def _score(
    labeler: Labeler, rgb: np.ndarray, gt: np.ndarray | None, k: int, ignore: Sequence[int], proxies: bool
) -> dict:
    pred = labeler(rgb, k)
    row = segmentation_scores(pred, gt, ignore) if gt is not None else {}
    if proxies or gt is None:
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
    compare: dict[str, torch.nn.Module] | None = None,
    proxies: bool = False,
    seed: int = 0,
    names: Sequence[str] | None = None,
    min_classes: int = 2,
    settings: InferenceSettings | None = None,
) -> dict:
    """Score ``model`` and the baselines on (rgb (H, W, 3) float, labels (H, W)) pairs.

    ``k="present"`` uses the number of ground-truth classes present after ``ignore``; images
    with fewer than ``min_classes`` such classes are skipped (and listed as skipped). Images
    without ground truth (labels None: a folder without masks) get the label-free proxies of
    every method instead, at an integer ``k``.
    ``compare`` adds other models (name -> model, e.g. ``{"bundled": ...}``), scored on the same
    images with their own head settings (``settings`` apply to ``model`` and ``random_init``).
    Returns {"model": ..., "rgb_kmeans": ..., ["random_init": ...], [<compare names>...],
    "per_image": [...], "skipped": [...]} with aggregated means per method.
    """
    methods: dict[str, Labeler] = {}
    if model is not None:
        methods["model"] = _model_labeler(model, settings)
    methods["rgb_kmeans"] = lambda rgb, kk: rgb_kmeans(rgb, kk, seed=seed)
    if random_init is not None:
        methods["random_init"] = _model_labeler(random_init, settings)
    for name, other in (compare or {}).items():
        if name in methods:
            raise ValueError(f"compare: the name {name!r} is taken; use another")
        methods[name] = _model_labeler(other)
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    per_image, skipped = [], []
    for i, (rgb, gt) in enumerate(tiles):
        name = names[i] if names is not None else str(i)
        if gt is None:
            if k == "present":
                raise ValueError(f"image {name} has no ground truth: give an integer k, not 'present'")
            entry = {"image": name, "k": int(k)}
        else:
            present = np.setdiff1d(np.unique(gt), np.asarray(list(ignore), dtype=gt.dtype))
            if len(present) < min_classes:
                skipped.append(name)
                continue
            entry = {"image": name, "k": len(present) if k == "present" else int(k), "n_classes": len(present)}
        for method, labeler in methods.items():
            row = _score(labeler, rgb, gt, entry["k"], ignore, proxies and method == "model")
            rows[method].append(row)
            entry[method] = row
        per_image.append(entry)
    out = {method: aggregate(r) for method, r in rows.items()}
    out["per_image"] = per_image
    out["skipped"] = skipped
    return out


def synthetic_tiles(
    n: int = 32, size: int = 512, seed: int = 123
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """(names, [(rgb, labels)]) of the seeded synthetic test set (``seglib.data.synthetic.eval_set``)."""
    tiles = [(t.rgb, t.labels) for t in eval_set(n, size, seed)]
    return [f"synthetic_{seed}_{i:03d}" for i in range(len(tiles))], tiles


def folder_tiles(
    images: str | Path, masks: str | Path = "", *, n: int = 0, max_side: int = 0
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray | None]]]:
    """(names, [(rgb float32 (H, W, 3) in [0, 1], labels (H, W) or None)]) of ``n`` images of a
    folder spread over its sorted list (0: all), shrunk so the longer side is at most
    ``max_side`` (0: full size). With a ``masks`` folder only images with a mask (``<stem>.png``)
    count and carry it; without, labels are None (``evaluate_tiles`` then reports proxies)."""
    from ..data.tiles import load_folder, load_labelled_folder
    from ..io.images import shrink

    if masks:
        names, tiles = load_labelled_folder(images, masks, max_side=max_side)
    else:
        names, rgbs = load_folder(images)
        tiles = []
        for rgb in rgbs:
            small, _ = shrink(rgb, None, max_side)
            tiles.append((small.astype(np.float32) / 255.0, None))
    if 0 < n < len(tiles):
        pick = sorted({int(i) for i in np.linspace(0, len(tiles) - 1, n).round()})
        names, tiles = [names[i] for i in pick], [tiles[i] for i in pick]
    return names, tiles


def run_eval_tiles(
    data, *, n: int, size: int, seed: int
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray | None]]]:
    """The images a training run is scored on: ``n`` images of ``data.data_dir`` (with the masks of
    ``data.mask_dir``, if any) shrunk to ``size``, or, for a synthetic run (``data``, a
    ``DataConfig``), ``n`` tiles of the seeded synthetic test set."""
    if data.synthetic:
        return synthetic_tiles(n, size, seed)
    return folder_tiles(data.data_dir, data.mask_dir, n=n, max_side=size)


def evaluate_synthetic(
    model: torch.nn.Module | None,
    *,
    n: int = 32,
    size: int = 512,
    seed: int = 123,
    random_init: torch.nn.Module | None = None,
    settings: InferenceSettings | None = None,
) -> dict:
    """``evaluate_tiles`` at K = classes present on the seeded synthetic test set (``n`` tiles of
    ``size`` px); ``seed`` also seeds RGB k-means."""
    names, tiles = synthetic_tiles(n, size, seed)
    return evaluate_tiles(model, tiles, seed=seed, names=names, random_init=random_init, settings=settings)


def k_sweep(
    model: torch.nn.Module | None,
    tiles: Sequence[tuple[np.ndarray, np.ndarray]],
    ks: Sequence[int] = tuple(range(2, 17)),
    *,
    ignore: Sequence[int] = (),
    seed: int = 0,
    settings: InferenceSettings | None = None,
) -> list[dict]:
    """Mean Hungarian and many-to-one mIoU of the model and RGB k-means at each K."""
    rows = []
    for k in ks:
        res = evaluate_tiles(model, tiles, k=k, ignore=ignore, seed=seed, settings=settings)
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


def scores_with_proxies(
    model: torch.nn.Module,
    tiles: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    k: int | str = "present",
    ignore: Sequence[int] = (),
    **tags: Any,
) -> list[dict[str, Any]]:
    """One row per image: the model's Hungarian and many-to-one scores and the label-free
    proxies (``evaluate_tiles(..., proxies=True)``), with ``tags`` (e.g. ``step=100``) added."""
    result = evaluate_tiles(model, tiles, k=k, ignore=ignore, proxies=True)
    return [{**tags, "image": entry["image"], "k": entry["k"], **entry["model"]} for entry in result["per_image"]]


def proxy_picks(rows: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Which value of ``by`` (``"step"``: a checkpoint, ``"k"``) ground truth and each proxy pick.

    ``rows`` come from ``scores_with_proxies``. Per criterion: ``pick``, the best value of the
    criterion's mean over images; ``miou_at_pick``, the mean Hungarian mIoU there; and
    ``per_image_hits``, the fraction of images whose own best value by the criterion is the one
    ground truth picks for that image. The first row is ground truth itself.
    """
    values = sorted({row[by] for row in rows})
    images = sorted({row["image"] for row in rows})
    table = {(row[by], row["image"]): row for row in rows}

    def best(key: str, image: str | None = None) -> Any:
        """The value of ``by`` with the best ``key``: for one image, or on the mean over images."""
        higher = key == "miou" or PROXIES[key]
        scores = {}
        for value in values:
            cells = [table[value, im][key] for im in images if (value, im) in table and image in (None, im)]
            if cells:
                scores[value] = float(np.mean(cells))
        return (max if higher else min)(scores, key=scores.get)

    def mean_miou(value: Any) -> float:
        return float(np.mean([table[value, im]["miou"] for im in images if (value, im) in table]))

    truth = {im: best("miou", im) for im in images}
    out = []
    for key in ["miou", *PROXIES]:
        if not all(key in row for row in rows):
            continue
        pick = best(key)
        out.append(
            {
                "criterion": "mIoU (ground truth)" if key == "miou" else key,
                "pick": pick,
                "miou_at_pick": mean_miou(pick),
                "per_image_hits": float(np.mean([best(key, im) == truth[im] for im in images])),
            }
        )
    return out


@torch.no_grad()
def explore(
    model: torch.nn.Module,
    rgb: np.ndarray,
    gt: np.ndarray | None = None,
    *,
    k: int,
    lane: str = "fast",
    temperature: float | None = None,
    ignore: Sequence[int] = (5, 255),
) -> dict[str, Any]:
    """Segment one image (H, W, 3) with the given knobs: the pure function behind notebook 06's
    explorer (same inputs, same outputs, nothing drawn).

    Returns ``labels`` (H, W), ``confidence`` (the top probability per pixel), the label-free
    proxies and, with ground truth ``gt``, its scores (``miou``, ``m2o_miou``, ...) and
    ``labels_matched`` (clusters renumbered to the classes they overlap most, for colours).
    """
    probs = Predictor(model, k, lane=lane, temperature=temperature).probs(to_tensor(rgb))[0].float().cpu()  # (K, H, W)
    labels = probs.argmax(0).numpy()
    out: dict[str, Any] = {"k": k, "lane": lane, "temperature": temperature, "labels": labels}
    out["confidence"] = probs.max(0).values.numpy()
    out.update(proxy_scores(labels, k))
    if gt is not None:
        out.update(segmentation_scores(labels, gt, ignore))
        out["labels_matched"] = match_labels(labels, gt, ignore)
    return out


def explorer(render: Callable[..., None], controls: dict[str, Any]):
    """An interactive panel: ``controls`` (name -> ipywidgets control) above an output area in
    which ``render(**values)`` redraws on every change. Returns the panel; display it.

    Nothing is drawn until a control changes: the notebook draws the first view with a plain
    ``render(...)`` call, so headless runs (papermill, nbval) never execute inside the widget's
    output area, whose capture protocol headless executors handle unreliably.
    """
    import ipywidgets as widgets

    out = widgets.Output()

    def redraw(_change: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            render(**{name: control.value for name, control in controls.items()})

    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


def dataset_confusion(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], k: int, classes: np.ndarray
) -> np.ndarray:
    """Confusion matrix (K, C) summed over images; pixels whose label is not in ``classes``
    (e.g. ignored ids) take no part."""
    matrix = np.zeros((k, len(classes)), np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        col = np.searchsorted(classes, gt.ravel())
        keep = np.isin(gt.ravel(), classes)
        matrix += np.bincount(
            pred.ravel()[keep].astype(np.int64) * len(classes) + col[keep], minlength=k * len(classes)
        ).reshape(k, len(classes))
    return matrix


@torch.no_grad()
def evaluate_shared(
    model: torch.nn.Module | None,
    tiles: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    *,
    ignore: Sequence[int] = (),
    random_init: torch.nn.Module | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
    tiling: Tiling | None = None,
) -> dict:
    """One legend for all ``tiles`` against per-image fitting, at one K, in one run.

    For the model (and ``random_init``): ``per_image`` fits clusters on each image alone
    (``seglib.segment``); ``shared`` fits one set on windows sampled from every image
    (``seglib.inference.legend.fit_sources``) and assigns every image to it. RGB k-means likewise:
    per image, and once on pixels sampled from every image (``shared_rgb_kmeans``).
    Each gets ``dataset_miou`` (one Hungarian matching of clusters to classes over all images
    together: what a shared legend is for) and ``mean_image_miou`` (matched per image).
    Images with fewer than 2 classes after ``ignore`` are scored too (one legend covers them).
    ``tiling``: the windows of large images and of the fits (default ``Tiling()``; its seed is
    ``seed``).
    """
    from ..inference.engine import segment_array, segment_source
    from ..inference.legend import fit_sources
    from ..io.rasters import ArraySource
    from .baselines import shared_rgb_kmeans
    from .metrics import hungarian_scores

    images = [np.round(np.asarray(rgb) * 255).astype(np.uint8) if rgb.dtype != np.uint8 else rgb for rgb, _ in tiles]
    gts = [gt for _, gt in tiles]
    classes = np.setdiff1d(np.unique(np.concatenate([np.unique(g) for g in gts])), np.asarray(list(ignore)))

    tiling = replace(tiling or Tiling(), seed=seed)  # the shared fit's; each image alone fits as segment does
    alone = Tiling(tiling.tile, tiling.overlap)

    def assign(m: torch.nn.Module, fitted) -> list[np.ndarray]:
        out = []
        predictor = Predictor(m, k, clusters=fitted.head_clusters())
        for image in images:
            labels = np.empty(image.shape[:2], np.uint8)

            def write_rows(y: int, rows: np.ndarray, labels=labels) -> None:
                labels[y : y + rows.shape[0]] = rows

            segment_source(predictor, ArraySource(image), write_rows=write_rows, tiling=tiling)
            out.append(labels)
        return out

    preds: dict[str, list[np.ndarray]] = {}
    for name, m in (("model", model), ("random_init", random_init)):
        if m is None:
            continue
        preds[f"{name}/per_image"] = [segment_array(Predictor(m, k), image, tiling=alone) for image in images]
        fitted = fit_sources(m, [ArraySource(i) for i in images], k, tiling=tiling)
        preds[f"{name}/shared"] = assign(m, fitted)
    preds["rgb_kmeans/per_image"] = [rgb_kmeans(image.astype(np.float32) / 255, k, seed=seed) for image in images]
    preds["rgb_kmeans/shared"] = shared_rgb_kmeans([i.astype(np.float32) / 255 for i in images], k, seed=seed)[0]

    result: dict = {"k": k, "n_images": len(images), "classes": classes.tolist()}
    for key, labels in preds.items():
        matrix = dataset_confusion(labels, gts, k, classes)
        per_image = []
        for pred, gt in zip(labels, gts, strict=True):
            present = np.setdiff1d(np.unique(gt), np.asarray(list(ignore)))
            if len(present) >= 2:
                per_image.append(segmentation_scores(pred, gt, ignore)["miou"])
        method, mode = key.split("/")
        result.setdefault(method, {})[mode] = {
            "dataset_miou": hungarian_scores(matrix)["miou"],
            "dataset_pixel_acc": hungarian_scores(matrix)["pixel_acc"],
            "mean_image_miou": float(np.mean(per_image)) if per_image else float("nan"),
        }
    if names is not None:
        result["images"] = list(names)
    return result
