"""Leave-one-tile-out linear probe of what a model's clustered embedding knows about the land-cover
classes: a diagnostic (it reads the masks of the four training tiles), not a segmentation method.

    python -m experiments.ucmerced.pixel_probe --data ../shared/data/dubai_aerial_dev \
        --model scene=runs/ucmp/scene/shared/scene.pt --model random=runs/ucmp/scene_random/shared/scene.pt \
        --out pixel_probe.json

For each model the embedding its head clusters (``Segmenter.embed`` of the image shrunk as the
head reads it: learned channels unit-normalised, then colour) is read at every cell; for each
held-out tile, a multinomial logistic regression (``seglib.evaluation.probe.linear_predict``) is
fitted on cells of the other four tiles (``--cells`` sampled per image, the class at the cell's
centre pixel, labels 5 and 255 left out) and labels the held-out tile's cells. Score: per image,
the IoU of each class present (cells), averaged, then over images (images with fewer than 2
classes skipped). ``colour`` is the embedding's colour channels alone. If a linear read-out of the
scene model's embedding beats random weights on unseen tiles by far more than the label-free head
does, the features know the classes and the per-image clustering is what loses it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from seglib.data.tiles import load_labelled_folder
from seglib.evaluation.loto.folds import TILE_PATTERN, group_by_tile
from seglib.evaluation.probe import linear_predict
from seglib.kernels.pooling import mean_pool
from seglib.models import load_model

from . import dense, fusion  # noqa: F401  (their checkpoint kinds load too)

IGNORE = (5, 255)


@torch.no_grad()
def cell_embeddings(model, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int], int]:
    """(embeddings (h * w, D), (h, w), cell side in pixels) of an (H, W, 3) float image."""
    ds = model.config.downsample
    multiple = model.input_multiple * ds
    h, w = (rgb.shape[0] // multiple) * multiple, (rgb.shape[1] // multiple) * multiple
    x = torch.from_numpy(np.ascontiguousarray(rgb[:h, :w])).permute(2, 0, 1)[None].float()
    x = mean_pool(x, ds) if ds > 1 else x
    emb, _ = model.embed(x)
    return emb[0].flatten(1).T.numpy(), tuple(emb.shape[-2:]), 4 * ds


def cell_labels(gt: np.ndarray, grid: tuple[int, int], side: int) -> np.ndarray:
    c = side // 2
    return gt[c : c + side * grid[0] : side, c : c + side * grid[1] : side][: grid[0], : grid[1]].reshape(-1)


def image_miou(pred: np.ndarray, gt: np.ndarray) -> float | None:
    keep = ~np.isin(gt, IGNORE)
    pred, gt = pred[keep], gt[keep]
    present = np.unique(gt)
    if len(present) < 2:
        return None
    return float(np.mean([((pred == c) & (gt == c)).sum() / ((pred == c) | (gt == c)).sum() for c in present]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled folder with images/ and masks/")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--cells", type=int, default=1500, help="training cells sampled per image")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    names, pairs = load_labelled_folder(data / "images", data / "masks")
    tiles = group_by_tile(names, TILE_PATTERN)
    tile_of = {n: t for t, ns in tiles.items() for n in ns}
    result = {"command": "python -m experiments.ucmerced.pixel_probe " + " ".join(argv or __import__("sys").argv[1:])}
    result["models"] = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        model = load_model(path).eval()
        tic = time.perf_counter()
        feats = {}
        for n, (rgb, gt) in zip(names, pairs, strict=True):
            x, grid, side = cell_embeddings(model, rgb)
            feats[n] = (x, cell_labels(gt, grid, side))
        views = {name: lambda x: x, f"{name}:colour": lambda x: x[:, -3:]}
        for view, take in views.items():
            if view in result["models"]:
                continue
            rows = []
            for fold in tiles:
                rng = np.random.default_rng(0)
                tx, ty = [], []
                for n in names:
                    if tile_of[n] == fold:
                        continue
                    x, y = feats[n]
                    ok = np.flatnonzero(~np.isin(y, IGNORE))
                    pick = rng.choice(ok, min(args.cells, len(ok)), replace=False)
                    tx.append(take(x[pick]))
                    ty.append(y[pick])
                held = tiles[fold]
                test = [take(feats[n][0]) for n in held]
                pred = linear_predict(np.concatenate(tx), np.concatenate(ty), np.concatenate(test))
                for n, part in zip(held, np.split(pred, np.cumsum([len(t) for t in test])[:-1]), strict=True):
                    miou = image_miou(part, feats[n][1])
                    if miou is not None:
                        rows.append({"image": n, "tile": fold, "miou": miou})
            by = {t: float(np.mean([r["miou"] for r in rows if r["tile"] == t])) for t in tiles}
            result["models"][view] = {"path": path, "all": float(np.mean([r["miou"] for r in rows])), "folds": by}
            result["models"][view]["rows"] = rows
            print(f"{view}: {result['models'][view]['all']:.4f} {by} ({time.perf_counter() - tic:.0f} s)", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
