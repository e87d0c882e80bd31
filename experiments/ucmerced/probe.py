"""Representation probe: scene-class accuracy of pooled features on UC Merced.

Only the images of the held-out fold (``--fold``, default 0: the fold the scene-label runs never
train on) are used. Their pooled features are classified by cosine k-nearest neighbours and by a
linear (multinomial logistic) probe, each under class-stratified 5-fold cross-validation
inside that fold (the i-th image of a class, in name order, is in inner split i % 5); the
accuracy is the mean over the 5 inner splits, with their spread. Chance is 1/21.

    python experiments/ucmerced/probe.py --data ../shared/data/ucmerced_landuse \
        --model scene=runs/ucm/scene_16x_s0/model.pt --out runs/ucm/probe.json

Models: ``NAME=PATH`` of a ``pretrain.py`` result (a SceneCNN), ``NAME=random`` (the SceneCNN at
random weights, BatchNorm statistics calibrated on training-fold crops), or ``NAME=seglib:PATH``
(a seglib teacher or student checkpoint; ``bundled`` for the bundled student), pooling the
learned stride-4 features.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone import SceneCNN  # noqa: E402
from scenes import load_scenes, random_crops  # noqa: E402


def knn_predict(train_x, train_y, test_x, k: int = 10, classes: int = 21) -> np.ndarray:
    """Cosine k-nearest-neighbour vote weighted by similarity."""
    a = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    b = F.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    sim = b @ a.T
    top, idx = sim.topk(min(k, a.shape[0]), dim=1)
    votes = torch.zeros(b.shape[0], classes)
    votes.scatter_add_(1, torch.as_tensor(train_y)[idx], top.clamp_min(0) + 1e-6)
    return votes.argmax(1).numpy()


def linear_predict(train_x, train_y, test_x, classes: int = 21, steps: int = 300, wd: float = 1e-3) -> np.ndarray:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    x = torch.as_tensor(train_x, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = torch.as_tensor(train_y)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + wd * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    t = (torch.as_tensor(test_x, dtype=torch.float64) - mean) / std
    return (t @ w + b).argmax(1).detach().numpy()


def stratified_cv(features: np.ndarray, labels: np.ndarray, inner: np.ndarray, classifier) -> dict:
    accs = []
    for split in np.unique(inner):
        test = inner == split
        pred = classifier(features[~test], labels[~test], features[test])
        accs.append(float((pred == labels[test]).mean()))
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "splits": accs}


def inner_splits(labels: np.ndarray, n: int = 5) -> np.ndarray:
    out = np.zeros(len(labels), int)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[idx] = np.arange(len(idx)) % n
    return out


def to_batch(images, size: int) -> torch.Tensor:
    x = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()[None] / 255 for im in images]
    return torch.cat([F.interpolate(t, size=(size, size), mode="bilinear", antialias=True) for t in x])


@torch.no_grad()
def pooled(fn, images, size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for i in range(0, len(images), 32):
        for name, fmap in fn(to_batch(images[i : i + 32], size)).items():
            parts.setdefault(name, []).append(fmap.float().mean((2, 3)).numpy())
    out = {name: np.concatenate(v) for name, v in parts.items()}
    if len(out) > 1:
        out["all"] = np.concatenate([v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-6) for v in out.values()], 1)
    return out


def load_scene_cnn(path: str) -> SceneCNN:
    state = torch.load(path, weights_only=False)
    a = state["args"]
    cnn = SceneCNN(tuple(int(v) for v in a["widths"].split(",")), tuple(int(v) for v in a["depths"].split(",")), classes=state["model"]["fc.weight"].shape[0])
    cnn.load_state_dict(state["model"])
    return cnn.eval()


def random_scene_cnn(scenes, *, widths="32,64,128,256", depths="1,2,2,2", seed: int = 0, calibrate: bool = True) -> SceneCNN:
    """The SceneCNN at random weights (seed), BatchNorm statistics from 8 batches of training crops."""
    from segmenter import calibrate_bn

    torch.manual_seed(seed)
    cnn = SceneCNN(tuple(int(v) for v in widths.split(",")), tuple(int(v) for v in depths.split(",")))
    if not calibrate:
        return cnn.eval()
    train = scenes.subset(scenes.folds != 0)
    batches = []
    for step in range(8):
        rng = np.random.default_rng([seed, 10**6 + step])
        idx = rng.choice(len(train), 48, replace=False)
        batches.append(random_crops([train.images[i] for i in idx], rng)[0])
    return calibrate_bn(cnn, batches)


def model_fn(spec: str, scenes):
    if spec == "random":
        return random_scene_cnn(scenes).pyramid
    if spec == "random_nocal":
        return random_scene_cnn(scenes, calibrate=False).pyramid
    if spec.startswith("seglib:"):
        from seglib.models import load_model

        path = spec[len("seglib:") :]
        model = load_model(None if path == "bundled" else path)
        return lambda x: {"s4": model.features(x)}
    return load_scene_cnn(spec).pyramid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", action="append", required=True, metavar="NAME=SPEC")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="side the 256 px scenes are resized to")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scenes = load_scenes(args.data)
    held = scenes.subset(scenes.folds == args.fold)
    inner = inner_splits(held.labels)
    result = {"fold": args.fold, "images": len(held), "size": args.size, "k": args.k, "chance": 1 / len(scenes.classes), "models": {}}
    for item in args.model:
        name, _, spec = item.partition("=")
        feats = pooled(model_fn(spec, scenes), held.images, args.size)
        rows = {}
        for level, x in feats.items():
            knn = stratified_cv(x, held.labels, inner, lambda a, b, c: knn_predict(a, b, c, args.k, len(scenes.classes)))
            lin = stratified_cv(x, held.labels, inner, lambda a, b, c: linear_predict(a, b, c, len(scenes.classes)))
            rows[level] = {"knn": knn, "linear": lin, "dims": int(x.shape[1])}
            print(f"{name:<24} {level:<4} kNN {knn['mean']:.3f} +- {knn['std']:.3f}   linear {lin['mean']:.3f} +- {lin['std']:.3f}", flush=True)
        result["models"][name] = {"spec": spec, "levels": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
