"""How much can training the bundled student's architecture lift its head on a held-out tile,
even with labels? A diagnostic, never a method: it reads the masks.

For each leave-one-tile-out fold the architecture (the recipe ``student_dubai_cpu``: tiny CNN,
high-pass input, colour appended, denoising, soft k-means at half resolution) is trained with the
masks of the other tiles: nearest-class-mean cross-entropy in the space the head clusters (each
crop's class means are the prototypes, as if k-means had found the true classes; labels 5 and
255 left out). The held-out tile is then scored the way ``python -m seglib.loto`` scores
(K = classes present, Hungarian mIoU), beside the same initial weights untrained, which is the
protocol's ``student_random``. What this gains over the untrained weights estimates what an
unsupervised objective could at best add to this architecture and head for that much training;
it still rises with more steps (experiments/LOG.md, "How far labels go").

    python -m experiments.supervised_ceiling --data ../shared/data/dubai_aerial_dev \
        --out experiments/supervised_ceiling/supervised_ceiling.json
    python -m experiments.supervised_ceiling --data ../shared/data/dubai_aerial_dev --in-sample --out in_sample.json

``--in-sample`` trains on every tile and scores the same images: what the model can fit at all.
``--arch teacher`` does the same for the teacher's larger network (the recipe ``teacher_synthetic_cpu``)
scored with the bundled student's head (half resolution, 1 k-means iteration, size prior 3).
``--set KEY=VALUE`` changes the architecture or head trained and scored, with the training CLI's
config keys, e.g. ``--set model.encoder.colour_weight=1.0`` (the untrained rows then score that
variant's random weights, no longer the protocol's ``student_random``).
``--pseudo-labels runs/loto2/student_dubai`` trains on each fold model's own segmentation
(K = ``--pseudo-k``) instead of the masks: self-training, which reads no label for training.
``--jitter`` adds the training recipes' photometric jitter to the crops.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seglib import recipes
from seglib.augment import photometric
from seglib.config import AugmentConfig, Config, apply_overrides, parse_set
from seglib.data.tiles import load_labelled_folder
from seglib.evaluation.loto.folds import group_by_tile, paired_difference, summarize, tile_of
from seglib.evaluation.metrics import segmentation_scores
from seglib.inference.predictor import InferenceSettings, Predictor
from seglib.models import load_model
from seglib.models.student import StudentModelConfig, StudentSegmenter
from seglib.models.teacher import MonolithicSegmenter

from ..loto.methods import REAL_HEAD

IGNORE = (5, 255)


def recipe_config(recipe: dict, overrides: dict | None = None) -> Config:
    return apply_overrides(Config.from_dict({k: v for k, v in recipe.items() if k != "stage"}), overrides or {})


def build(arch: str, overrides: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """A freshly initialised model of ``arch`` (student | teacher), with config ``overrides``
    (e.g. ``{"model": {"encoder": {"colour_weight": 1.0}}}``), and its inference settings."""
    if arch == "student":
        return StudentSegmenter(StudentModelConfig.from_config(recipe_config(recipes.STUDENT_DUBAI_CPU, overrides))), {}
    if arch == "teacher":
        return MonolithicSegmenter(recipe_config(recipes.TEACHER_SYNTHETIC_CPU, overrides).model), dict(REAL_HEAD)
    raise ValueError(f"unknown architecture {arch!r}; choose student or teacher")


def shrink(rgb: np.ndarray, labels: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block means of ``rgb`` (H, W, 3) float and the top-left label of each block."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    small = rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean((1, 3))
    return small.astype(np.float32), labels[: h * factor : factor, : w * factor : factor]


def class_mean_loss(emb: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each position against the class means of its own crop, on
    -squared distance / temperature (the head's logits with the true classes as prototypes).
    ``emb`` (B, D, h, w); ``labels`` (B, H, W) taken at the nearest position. Crops with fewer
    than two scored classes are skipped."""
    b, d, h, w = emb.shape
    lab = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest").reshape(b, h * w).long()
    x = emb.float().reshape(b, d, h * w).transpose(1, 2)  # (B, N, D)
    losses = []
    for i in range(b):
        keep = ~torch.isin(lab[i], torch.tensor(IGNORE))
        classes = torch.unique(lab[i][keep])
        if len(classes) < 2:
            continue
        onehot = (lab[i][keep][:, None] == classes[None]).float()  # (N', C)
        means = onehot.T @ x[i][keep] / onehot.sum(0)[:, None]  # (C, D)
        logits = -torch.cdist(x[i][keep], means).square() / temperature
        losses.append(F.cross_entropy(logits, onehot.argmax(1)))
    return torch.stack(losses).mean() if losses else emb.sum() * 0.0


def train_supervised(
    model: torch.nn.Module,
    pairs: list,
    *,
    steps: int,
    crop: int = 128,
    batch: int = 4,
    lr: float = 3e-3,
    temperature: float = 1.0,
    seed: int = 0,
    jitter: bool = False,
) -> list[float]:
    """``steps`` AdamW steps on random crops (flips and quarter turns; with ``jitter`` also the
    training recipes' photometric jitter, ``AugmentConfig``'s defaults) of ``pairs`` (shrunk
    (rgb, labels)); returns the loss of every step. The defaults were set in-sample on tile 1
    of the dev split: at the head's temperature (0.1) the loss did not fall, and lr 3e-3 fit
    more than 1e-3."""
    small = [rgb.shape[:2] for rgb, _ in pairs if min(rgb.shape[:2]) < crop]
    if small:
        raise ValueError(
            f"{len(small)} training image(s) are smaller than the {crop} px crop once shrunk "
            f"(e.g. {small[0]}); leave them out of the folder or pass a smaller crop"
        )
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    history = []
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(batch):
            rgb, lab = pairs[int(rng.integers(len(pairs)))]
            y = int(rng.integers(0, rgb.shape[0] - crop + 1))
            x = int(rng.integers(0, rgb.shape[1] - crop + 1))
            img = torch.from_numpy(rgb[y : y + crop, x : x + crop]).permute(2, 0, 1)
            lbl = torch.from_numpy(lab[y : y + crop, x : x + crop].astype(np.int64))
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            img, lbl = torch.rot90(img, turns, (1, 2)), torch.rot90(lbl, turns, (0, 1))
            if flip:
                img, lbl = img.flip(-1), lbl.flip(-1)
            xs.append(img)
            ys.append(lbl)
        batch_rgb = torch.stack(xs).contiguous()
        if jitter:
            batch_rgb = photometric(
                batch_rgb, [np.random.default_rng(int(rng.integers(2**62))) for _ in xs], AugmentConfig()
            )
        out = model(batch_rgb, 6, downsample=1, full_resolution=False, check_values=False)
        loss = class_mean_loss(out["clustered"], torch.stack(ys), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(float(loss.detach()))
    return history


def pseudo_labelled(checkpoint: Path, train: list, k: int) -> list:
    """``train``'s (rgb, mask) pairs with each mask replaced by the segmentation of the model at
    ``checkpoint`` at ``k`` clusters, its ids moved clear of the ignored labels."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no fold model {checkpoint}; train it with python -m seglib.loto --runs ...")
    model = load_model(checkpoint).eval()
    with torch.no_grad():
        return [(rgb, Predictor(model, k).labels(rgb) + 256) for rgb, _ in train]


def score(model: torch.nn.Module, names: list[str], tiles: list, kind: str, infer: dict | None = None) -> list[dict]:
    """Per-image rows scored as the protocol scores (K = classes present)."""
    model.eval()
    rows = []
    with torch.no_grad():
        for name, (rgb, gt) in zip(names, tiles, strict=True):
            present = np.setdiff1d(np.unique(gt), np.asarray(IGNORE, dtype=gt.dtype))
            if len(present) < 2:
                continue
            labels = Predictor.of(model, len(present), InferenceSettings(**(infer or {}))).labels(rgb)
            s = segmentation_scores(labels, gt, IGNORE)
            rows.append({"image": name, "tile": tile_of(name), "kind": kind, "miou": float(s["miou"])})
    return rows


def run(
    data: Path,
    folds: list[str],
    steps: int,
    in_sample: bool,
    seed: int = 0,
    arch: str = "student",
    overrides: dict | None = None,
    pseudo: Path | None = None,
    pseudo_k: int = 6,
    jitter: bool = False,
) -> dict:
    """Trains and scores every split. With ``pseudo`` (a folder of leave-one-tile-out models,
    ``<fold>/student.pt``, e.g. ``runs/loto2/student_dubai``) the masks are replaced, for
    training only, by that fold model's own segmentation at ``pseudo_k``: self-training, which
    reads no label."""
    if pseudo is not None and in_sample:
        raise ValueError("pseudo-labels come from each fold's model; drop --in-sample or --pseudo-labels")
    names, tiles = load_labelled_folder(data / "images", data / "masks")
    by_tile = group_by_tile(names)
    factor = recipe_config(recipes.STUDENT_DUBAI_CPU).data.downscale  # both architectures are scored at half resolution
    index = {n: i for i, n in enumerate(names)}
    splits = [("in-sample", list(by_tile))] if in_sample else [(f, [t for t in by_tile if t != f]) for f in folds]
    rows, timing = [], {}
    for fold, train_tiles in splits:
        scored = [n for n in names if tile_of(n) in (train_tiles if in_sample else [fold])]
        train = [tiles[index[n]] for t in train_tiles for n in by_tile[t]]
        if pseudo is not None:
            train = pseudo_labelled(pseudo / fold / "student.pt", train, pseudo_k)
        pairs = [shrink(rgb, labels, factor) for rgb, labels in train]
        torch.manual_seed(seed)  # the protocol's student_random: seed 0, untrained
        model, infer = build(arch, overrides)
        rows += score(model, scored, [tiles[index[n]] for n in scored], "untrained", infer)
        tic = time.perf_counter()
        losses = train_supervised(model, pairs, steps=steps, seed=seed, jitter=jitter)
        timing[fold] = time.perf_counter() - tic
        rows += score(model, scored, [tiles[index[n]] for n in scored], "supervised", infer)
        print(
            f"{fold}: loss {np.mean(losses[:50]):.3f} -> {np.mean(losses[-50:]):.3f} in {timing[fold]:.0f} s",
            flush=True,
        )
    untrained = [r for r in rows if r["kind"] == "untrained"]
    supervised = [r for r in rows if r["kind"] == "supervised"]
    return {
        "arch": arch,
        "overrides": overrides or {},
        "labels": "masks" if pseudo is None else f"{pseudo}/<fold>/student.pt at K = {pseudo_k}",
        "jitter": jitter,
        "steps": steps,
        "in_sample": in_sample,
        "train_seconds": timing,
        "untrained": summarize(untrained, keys=("miou",)),
        "supervised": summarize(supervised, keys=("miou",)),
        "difference": paired_difference(supervised, untrained),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.supervised_ceiling",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder with images/ and masks/")
    p.add_argument("--folds", default="", help="tiles to hold out (default: every tile)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--arch", default="student", choices=("student", "teacher"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the architecture or head, e.g. --set model.encoder.colour_weight=1.0 (repeatable)",
    )
    p.add_argument(
        "--pseudo-labels",
        type=Path,
        metavar="DIR",
        help="train on the segmentations of DIR/<fold>/student.pt instead of the masks (self-training)",
    )
    p.add_argument("--pseudo-k", type=int, default=6, help="clusters of those segmentations")
    p.add_argument("--jitter", action="store_true", help="add the training recipes' photometric jitter to the crops")
    p.add_argument("--in-sample", action="store_true", help="train on every tile and score the same images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON result")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    folds = [f for f in args.folds.split(",") if f] or list(group_by_tile(q.stem for q in (data / "images").iterdir()))
    result = run(
        data,
        folds,
        args.steps,
        args.in_sample,
        arch=args.arch,
        overrides=parse_set(args.set),
        pseudo=args.pseudo_labels,
        pseudo_k=args.pseudo_k,
        jitter=args.jitter,
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for kind in ("untrained", "supervised"):
        per = "  ".join(f"{t} {v['miou']:.3f}" for t, v in result[kind]["folds"].items())
        print(f"{kind:10s}  {per}  all {result[kind]['all']['miou']:.3f}")
    d = result["difference"]
    print(f"supervised - untrained: {d['mean']:+.3f} (95 % interval {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})")
    return 0
