"""How many cells does a shared legend's k-means need? The legend fitted on a bottom-k sample of
``B`` cells (``seglib.inference.budget``) for several budgets ``B`` and sampling seeds, against
the fit on every cell.

    python -m experiments.legend_budget --scenes ../shared/data/ucmerced_landuse/images \\
        --dev ../shared/data/dubai_aerial_dev --out experiments/legend_budget/legend_budget.json

Two measurements, in one run:

* **UC Merced** (no pixel labels: nothing here can fit a test set): legends at K = 6 and 12
  fitted on every 4th scene (525 files, ~540,000 cells), for each budget and seed. Each labels a
  fixed set of 105 other scenes; two legends' label maps are compared by their pixel agreement
  after matching the legends' clusters one-to-one (Hungarian). ``to_all_cells``: each budget's
  legends against the legend fitted on every cell; ``between_seeds``: a budget's legends against
  each other (how much the sample alone moves the legend).
* **Dubai development split**: the shared legend of its 45 images (K = 5 classes, labels 5 and
  255 left out) for each budget and seed, scored as ``seglib.evaluation.scores.evaluate_shared``
  scores it (one Hungarian matching over all images, so the all-Land image counts too), beside
  RGB k-means with one shared fit and the same model at random weights (the package's budget,
  ``MAX_POSITIONS``). No setting is chosen here: this says whether the budget moves the score.

The seed changes only the sample (the cells' keys, and the windows of images larger than a
tile); the k-means's initialisation is deterministic given the cells.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from seglib.device import set_threads
from seglib.evaluation.baselines import shared_rgb_kmeans
from seglib.evaluation.metrics import hungarian_scores
from seglib.evaluation.scores import dataset_confusion, folder_tiles
from seglib.inference.engine import segment_array
from seglib.inference.kselect import label_agreement
from seglib.inference.legend import MAX_POSITIONS, fit_sources
from seglib.inference.predictor import Predictor
from seglib.inference.windows import Tiling
from seglib.io.images import IMAGE_SUFFIXES, read_image
from seglib.io.rasters import ArraySource
from seglib.models import load_model, random_init_like

ALL_CELLS = 1 << 20  # more than the fit files' cells: the reference legend uses every cell

__all__ = ["agreement", "legend_budget_study", "build_parser", "main"]


def agreement(a: list[np.ndarray], b: list[np.ndarray], k: int) -> float:
    """Share of pixels with the same label once the clusters of ``b`` are matched one-to-one to
    those of ``a``, over all the label maps of each list (``label_agreement``)."""
    return label_agreement(np.concatenate([x.ravel() for x in a]), np.concatenate([y.ravel() for y in b]), k)


def _uint8(rgb: np.ndarray) -> np.ndarray:
    """An image as uint8 RGB (the readers give float [0, 1]), as the rasters the legend serves hold it."""
    return rgb if rgb.dtype == np.uint8 else np.round(rgb * 255).astype(np.uint8)


def _labels(model, legend, k: int, images: list[np.ndarray]) -> list[np.ndarray]:
    predictor = Predictor(model, k, clusters=legend.head_clusters())
    return [segment_array(predictor, image) for image in images]


def _scenes(folder: Path) -> tuple[list[Path], list[np.ndarray]]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    fit = files[::4]
    return fit, [_uint8(read_image(p)[0]) for p in files[2::20]]  # none of the held-out scenes in the fit


def _scenes_part(model, folder: Path, budgets: list[int], seeds: list[int], ks: list[int], log) -> dict:
    fit_files, held = _scenes(folder)
    out: dict = {"fit_files": len(fit_files), "labelled_scenes": len(held), "by_k": {}}
    for k in ks:
        start = time.time()
        everything = fit_sources(model, fit_files, k, tiling=Tiling(), max_positions=ALL_CELLS)
        if everything.meta["positions"] >= ALL_CELLS:
            raise ValueError(f"more than {ALL_CELLS} cells in the fit files: raise ALL_CELLS")
        reference = _labels(model, everything, k, held)
        maps = {
            (b, s): _labels(model, fit_sources(model, fit_files, k, tiling=Tiling(seed=s), max_positions=b), k, held)
            for b in budgets
            for s in seeds
        }
        rows = {}
        for b in budgets:
            to_all = [agreement(reference, maps[b, s], k) for s in seeds]
            between = [agreement(maps[b, s], maps[b, t], k) for s, t in itertools.combinations(seeds, 2)]
            rows[str(b)] = {
                "to_all_cells": {"mean": float(np.mean(to_all)), "min": float(np.min(to_all)), "each": to_all},
                "between_seeds": {"mean": float(np.mean(between)), "min": float(np.min(between)), "each": between},
            }
            log(
                f"UC Merced K={k} budget {b:>7}: agreement with every cell {np.mean(to_all):.4f} "
                f"(min {np.min(to_all):.4f}), between seeds {np.mean(between):.4f} (min {np.min(between):.4f})"
            )
        out["by_k"][str(k)] = {
            "all_cells": int(everything.meta["positions"]),
            "budgets": rows,
            "seconds": round(time.time() - start, 1),
        }
    return out


def _dev_part(model, dev: Path, budgets: list[int], seeds: list[int], log) -> dict:
    ignore = (5, 255)
    _, tiles = folder_tiles(dev / "images", dev / "masks")
    images = [_uint8(rgb) for rgb, _ in tiles]
    gts = [gt for _, gt in tiles]
    classes = np.setdiff1d(np.unique(np.concatenate([np.unique(g) for g in gts])), np.asarray(ignore))
    k = len(classes)

    def score(labels: list[np.ndarray]) -> float:
        return hungarian_scores(dataset_confusion(labels, gts, k, classes))["miou"]

    out: dict = {"images": len(images), "k": k, "ignore": list(ignore), "model": {}}
    for b in budgets:
        scores = []
        for s in seeds:
            legend = fit_sources(model, [ArraySource(i) for i in images], k, tiling=Tiling(seed=s), max_positions=b)
            scores.append(score(_labels(model, legend, k, images)))
        out["model"][str(b)] = {
            "dataset_miou": scores,
            "mean": float(np.mean(scores)),
            "cells": int(legend.meta["positions"]),
        }
        log(
            f"Dubai dev K={k} budget {b:>7}: shared-legend mIoU {np.mean(scores):.4f} "
            f"({', '.join(f'{x:.4f}' for x in scores)})"
        )
    random = random_init_like(model)
    legend = fit_sources(random, [ArraySource(i) for i in images], k, tiling=Tiling(), max_positions=MAX_POSITIONS)
    out["random_init"] = score(_labels(random, legend, k, images))
    out["rgb_kmeans_shared"] = score(shared_rgb_kmeans([i.astype(np.float32) / 255 for i in images], k, seed=0)[0])
    log(f"Dubai dev K={k}: random weights {out['random_init']:.4f}, RGB k-means {out['rgb_kmeans_shared']:.4f}")
    return out


def legend_budget_study(
    scenes: Path | None, dev: Path | None, budgets: list[int], seeds: list[int], ks: list[int], log=print
) -> dict:
    model = load_model(None)
    result: dict = {"budgets": budgets, "seeds": seeds, "random_init_budget": MAX_POSITIONS}
    if scenes is not None:
        result["ucmerced"] = _scenes_part(model, scenes, budgets, seeds, ks, log)
    if dev is not None:
        result["dubai_dev"] = _dev_part(model, dev, budgets, seeds, log)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.legend_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=Path, help="UC Merced's images folder (one subfolder per scene class)")
    p.add_argument("--dev", type=Path, help="the Dubai development split (images/ and masks/)")
    p.add_argument("--budgets", type=int, nargs="+", default=[1 << 16, 1 << 17, 1 << 18])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, nargs="+", default=[6, 12], help="UC Merced's K values")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scenes is None and args.dev is None:
        print("error: give --scenes, --dev or both", file=sys.stderr)
        return 2
    set_threads(args.threads)
    logging.getLogger("seglib").setLevel(logging.ERROR)  # a shared legend leaves some labels out of a scene: expected
    start = time.time()
    result = legend_budget_study(args.scenes, args.dev, args.budgets, args.seeds, args.k)
    result["command"] = "python -m experiments.legend_budget " + " ".join(argv if argv is not None else sys.argv[1:])
    result["seconds"] = round(time.time() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0
