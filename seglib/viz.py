"""Colours for label maps and probability maps (TensorBoard, previews, notebooks)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["PALETTE", "colourize", "soft_colour", "match_labels"]

# 16 distinguishable colours (uint8), one per possible cluster.
PALETTE = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
        [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195],
    ],
    dtype=np.uint8,
)  # fmt: skip


def colourize(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Integer labels (H, W) -> uint8 RGB (H, W, 3)."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return PALETTE[labels.astype(np.int64) % len(PALETTE)]


def soft_colour(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, K, H, W) -> float image (B, 3, H, W) in [0, 1]: each pixel is the
    probability-weighted mix of the cluster colours (no argmax, so uncertainty shows as blends)."""
    k = probs.shape[1]
    colours = torch.as_tensor(PALETTE[:k], dtype=torch.float32, device=probs.device) / 255
    return torch.einsum("bkhw,kc->bchw", probs.float(), colours).clamp(0, 1)


def match_labels(pred: np.ndarray, reference: np.ndarray, ignore: Iterable[int] = ()) -> np.ndarray:
    """Renumber ``pred`` so its clusters take the ids of the ``reference`` labels they overlap
    most (Hungarian); handy to show prediction and ground truth in the same colours. Pixels whose
    reference label is in ``ignore`` (e.g. 5 and 255 of the sample masks) take no part."""
    from scipy.optimize import linear_sum_assignment

    from .metrics import confusion

    matrix, classes = confusion(pred, reference, ignore)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    mapping = np.arange(matrix.shape[0]) + int(classes.max()) + 1  # unmatched: fresh ids
    mapping[rows] = classes[cols]
    return mapping[pred]
