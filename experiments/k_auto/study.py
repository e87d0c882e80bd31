"""Which label-free rule should ``--k auto`` use? Every criterion and threshold of
``seglib.inference.kselect`` against the number of ground-truth classes present on labelled
images, the rule chosen inside leave-one-tile-out folds, beside the naive K = 6, the best constant
K of the same folds and the oracle (docs/inference.md, "GIS workflows", has the result).

    python -m experiments.k_auto --images D/images --masks D/masks --ignore 5,255 --out k_auto.json

Prints the summary (the folds' rules and the held-out scores) and writes everything, per image
too, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from seglib.device import set_threads
from seglib.evaluation.metrics import segmentation_scores
from seglib.evaluation.scores import folder_tiles
from seglib.inference.engine import segment_array
from seglib.inference.kselect import DEFAULT_RANGE, RULES, check_k_range, k_statistics, pick_k, rule_name
from seglib.inference.legend import sample_embeddings
from seglib.inference.predictor import Predictor
from seglib.inference.windows import Tiling
from seglib.io.rasters import ArraySource
from seglib.models import load_model

__all__ = ["k_auto_study", "build_parser", "main"]


def _rules() -> list[tuple[str, float | None]]:
    return [(rule, theta) for rule, thetas in RULES.items() for theta in thetas]


def _summary(rows: Sequence[dict], pick: Callable[[dict], int]) -> dict:
    picks = [pick(r) for r in rows]
    truth = [r["n_classes"] for r in rows]
    miou = [r["miou_by_k"][str(k)] for r, k in zip(rows, picks, strict=True)]
    return {
        "exact": float(np.mean([p == t for p, t in zip(picks, truth, strict=True)])) if rows else float("nan"),
        "within_one": float(np.mean([abs(p - t) <= 1 for p, t in zip(picks, truth, strict=True)]))
        if rows
        else float("nan"),
        "miou": float(np.mean(miou)) if rows else float("nan"),
        "picks": picks,
    }


def _best(rows: Sequence[dict], candidates: Sequence, pick_of: Callable) -> tuple:
    """The candidate with the most exact hits on ``rows``; ties: within one, then mean mIoU."""
    scored = []
    for i, cand in enumerate(candidates):
        s = _summary(rows, lambda r, c=cand: pick_of(r, c))
        scored.append((s["exact"], s["within_one"], s["miou"], -i, cand))
    return max(scored, key=lambda t: t[:4])[4]


def _image_row(
    model: torch.nn.Module,
    name: str,
    group: str,
    rgb: np.ndarray,
    gt: np.ndarray,
    *,
    ignore: Sequence[int],
    ks: list[int],
    naive_k: int,
    tiling: Tiling,
) -> dict | None:
    """One image's row of ``k_auto_study``: its statistics per K, each rule's pick and its mIoU at
    every K; None for an image with fewer than 2 classes present."""
    present = np.setdiff1d(np.unique(gt), np.asarray(list(ignore), dtype=gt.dtype))
    if len(present) < 2:
        return None
    image = np.round(np.asarray(rgb) * 255).astype(np.uint8) if rgb.dtype != np.uint8 else rgb
    source = ArraySource(image, name=name)
    embs = sample_embeddings(model, [source], tiling=tiling)[0]
    flipped = sample_embeddings(model, [source], tiling=tiling, flip=True)[0]
    stats = k_statistics(model.head, embs, ks, flipped=flipped, seed=tiling.seed)
    alone = Tiling(tiling.tile, tiling.overlap)  # as seglib.segment fits each image
    miou = {
        str(k): segmentation_scores(segment_array(Predictor(model, k), image, tiling=alone), gt, ignore)["miou"]
        for k in sorted({*ks, naive_k})
    }
    return {
        "image": name,
        "group": group,
        "n_classes": len(present),
        "picks": {rule_name(r): pick_k(stats, *r) for r in _rules()},
        "stats": {
            str(k): {key: v for key, v in s.items() if key != "fit" and isinstance(v, (float, list))}
            for k, s in stats.items()
        },
        "miou_by_k": miou,
    }


@torch.no_grad()
def k_auto_study(
    model: torch.nn.Module,
    names: Sequence[str],
    tiles: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    ignore: Sequence[int] = (5, 255),
    k_range: tuple[int, int] = DEFAULT_RANGE,
    naive_k: int = 6,
    tiling: Tiling | None = None,
    group_of: Callable[[str], str] = lambda name: name.rsplit("t", 1)[-1],
    progress: bool = True,
) -> dict:
    """Every criterion and threshold against the number of ground-truth classes present,
    chosen inside leave-one-group-out folds (the group of ``image_part_003t4`` is ``4``: its
    source tile), beside the naive rule K = ``naive_k`` and the best constant K of the same folds.

    Per image it records the statistics per K, each rule's pick and the image's Hungarian mIoU
    at every K in the range (labels from ``seglib.segment``, the same per-image fit), so a pick
    can also be judged by the mIoU it gives. ``tiling``: the windows and the fit sample (default
    ``Tiling()``).
    """
    tiling = tiling or Tiling()
    lo, hi = check_k_range(k_range)
    ks = list(range(lo, hi + 1))
    rules = _rules()
    rows = []
    for name, (rgb, gt) in tqdm(list(zip(names, tiles, strict=True)), desc="images", disable=not progress):
        row = _image_row(model, name, group_of(name), rgb, gt, ignore=ignore, ks=ks, naive_k=naive_k, tiling=tiling)
        if row is not None:
            rows.append(row)
    names_r = [rule_name(r) for r in rules]
    by_rule = lambda r, rule: r["picks"][rule]  # noqa: E731
    constant = lambda r, k: k  # noqa: E731
    folds = []
    for group in sorted({r["group"] for r in rows}):
        train = [r for r in rows if r["group"] != group]
        test = [r for r in rows if r["group"] == group]
        rule = _best(train, names_r, by_rule)
        const = _best(train, ks, constant)
        folds.append(
            {
                "held_out": group,
                "n_images": len(test),
                "rule": rule,
                "rule_train": _summary(train, lambda r, c=rule: by_rule(r, c)),
                "rule_test": _summary(test, lambda r, c=rule: by_rule(r, c)),
                "constant_k": const,
                "constant_test": _summary(test, lambda r, c=const: c),
                "naive_test": _summary(test, lambda r: naive_k),
                "oracle_test": _summary(test, lambda r: min(max(r["n_classes"], lo), hi)),
            }
        )
    n = sum(f["n_images"] for f in folds)

    def pooled(key: str) -> dict:
        return {
            metric: sum(f[key][metric] * f["n_images"] for f in folds) / max(n, 1)
            for metric in ("exact", "within_one", "miou")
        }

    chosen = [f["rule"] for f in folds]
    return {
        "k_range": [lo, hi],
        "naive_k": naive_k,
        "n_images": n,
        "classes_present": {
            str(c): sum(r["n_classes"] == c for r in rows) for c in sorted({r["n_classes"] for r in rows})
        },
        "folds": folds,
        "held_out": {key: pooled(f"{key}_test") for key in ("rule", "constant", "naive", "oracle")},
        "fold_rules": chosen,
        "majority_rule": max(chosen, key=chosen.count) if chosen else None,  # ties: the earliest fold's
        "all_rules_all_images": {name: _summary(rows, lambda r, c=name: by_rule(r, c)) for name in names_r},
        "per_image": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.k_auto",
        description="Every label-free K criterion against the classes present, chosen in leave-one-tile-out folds "
        "(tile = the name's part after the last 't'), beside the naive K = 6.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", required=True, help="folder of RGB images")
    p.add_argument("--masks", required=True, help="folder of their label PNGs (same stems)")
    p.add_argument("--ignore", default="", help="comma-separated label ids to ignore, e.g. 5,255")
    p.add_argument("--k-range", default=f"{DEFAULT_RANGE[0]}..{DEFAULT_RANGE[1]}", help="the K range of the rules")
    p.add_argument("--checkpoint", default=None, help="the model (default: the bundled one)")
    p.add_argument("--max-side", type=int, default=0, help="shrink larger images to this side first (0: full size)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="runs/k_auto/k_auto.json", help="JSON result")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        k_range = check_k_range(args.k_range)
    except ValueError as exc:
        parser.error(f"--k-range: {exc}")
    ignore = [int(v) for v in args.ignore.split(",") if v.strip()]
    set_threads(args.threads)
    try:
        model = load_model(args.checkpoint)
        names, tiles = folder_tiles(args.images, args.masks, max_side=args.max_side)
    except (ValueError, FileNotFoundError) as exc:  # ImageReadError and CheckpointError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    full = k_auto_study(model, names, tiles, ignore=ignore, k_range=k_range)
    head = {"checkpoint": args.checkpoint or "bundled default", "torch": torch.__version__}
    summary = {key: v for key, v in full.items() if key not in ("per_image", "all_rules_all_images")}
    full = dict(head, **full, seconds=round(time.perf_counter() - tic, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1, default=float))
    print(json.dumps(dict(head, **summary), indent=1, default=float))
    print(f"wrote {out}", file=sys.stderr)
    return 0
