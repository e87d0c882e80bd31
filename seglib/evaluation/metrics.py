"""Segmentation quality against ground truth, and label-free proxies.

Supervised scores compare a predicted label map (cluster ids 0..K-1) with a ground-truth class
map. Clusters carry no class names, so they are matched first:

* **Hungarian** (one-to-one): clusters and classes are paired to maximise the summed IoU
  (``scipy.optimize.linear_sum_assignment``). Pixels of unmatched clusters count as errors and
  ground-truth classes left without a cluster score IoU 0. This is the headline number.
* **Many-to-one** (majority): every cluster takes the class it overlaps most, so K above the
  number of classes is not punished for over-segmenting.

Proxies need no labels: cluster utilisation, speckle, boundary density and two-view agreement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "confusion",
    "hungarian_scores",
    "many_to_one_scores",
    "segmentation_scores",
    "boundary_f1",
    "proxy_scores",
    "aggregate",
]


def confusion(pred: np.ndarray, gt: np.ndarray, ignore: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix (clusters x classes) over pixels whose label is not ignored.

    Returns the matrix and the sorted class ids its columns stand for (only classes present).
    """
    pred = np.asarray(pred).ravel()
    gt = np.asarray(gt).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in size: {pred.size} vs {gt.size}")
    keep = ~np.isin(gt, list(ignore)) if ignore else np.ones_like(gt, dtype=bool)
    pred, gt = pred[keep].astype(np.int64), gt[keep]
    classes, gt_idx = np.unique(gt, return_inverse=True)
    n_pred = int(pred.max()) + 1 if pred.size else 1
    matrix = np.bincount(pred * len(classes) + gt_idx, minlength=n_pred * len(classes))
    return matrix.reshape(n_pred, len(classes)), classes


def _iou_matrix(matrix: np.ndarray) -> np.ndarray:
    inter = matrix.astype(np.float64)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def hungarian_scores(matrix: np.ndarray) -> dict[str, float]:
    """One-to-one matched mIoU and pixel accuracy from a confusion matrix."""
    iou = _iou_matrix(matrix)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    per_class = np.zeros(matrix.shape[1])
    per_class[cols] = iou[rows, cols]  # classes left unmatched keep 0
    total = matrix.sum()
    return {
        "miou": float(per_class.mean()) if per_class.size else 0.0,
        "pixel_acc": float(matrix[rows, cols].sum() / total) if total else 0.0,
    }


def many_to_one_scores(matrix: np.ndarray) -> dict[str, float]:
    """Majority-vote mapping of clusters to classes, then mIoU and pixel accuracy."""
    n_classes = matrix.shape[1]
    used = matrix.sum(1) > 0
    target = matrix.argmax(1)
    merged = np.zeros((n_classes, n_classes), dtype=np.int64)
    for cluster in np.flatnonzero(used):
        merged[target[cluster]] += matrix[cluster]
    iou = np.diag(_iou_matrix(merged))
    total = matrix.sum()
    return {
        "miou": float(iou.mean()) if iou.size else 0.0,
        "pixel_acc": float(np.trace(merged) / total) if total else 0.0,
    }


def segmentation_scores(pred: np.ndarray, gt: np.ndarray, ignore: Iterable[int] = ()) -> dict[str, float]:
    """Both matchings for one image: ``miou``, ``pixel_acc`` (Hungarian) and ``m2o_miou``,
    ``m2o_pixel_acc`` (many-to-one), ``boundary_f1`` (2 px tolerance), plus ``n_classes``
    present after ignoring."""
    matrix, classes = confusion(pred, gt, ignore)
    out = hungarian_scores(matrix)
    m2o = many_to_one_scores(matrix)
    out["m2o_miou"], out["m2o_pixel_acc"] = m2o["miou"], m2o["pixel_acc"]
    if np.ndim(gt) == 2:  # boundaries need an image, not a list of pixels
        valid = ~np.isin(np.asarray(gt), list(ignore)) if ignore else None
        out["boundary_f1"] = boundary_f1(np.asarray(pred), np.asarray(gt), valid=valid)
    out["n_classes"] = len(classes)
    return out


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    return edge


def boundary_f1(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0, valid: np.ndarray | None = None) -> float:
    """F1 of predicted vs ground-truth label boundaries, a boundary pixel counting as matched
    when the other map has a boundary within ``tolerance`` pixels. Label-id free (only where
    labels change matters). 1.0 when neither map has a boundary."""
    from scipy import ndimage

    pb, gb = _boundaries(pred), _boundaries(gt)
    if valid is not None:
        pb, gb = pb & valid, gb & valid
    if not pb.any() and not gb.any():
        return 1.0
    if not pb.any() or not gb.any():
        return 0.0
    dist_to_gt = ndimage.distance_transform_edt(~gb)
    dist_to_pred = ndimage.distance_transform_edt(~pb)
    precision = float((dist_to_gt[pb] <= tolerance).mean())
    recall = float((dist_to_pred[gb] <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def proxy_scores(labels: np.ndarray, k: int, labels_other_view: np.ndarray | None = None) -> dict[str, float]:
    """Label-free quality proxies of one label map (H, W) with ``k`` clusters.

    * ``utilization``: entropy of the cluster sizes over log K (1 = all clusters equally used).
    * ``speckle``: fraction of pixels whose 3x3 neighbourhood majority differs from them.
    * ``boundary_density``: fraction of 4-neighbour pairs with different labels.
    * ``view_agreement`` (when a second view's labels, already warped into this frame, are
      given): the best one-to-one agreement between the two label maps.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel(), minlength=k).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    out = {"utilization": float(-(nz * np.log(nz)).sum() / np.log(k)) if k > 1 else 1.0}
    horiz = labels[:, 1:] != labels[:, :-1]
    vert = labels[1:, :] != labels[:-1, :]
    out["boundary_density"] = float((horiz.sum() + vert.sum()) / (horiz.size + vert.size))
    out["speckle"] = float(_speckle(labels, k))
    if labels_other_view is not None:
        matrix, _ = confusion(labels_other_view, labels)
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        out["view_agreement"] = float(matrix[rows, cols].sum() / max(matrix.sum(), 1))
    return out


def _speckle(labels: np.ndarray, k: int) -> float:
    """Fraction of pixels that disagree with the majority label of their 3x3 window."""
    from scipy import ndimage

    votes = np.stack([ndimage.uniform_filter((labels == c).astype(np.float32), 3, mode="nearest") for c in range(k)])
    return float((votes.argmax(0) != labels).mean())


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every numeric key over images (keys missing in some rows use the rest)."""
    keys = sorted({key for row in rows for key, v in row.items() if isinstance(v, (int, float))})
    out = {}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        out[key] = float(np.mean(values)) if values else float("nan")
    out["n_images"] = len(rows)
    return out
