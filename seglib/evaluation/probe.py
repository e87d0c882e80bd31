"""Representation probe: how well pooled features tell scene classes apart.

A fast signal for choosing between training objectives before the slow segmentation folds: the
features of each scene image are averaged over its positions, and the class is predicted from
them by cosine k-nearest neighbours and by a linear (multinomial logistic) classifier, each
under class-stratified cross-validation (``stratified_splits``). A model trained on the scene
labels must be probed on images it never trained on: ``probe_scenes`` takes the images of one
fold of a ``SceneFolder`` (the fold its training left out) and cross-validates inside it.

Scene accuracy is a proxy, not the goal (segmentation of unseen tiles is): it says whether
the features separate texture and context at all, beside the same architecture at random weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "linear_predict", "stratified_splits", "cross_validate", "pooled_features", "probe_features"]


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, k: int = 10) -> np.ndarray:
    """Labels of ``test_x`` (M, D) by a vote of the ``k`` most cosine-similar rows of ``train_x``
    (N, D), each vote weighted by its similarity (ties go to the lower class id)."""
    a = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    b = F.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    sim, idx = (b @ a.T).topk(min(k, a.shape[0]), dim=1)  # (M, k)
    classes = int(np.max(train_y)) + 1
    votes = torch.zeros(b.shape[0], classes, dtype=torch.float32)
    votes.scatter_add_(1, torch.as_tensor(train_y)[idx], sim.clamp_min(0) + 1e-6)
    return votes.argmax(1).numpy()


def linear_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, weight_decay: float = 1e-3, max_iter: int = 300
) -> np.ndarray:
    """Labels of ``test_x`` by multinomial logistic regression fitted on standardised ``train_x``
    (full-batch L-BFGS, L2 penalty ``weight_decay``; deterministic)."""
    x = torch.as_tensor(train_x, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = torch.as_tensor(train_y, dtype=torch.long)
    classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    test = (torch.as_tensor(test_x, dtype=torch.float64) - mean) / std
    return (test @ w + b).argmax(1).detach().numpy()


def stratified_splits(labels: np.ndarray, n: int = 5) -> np.ndarray:
    """Split id of each sample: the i-th sample of each class (in the given order) goes to split
    ``i % n``, so every split holds each class in the same proportion."""
    labels = np.asarray(labels)
    out = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[idx] = np.arange(len(idx)) % n
    return out


def cross_validate(features: np.ndarray, labels: np.ndarray, predict: Callable, *, splits: int = 5) -> dict:
    """Accuracy of ``predict(train_x, train_y, test_x)`` over class-stratified splits: each split
    is predicted from the others. {"mean", "std", "splits": [accuracy per split]}."""
    split = stratified_splits(labels, splits)
    accs = []
    for s in range(splits):
        test = split == s
        if test.any() and (~test).any():
            accs.append(float((predict(features[~test], labels[~test], features[test]) == labels[test]).mean()))
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "splits": accs}


@torch.no_grad()
def pooled_features(embed: Callable[[torch.Tensor], dict[str, torch.Tensor]], batches) -> dict[str, np.ndarray]:
    """Position-averaged features: ``embed`` maps a (B, 3, H, W) batch to named maps (B, C, h, w);
    returns {name: (N, C)} over all ``batches``, plus "all" (the unit-normalised parts side by
    side) when there are several maps."""
    parts: dict[str, list[np.ndarray]] = {}
    for x in batches:
        for name, fmap in embed(x).items():
            parts.setdefault(name, []).append(fmap.float().mean((2, 3)).numpy())
    out = {name: np.concatenate(v) for name, v in parts.items()}
    if len(out) > 1:
        out["all"] = np.concatenate([v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-6) for v in out.values()], 1)
    return out


def probe_features(features: dict[str, np.ndarray], labels: np.ndarray, *, k: int = 10, splits: int = 5) -> dict:
    """kNN and linear cross-validated accuracy of every named feature set: {name: {"knn", "linear", "dims"}}."""
    out = {}
    for name, x in features.items():
        out[name] = {
            "knn": cross_validate(x, labels, lambda a, b, c: knn_predict(a, b, c, k=k), splits=splits),
            "linear": cross_validate(x, labels, linear_predict, splits=splits),
            "dims": int(x.shape[1]),
        }
    return out
