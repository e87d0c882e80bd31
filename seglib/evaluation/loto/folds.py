"""Folds of a leave-one-tile-out protocol, and the numbers computed from its per-image scores.

Images are grouped by the source tile their name encodes (``image_part_003t5`` -> ``t5``, by
the regular expression ``TILE_PATTERN``). Fold ``t5`` trains on the images of every other tile
and scores the images of ``t5``; every image is scored exactly once, by the model of its own
fold, so the pooled mean over all folds is an estimate for unseen tiles.

``summarize`` turns per-image rows into image-weighted means (overall and per fold);
``nested_choice`` reports a selection among several methods where the choice for fold f
is made from the other folds' scores only (no mask of f is used), beside the optimistic
"best pooled mean" that a plain comparison over all folds would report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "TILE_PATTERN",
    "tile_of",
    "group_by_tile",
    "summarize",
    "nested_choice",
    "paired_difference",
]

TILE_PATTERN = r"t(\d+)$"  # the dev split's names: image_part_<P>t<T>


def tile_of(name: str, pattern: str = TILE_PATTERN) -> str | None:
    """The tile id ``t<T>`` of an image stem, or None when the name carries none."""
    m = re.search(pattern, name)
    if m is None:
        return None
    return f"t{m.group(1)}" if m.groups() else m.group(0)


def group_by_tile(names: Iterable[str], pattern: str = TILE_PATTERN) -> dict[str, list[str]]:
    """{tile: sorted image stems} for every name that carries a tile id (sorted by tile)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        tile = tile_of(name, pattern)
        if tile is not None:
            groups.setdefault(tile, []).append(name)
    return {t: sorted(groups[t]) for t in sorted(groups, key=_tile_key)}


def _tile_key(tile: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", tile)
    return (int(digits) if digits else 0, tile)


def summarize(rows: Sequence[Mapping], keys: Sequence[str] = ("miou", "pixel_acc", "m2o_miou")) -> dict:
    """Image-weighted means of per-image ``rows`` (each with ``tile`` and the ``keys``):
    {"all": {key: mean, "n": images}, "folds": {tile: {key: mean, "n": images}}}."""

    def means(subset: Sequence[Mapping]) -> dict:
        out = {k: float(np.mean([r[k] for r in subset])) for k in keys if subset and k in subset[0]}
        out["n"] = len(subset)
        return out

    tiles = sorted({r["tile"] for r in rows}, key=_tile_key)
    return {"all": means(rows), "folds": {t: means([r for r in rows if r["tile"] == t]) for t in tiles}}


def nested_choice(per_method: Mapping[str, Sequence[Mapping]], key: str = "miou") -> dict:
    """Choose among ``per_method`` (name -> per-image rows with ``tile`` and ``key``) inside
    the folds.

    For each fold f the method with the highest image-weighted mean over the images of the
    other folds is chosen, and its score on f's images is what counts: no ground truth of f
    enters the choice for f. Returns the per-fold choices, the pooled nested mean and, for
    comparison, the optimistic pick: the method with the best pooled mean over all folds."""
    names = list(per_method)
    if not names:
        raise ValueError("nested_choice needs at least one method")
    tiles = sorted({r["tile"] for r in per_method[names[0]]}, key=_tile_key)
    for name in names[1:]:
        if sorted({r["tile"] for r in per_method[name]}, key=_tile_key) != tiles:
            raise ValueError(f"{name} was scored on other folds than {names[0]}; score every method on the same folds")
    choices, held_out = {}, []
    for tile in tiles:
        inner = {n: np.mean([r[key] for r in per_method[n] if r["tile"] != tile] or [np.nan]) for n in names}
        best = max(names, key=lambda n: (np.nan_to_num(inner[n], nan=-np.inf), -names.index(n)))
        choices[tile] = {"method": best, "inner_mean": float(inner[best])}
        held_out.extend(r for r in per_method[best] if r["tile"] == tile)
    pooled = {n: float(np.mean([r[key] for r in per_method[n]])) for n in names}
    optimistic = max(names, key=lambda n: pooled[n])
    nested = summarize(held_out, keys=(key,))
    return {
        "candidates": names,
        "choices": choices,
        "nested": nested["all"][key],
        "nested_folds": {t: v[key] for t, v in nested["folds"].items()},
        "optimistic_method": optimistic,
        "optimistic": pooled[optimistic],
    }


def paired_difference(a: Sequence[Mapping], b: Sequence[Mapping], key: str = "miou", seed: int = 0) -> dict:
    """Mean per-image difference a - b over the images both scored, with a 95 % bootstrap
    interval over images and the per-fold differences."""
    bmap = {r["image"]: r for r in b}
    pairs = [(r["tile"], r[key] - bmap[r["image"]][key]) for r in a if r["image"] in bmap]
    if not pairs:
        raise ValueError("the two methods share no scored image")
    diffs = np.array([d for _, d in pairs])
    rng = np.random.default_rng(seed)
    boot = diffs[rng.integers(0, len(diffs), (2000, len(diffs)))].mean(1)
    tiles = sorted({t for t, _ in pairs}, key=_tile_key)
    return {
        "mean": float(diffs.mean()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "images_better": int((diffs > 0).sum()),
        "n": len(diffs),
        "folds": {t: float(np.mean([d for tt, d in pairs if tt == t])) for t in tiles},
    }
