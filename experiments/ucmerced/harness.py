"""Scoring shared by the UC Merced experiments: per-image rows on the labelled Dubai split,
cached by (what was scored, its settings, the model's weights).

Every row is what ``python -m seglib.loto`` computes for an image: K = classes present (labels
5 and 255 ignored, images with fewer than 2 classes skipped), Hungarian mIoU, RGB k-means with
seed 123 as the baseline.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from seglib.baselines import rgb_kmeans
from seglib.data.tiles import load_labelled_folder
from seglib.loto.folds import group_by_tile
from seglib.metrics import confusion, hungarian_scores, many_to_one_scores, segmentation_scores
from seglib.raster import predict_labels

IGNORE = (5, 255)
KEYS = ("miou", "pixel_acc", "m2o_miou", "boundary_f1")
FAST_KEYS = ("miou", "pixel_acc", "m2o_miou")  # without boundary F1 (the slowest part on large images)


def scores(pred: np.ndarray, gt: np.ndarray, boundary: bool) -> dict:
    if boundary:
        return segmentation_scores(pred, gt, IGNORE)
    matrix, _ = confusion(pred, gt, IGNORE)
    out = hungarian_scores(matrix)
    out["m2o_miou"] = many_to_one_scores(matrix)["miou"]
    return out


def load_dev(data: str | Path, tiles: list[str] | None = None):
    """(names, pairs, tile of each name) of the labelled split, optionally only ``tiles``."""
    data = Path(data)
    from seglib.io import list_images

    stems = [p.stem for p in list_images(data / "images")]
    groups = group_by_tile(stems)
    keep = [n for t, ns in groups.items() if tiles is None or t in tiles for n in ns]
    names, pairs = load_labelled_folder(data / "images", data / "masks", include=[glob.escape(n) for n in keep])
    tile_of = {n: t for t, ns in groups.items() for n in ns}
    return names, pairs, [tile_of[n] for n in names]


def weights_digest(model: torch.nn.Module | None) -> str:
    if model is None:
        return "none"
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()[:16]


def score(model, names, pairs, tiles, *, infer: dict | None = None, seed: int = 123, boundary: bool = False) -> list[dict]:
    rows = []
    for name, (rgb, gt), tile in zip(names, pairs, tiles, strict=True):
        present = np.setdiff1d(np.unique(gt), np.asarray(IGNORE, dtype=gt.dtype))
        if len(present) < 2:
            continue
        k = len(present)
        pred = rgb_kmeans(rgb, k, seed=seed) if model is None else predict_labels(model, rgb, k, **(infer or {}))
        s = scores(pred, gt, boundary)
        rows.append({"image": name, "tile": tile, "k": k, **{key: float(s[key]) for key in (KEYS if boundary else FAST_KEYS)}})
    return rows


def cached_score(cache_dir: Path, label: str, model, data, *, settings: dict, log=print) -> list[dict]:
    """``score`` with a cache file ``cache_dir/label.json`` keyed by the settings, the weights
    and the images; a changed key recomputes."""
    names, pairs, tiles = data
    key = {"settings": settings, "weights": weights_digest(model), "images": names}
    path = Path(cache_dir) / f"{label}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["key"] == json.loads(json.dumps(key)):
            return saved["rows"]
    tic = time.perf_counter()
    with torch.no_grad():
        rows = score(model, names, pairs, tiles, infer=settings.get("infer"))
    spent = time.perf_counter() - tic
    log(f"{label}: mIoU {np.mean([r['miou'] for r in rows]):.4f} over {len(rows)} images ({spent:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "rows": rows, "seconds": spent}))
    tmp.replace(path)
    return rows
