"""Pictures: colours for label and probability maps (TensorBoard, previews), and the figures
the notebooks draw (matplotlib, imported lazily)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "progress_bar",
    "PALETTE",
    "colourize",
    "soft_colour",
    "match_labels",
    "label_image",
    "pca_rgb",
    "show_images",
    "plot_losses",
]

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

    from .evaluation.metrics import confusion

    matrix, classes = confusion(pred, reference, ignore)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    mapping = np.arange(matrix.shape[0]) + int(classes.max()) + 1  # unmatched: fresh ids
    mapping[rows] = classes[cols]
    return mapping[pred]


def label_image(labels: np.ndarray, ignore: Sequence[int] = ()) -> np.ndarray:
    """Label map (H, W) -> uint8 RGB (H, W, 3) in the cluster palette; ``ignore`` ids in black."""
    out = colourize(labels)
    if len(ignore):
        out[np.isin(labels, list(ignore))] = 0
    return out


def pca_rgb(z: torch.Tensor) -> np.ndarray:
    """An embedding (D, h, w) as a false-colour image (h, w, 3): its first three principal
    components, each scaled to [0, 1]."""
    d, h, w = z.shape
    x = z.reshape(d, h * w).T.double()  # (N, D)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    p = x @ v[:3].T  # (N, 3)
    lo, hi = p.min(0).values, p.max(0).values
    return ((p - lo) / (hi - lo).clamp_min(1e-12)).reshape(h, w, -1).float().numpy()


def show_images(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[Sequence[str]] | Sequence[str] = (),
    *,
    size: float = 2.2,
    suptitle: str = "",
):
    """A grid of images (rows of (H, W, 3) arrays or (H, W) maps shown with a colour bar-free
    grey scale); ``titles`` per image, or per column for the first row only. Returns the figure."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(row):
                continue
            image = np.asarray(row[j])
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            title = ""
            if titles and isinstance(titles[0], str):
                title = titles[j] if i == 0 and j < len(titles) else ""
            elif titles and i < len(titles) and j < len(titles[i]):
                title = titles[i][j]
            ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_losses(history: dict[str, list[float]], keys: Sequence[str] | None = None, *, smooth: int = 10, ax=None):
    """Loss curves of a training history (``run`` returns it): each ``loss/<term>`` (or ``keys``)
    as a running mean over ``smooth`` steps, on a log scale when all values are positive."""
    import matplotlib.pyplot as plt

    steps = np.asarray(history["step"])
    # Terms logged only on some steps (e.g. ``loss/refine``, drawn with the learned lane) have
    # shorter lists without their steps: they are left out.
    keys = keys or [k for k in history if k.startswith("loss/") and k.count("/") == 1 and len(history[k]) == len(steps)]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    positive = True
    for key in keys:
        y = np.asarray(history[key], dtype=float)
        w = max(1, min(smooth, len(y)))
        y = np.convolve(y, np.ones(w) / w, mode="valid")
        positive &= bool((y > 0).all())
        ax.plot(steps[w - 1 :], y, label=key.removeprefix("loss/"), lw=2 if key == "loss/total" else 1)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7, ncol=2)
    return ax


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm progress bar. In a Jupyter kernel it is tqdm's text bar on stdout: its last state
    stays readable in an executed copy of the notebook (papermill, nbval), where the widget of
    ``tqdm.auto`` would be saved at 0 %. Elsewhere ``tqdm.auto``."""
    if "ipykernel" in sys.modules:
        from tqdm.std import tqdm

        kwargs = {"file": sys.stdout, "mininterval": 1.0, **kwargs}
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)
