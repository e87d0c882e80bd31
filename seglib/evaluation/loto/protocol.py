"""The leave-one-tile-out protocol: every method on every fold in one run (``run_protocol``),
per-fold caches of models and scores, the table (``format_table``) and the JSON; the command
``python -m seglib.loto`` (``seglib/loto.py``) describes each step."""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .folds import TILE_PATTERN, group_by_tile, nested_choice, paired_difference, summarize
from .methods import (
    DEFAULT_METHODS,
    FoldContext,
    LotoError,
    Method,
    fold_artifact,
    fold_model,
    get_method,
    is_reference,
    link_training_images,
    load_plugin,
    trains_on_folder,
)

__all__ = ["run_protocol", "format_table", "loto_result", "SCORE_KEYS"]

SCORE_KEYS = ("miou", "pixel_acc", "m2o_miou", "boundary_f1")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _artifacts(method: Method, ctx: FoldContext, fold: str) -> list[str]:
    """Content hashes of the trained files a method's labels depend on (for the score cache)."""
    if method.kind == "kmeans":
        return []
    if method.kind == "random":
        return _artifacts(get_method(method.random_of), ctx, fold)
    if method.eval_of:
        return _artifacts(get_method(method.eval_of), ctx, fold)
    return [_sha(fold_artifact(method, ctx, fold))]


def _score_images(
    method: Method, model, tiles, names, tile: str, k, ignore, seed: int, boundary: bool = True
) -> list[dict]:
    from ...inference.predictor import InferenceSettings, Predictor
    from ..baselines import rgb_kmeans
    from ..metrics import confusion, hungarian_scores, many_to_one_scores, segmentation_scores

    rows = []
    settings = InferenceSettings(**method.infer)
    if method.adapt:
        from ...inference.adapt import adapt
        from ...io.rasters import ArraySource
    for name, (rgb, gt) in zip(names, tiles, strict=True):
        present = np.setdiff1d(np.unique(gt), np.asarray(list(ignore), dtype=gt.dtype))
        if len(present) < 2:
            continue
        kk = len(present) if k == "present" else int(k)
        extra = {}
        if method.kind == "kmeans":
            pred = rgb_kmeans(rgb, kk, seed=seed)
        elif method.adapt:
            tic = time.perf_counter()
            source = ArraySource((rgb * 255).round().astype(np.uint8))
            adapted = adapt(model, source, progress=False, **method.adapt)
            extra["adapt_seconds"] = time.perf_counter() - tic
            extra["megapixels"] = rgb.shape[0] * rgb.shape[1] / 1e6
            pred = Predictor.of(adapted, kk, settings).labels(rgb)
        else:
            pred = Predictor.of(model, kk, settings).labels(rgb)
        if boundary:
            s = segmentation_scores(pred, gt, ignore)
        else:  # the boundary F1 (distance transforms at full resolution) is the slowest score
            matrix, _ = confusion(pred, gt, ignore)
            s = {**hungarian_scores(matrix), "m2o_miou": many_to_one_scores(matrix)["miou"]}
        keys = SCORE_KEYS if boundary else tuple(key for key in SCORE_KEYS if key != "boundary_f1")
        rows.append({"image": name, "tile": tile, "k": kk, **{key: float(s[key]) for key in keys}, **extra})
    return rows


def _tiles_and_folds(
    images: Path, masks: Path, folds: Sequence[str] | None, tile_pattern: str
) -> tuple[dict[str, list[str]], set[str], list[str]]:
    """({tile: image stems}, the stems with a mask, the folds to run); ``LotoError`` when the
    folder has fewer than 2 tiles or a fold is not one of them."""
    from ...io.images import list_images

    all_stems = [p.stem for p in list_images(images)]
    labelled = {s for s in all_stems if (masks / f"{s}.png").is_file()}
    tiles = group_by_tile(all_stems, tile_pattern)
    if len(tiles) < 2:
        raise LotoError(
            f"{images}: found {len(tiles)} tile id(s) with --tile-pattern {tile_pattern!r}; "
            "leave-one-tile-out needs images of at least 2 tiles (names like image_part_001t1)"
        )
    chosen = list(folds) if folds else list(tiles)
    unknown = [f for f in chosen if f not in tiles]
    if unknown:
        raise LotoError(f"unknown fold(s) {unknown}; the tiles of {images} are {', '.join(tiles)}")
    return tiles, labelled, chosen


def _method_summary(method: Method, rows: list[dict], seconds: float, runs: Path, chosen: Sequence[str]) -> dict:
    """A method's entry of the result: what it is, its pooled and per-fold scores, its times."""
    train_seconds = {}
    for fold in chosen:
        rec = runs / (method.eval_of or method.name) / (fold if method.per_fold else "shared") / "loto.json"
        if method.kind == "trained" and rec.is_file():
            train_seconds[fold if method.per_fold else "shared"] = json.loads(rec.read_text()).get("train_seconds")
    return {
        "kind": method.kind,
        "about": method.about,
        "recipe": method.recipe if isinstance(method.recipe, str) else method.overrides() or None,
        "teacher": method.teacher,
        "random_of": method.random_of,
        "eval_of": method.eval_of,
        "infer": method.infer,
        "attrs": method.attrs,
        "adapt": method.adapt,
        **summarize(rows, SCORE_KEYS),
        "eval_seconds": round(seconds, 1),
        "adapt_seconds_per_megapixel": _per_megapixel(rows),
        "train_seconds": train_seconds,
    }


def _comparisons(resolved: Sequence[Method], rows: dict[str, list[dict]], compare: Sequence[tuple[str, str]]) -> dict:
    """Paired differences: those asked for, each random-weight method against its trained twin
    (same head), each trained method against RGB k-means."""
    pairs = list(compare)
    for m in resolved:
        if m.kind == "random":  # its twin: the trained models it copies, scored with the same head
            twins = [
                o.name
                for o in resolved
                if o.kind == "trained" and (o.eval_of or o.name) == m.random_of and o.infer == m.infer
                if not (o.adapt or o.attrs)
            ]
            pairs += [(twin, m.name) for twin in twins[:1]]
        if m.kind == "trained" and "rgb_kmeans" in rows:
            pairs.append((m.name, "rgb_kmeans"))
    comparisons = {}
    for a, b in dict.fromkeys(pairs):
        if a not in rows or b not in rows:
            raise LotoError(f"--compare {a}:{b}: both methods must be in the run")
        comparisons[f"{a} - {b}"] = paired_difference(rows[a], rows[b])
    return comparisons


def _fold_scores(
    method: Method,
    ctx: FoldContext,
    fold: str,
    key: dict,
    fold_tiles,
    *,
    k: int | str,
    ignore: Sequence[int],
    seed: int,
    boundary: bool = True,
) -> tuple[list[dict], float]:
    """(rows, seconds) of ``method`` on ``fold``'s images: from the cache beside its fold model
    when ``key`` (everything the scores depend on) matches, else scored now and cached."""
    where = ctx.runs / method.name / fold
    cache = where / "scores.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved["rows"], saved.get("seconds", 0.0)
    names, tiles = fold_tiles()
    model = None if method.kind == "kmeans" else fold_model(method, ctx, fold).to(ctx.device)
    tic = time.perf_counter()
    rows = _score_images(method, model, tiles, names, fold, k, ignore, seed, boundary)
    spent = time.perf_counter() - tic
    ctx.log(f"[loto] {fold} {method.name}: mIoU {np.mean([r['miou'] for r in rows]):.4f} ({spent:.0f} s)")
    where.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "rows": rows, "seconds": spent}))
    tmp.replace(cache)
    return rows, spent


def _resolve_methods(
    methods: Sequence[str], select: dict[str, list[str]], extra_images: str | Path | None, transfer: bool
) -> tuple[list, list[str]]:
    """(the registered methods of ``methods`` and of the nested choices ``select``, the names of
    the reference methods of a ``transfer`` run); ``LotoError`` where the methods do not fit the
    run (extra images none of them trains on; a transfer run with a method that trains on the folder)."""
    resolved = [get_method(name) for name in methods]
    for names in select.values():
        for name in names:
            if name not in methods:
                resolved.append(get_method(name))
                methods = [*methods, name]
    if extra_images is not None and not any(m.extra_images or m.build for m in resolved):
        raise LotoError(
            f"--extra-images {extra_images}: none of the methods trains on extra images (none has "
            "Method.extra_images or a build; experiments/ucmerced/methods.py registers some)"
        )
    references = [m.name for m in resolved if is_reference(m)] if transfer else []
    if transfer:
        seen = [m.name for m in resolved if trains_on_folder(m) and m.name not in references]
        if seen:
            raise LotoError(
                f"a transfer run scores models that never saw the folder, but {', '.join(seen)} train on its tiles; "
                "leave them out or run without --transfer"
            )
    return resolved, references


def _score_folds(
    resolved: list,
    ctx: FoldContext,
    folds_of: dict[str, list[str]],
    masks: Path,
    *,
    k,
    ignore,
    seed: int,
    boundary: bool,
) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Every method on every fold (``folds_of``: fold -> its labelled image names): (method ->
    the rows of its scored images, method -> seconds spent). A fold's images are read once,
    when the first method that is not cached needs them."""
    from ...data.tiles import load_labelled_folder

    rows: dict[str, list[dict]] = {m.name: [] for m in resolved}
    seconds: dict[str, float] = {m.name: 0.0 for m in resolved}
    key_base = {"k": k, "ignore": list(ignore), "seed": seed, **({} if boundary else {"boundary": False})}
    for fold, fold_names in folds_of.items():
        loaded: list = []  # the fold's labelled images, read once when a method needs them

        def fold_tiles(fold_names: list[str] = fold_names, loaded: list = loaded) -> tuple:
            if not loaded:
                loaded.append(load_labelled_folder(ctx.images, masks, include=[glob.escape(n) for n in fold_names]))
            return loaded[0]

        for method in resolved:
            key = dict(key_base, infer=method.infer, images=fold_names, models=_artifacts(method, ctx, fold))
            if method.attrs:
                key["attrs"] = method.attrs
            if method.adapt:
                key["adapt"] = method.adapt
            fold_rows, spent = _fold_scores(
                method, ctx, fold, key, fold_tiles, k=k, ignore=ignore, seed=seed, boundary=boundary
            )
            rows[method.name].extend(fold_rows)
            seconds[method.name] += spent
    return rows, seconds


def run_protocol(
    *,
    images: str | Path,
    masks: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    folds: Sequence[str] | None = None,
    runs: str | Path = "runs/loto",
    k: int | str = "present",
    ignore: Sequence[int] = (5, 255),
    seed: int = 123,
    tile_pattern: str = TILE_PATTERN,
    threads: int = 1,
    device: str = "cpu",
    train: bool = True,
    select: dict[str, Sequence[str]] | None = None,
    compare: Sequence[tuple[str, str]] = (),
    extra_images: str | Path | None = None,
    transfer: bool = False,
    boundary: bool = True,
    log=print,
) -> dict:
    """Train (or reuse) every method's fold models, score every held-out image, aggregate.

    Scores are cached per method and fold (``scores.json`` beside the fold model, keyed by
    everything they depend on). ``boundary=False`` leaves the boundary F1 out of the scores (it
    costs as much as the rest). ``extra_images``: a folder of images that joins every fold's
    training images (never scored; ``link_training_images``). ``transfer``: a transfer run, where
    no model may have trained on the labelled folder (``trains_on_folder``): every image is then
    scored by models that never saw any tile of it, except the ``references`` (``saw_folder``
    models such as the bundled student, listed in the result). Returns the result that
    ``python -m seglib.loto`` writes as JSON."""
    from ...device import set_threads

    set_threads(threads)
    images, masks, runs = Path(images), Path(masks), Path(runs)
    tiles, labelled, chosen = _tiles_and_folds(images, masks, folds, tile_pattern)
    ctx = FoldContext(images=images, runs=runs, tiles=tiles, threads=threads, device=device, train=train, log=log)
    if extra_images is not None:
        ctx.extra_images = Path(extra_images)
        ctx.train_dir = link_training_images(images, ctx.extra_images, runs, tile_pattern)
    select = {label: list(names) for label, names in (select or {}).items()}
    resolved, references = _resolve_methods(methods, select, extra_images, transfer)
    folds_of = {fold: [n for n in tiles[fold] if n in labelled] for fold in chosen}
    rows, seconds = _score_folds(resolved, ctx, folds_of, masks, k=k, ignore=ignore, seed=seed, boundary=boundary)
    return {
        "protocol": {
            "images": str(images),
            "masks": str(masks),
            "extra_images": None if extra_images is None else str(extra_images),
            "transfer": transfer,
            "references": references,
            "boundary_f1": boundary,
            "k": k,
            "ignore": list(ignore),
            "kmeans_seed": seed,
            "tile_pattern": tile_pattern,
            "folds": folds_of,
            "threads": threads,
            "device": device,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
        },
        "methods": {m.name: _method_summary(m, rows[m.name], seconds[m.name], runs, chosen) for m in resolved},
        "comparisons": _comparisons(resolved, rows, compare),
        "nested": {label: nested_choice({n: rows[n] for n in names}) for label, names in select.items()},
        "per_image": rows,
    }


def _per_megapixel(rows: Sequence[dict]) -> float | None:
    """Adaptation seconds per megapixel of image, over the rows that were adapted."""
    timed = [r for r in rows if "adapt_seconds" in r]
    if not timed:
        return None
    return round(sum(r["adapt_seconds"] for r in timed) / sum(r["megapixels"] for r in timed), 2)


def format_table(result: dict) -> str:
    """The printed table: every method's mIoU per fold and pooled, and its margin over k-means."""
    methods = result["methods"]
    folds = list(result["protocol"]["folds"])
    base = methods.get("rgb_kmeans", {}).get("all", {}).get("miou")
    width = max(12, *(len(n) for n in methods)) + 2
    head = f"{'method':<{width}}" + "".join(f"{f:>8}" for f in folds) + f"{'all':>8}{'vs k-means':>12}"
    first = next(iter(methods.values()))
    counts = " " * width + "".join(f"{'n=' + str(first['folds'].get(f, {}).get('n', 0)):>8}" for f in folds)
    lines = [head, counts]
    for name, m in methods.items():
        cells = "".join(f"{m['folds'].get(f, {}).get('miou', float('nan')):>8.3f}" for f in folds)
        margin = "" if base is None or name == "rgb_kmeans" else f"{m['all']['miou'] - base:>+12.3f}"
        lines.append(f"{name:<{width}}{cells}{m['all']['miou']:>8.3f}{margin}")
    for label, sel in result.get("nested", {}).items():
        picks = ", ".join(f"{f}: {c['method']}" for f, c in sel["choices"].items())
        lines.append(
            f"nested {label}: {sel['nested']:.3f} (choices {picks}); "
            f"best pooled mean over all folds (optimistic): {sel['optimistic_method']} {sel['optimistic']:.3f}"
        )
    for label, cmp in result.get("comparisons", {}).items():
        lo, hi = cmp["ci95"]
        lines.append(
            f"{label}: {cmp['mean']:+.3f} (95 % interval over images {lo:+.3f} to {hi:+.3f}; "
            f"better on {cmp['images_better']}/{cmp['n']})"
        )
    return "\n".join(lines)


def loto_result(
    path: str | Path,
    *,
    recompute: bool = False,
    data: str | Path = "",
    methods: Sequence[str] = (),
    runs: str | Path = "runs/loto",
    threads: int = 1,
    out: str | Path | None = None,
    plugins: Sequence[str] = (),
) -> dict:
    """A protocol result: the JSON at ``path`` (relative paths are taken from the repository
    root), or, with ``recompute``, a new run on ``data`` (a folder with images/ and masks/) of
    ``methods`` (default: those of the JSON) with the JSON's nested selections, written to
    ``out``; ``plugins`` (``load_plugin``; .py paths from the repository root too) register the
    methods that are not shipped first. What notebook 06 shows; CI reads the committed JSON, a
    full run takes hours."""
    from ...paths import REPO_ROOT

    def resolve(p: str | Path) -> Path:
        return Path(p) if Path(p).is_absolute() else REPO_ROOT / p

    saved = json.loads(resolve(path).read_text()) if resolve(path).is_file() else None
    if not recompute:
        if saved is None:
            raise FileNotFoundError(f"no protocol result at {resolve(path)}; run python -m seglib.loto --out {path}")
        return saved
    if not data:
        raise ValueError("recompute needs data: a folder with images/ and masks/")
    for plugin in plugins:
        load_plugin(str(resolve(plugin)) if plugin.endswith(".py") else plugin)
    methods = list(methods) or list((saved or {}).get("methods", DEFAULT_METHODS))
    select = {label: sel["candidates"] for label, sel in (saved or {}).get("nested", {}).items()}
    result = run_protocol(
        images=resolve(data) / "images",
        masks=resolve(data) / "masks",
        methods=methods,
        runs=resolve(runs),
        threads=threads,
        select=select,
    )
    if out is not None:
        resolve(out).parent.mkdir(parents=True, exist_ok=True)
        resolve(out).write_text(json.dumps(result, indent=1))
    return result
