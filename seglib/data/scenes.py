"""A folder of scene images sorted into class sub-folders (e.g. UC Merced Land Use), in memory.

    root/<class>/<name>.jpg   (or root/images/<class>/<name>.jpg)

``load_scenes`` reads every image as uint8 RGB with its class id and a **fold**: folds are
class-stratified and fixed by the sorted file names alone (the i-th image of a class, in name
order, is in fold ``i % folds``), so a scene-label training run that leaves fold 0 out and the
representation probe that scores fold 0 (``seglib.evaluation.probe``) agree on which images are
unseen without sharing any state.

``random_crops`` draws a batch of augmented square crops: a random zoom, log-uniform in
``zoom`` (output pixels per source pixel; UC Merced's 0.3 m pixels at zoom 0.375 are 0.8 m),
flips, quarter turns and a mild brightness / contrast / saturation jitter. All of its random
numbers come from the generator it is given, so a training step seeded by (seed, step) draws
the same crops after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import IMAGE_SUFFIXES, ImageReadError, read_image

__all__ = ["SceneFolder", "load_scenes", "random_crops", "resize_batch"]


@dataclass
class SceneFolder:
    """Scene images with their class ids and folds (parallel sequences)."""

    images: list[np.ndarray]  # uint8 (H, W, 3) each
    labels: np.ndarray  # (N,) class ids into ``classes``
    folds: np.ndarray  # (N,) fold ids
    classes: list[str]
    names: list[str]  # "<class>/<file name>"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, keep: np.ndarray) -> SceneFolder:
        """The images where the boolean mask ``keep`` (N,) is true, in the same order."""
        idx = np.flatnonzero(keep)
        return SceneFolder(
            [self.images[i] for i in idx], self.labels[idx], self.folds[idx], self.classes, [self.names[i] for i in idx]
        )

    def without_fold(self, fold: int | None) -> SceneFolder:
        """Every image outside ``fold`` (None: all of them)."""
        return self if fold is None else self.subset(self.folds != fold)

    def fold(self, fold: int) -> SceneFolder:
        return self.subset(self.folds == fold)


def load_scenes(root: str | Path, *, folds: int = 5, min_side: int = 32) -> SceneFolder:
    """Every image of ``root``'s class sub-folders (a single ``images/`` level is looked through).

    Raises ``ImageReadError`` naming the folder when it has fewer than two class folders, a
    class folder has no image, or an image is smaller than ``min_side`` pixels."""
    root = Path(root)
    if (root / "images").is_dir():
        root = root / "images"
    if not root.is_dir():
        raise ImageReadError(f"scene folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ImageReadError(
            f"{root}: found {len(classes)} class sub-folder(s); a scene folder holds one sub-folder per "
            "scene class (root/<class>/<image>.jpg) and at least two classes"
        )
    images, labels, fold_ids, names = [], [], [], []
    for c, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageReadError(f"{root / cls}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for i, path in enumerate(files):
            rgb, _ = read_image(path)
            if min(rgb.shape[:2]) < min_side:
                raise ImageReadError(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} px is smaller than {min_side} px")
            images.append(rgb)
            labels.append(c)
            fold_ids.append(i % folds)
            names.append(f"{cls}/{path.name}")
    return SceneFolder(images, np.array(labels), np.array(fold_ids), classes, names)


def _jitter(x: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Brightness, contrast (around the image mean) and saturation (around grey), each a factor
    drawn uniformly in [1 - strength, 1 + strength] per image."""
    b, c, s = torch.from_numpy(rng.uniform(1 - strength, 1 + strength, (3, x.shape[0], 1, 1, 1)).astype(np.float32))
    x = x * b
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = x.mean(1, keepdim=True)
    return ((x - grey) * s + grey).clamp(0, 1)


def random_crops(
    images: list[np.ndarray],
    rng: np.random.Generator,
    *,
    size: int = 96,
    zoom: tuple[float, float] = (0.375, 1.0),
    jitter: float = 0.2,
) -> tuple[torch.Tensor, np.ndarray]:
    """One augmented crop of each image: ((N, 3, size, size) float in [0, 1], (N, 4) int boxes
    (top, left, side, side) of the source pixels each crop was resized from).

    The zoom is drawn log-uniformly in ``zoom``; a crop of side ``size / zoom`` (at most the
    image's shorter side, so the smallest zoom an image allows is ``size / min(H, W)``) is
    resized to ``size`` with antialiasing, turned by a random multiple of 90 degrees, mirrored
    with probability 1/2, and jittered."""
    if zoom[0] <= 0 or zoom[0] > zoom[1]:
        raise ValueError(f"zoom must be a range 0 < low <= high, got {zoom}")
    out, boxes = [], []
    for img in images:
        h, w = img.shape[:2]
        z = float(np.exp(rng.uniform(np.log(zoom[0]), np.log(zoom[1]))))
        side = int(min(round(size / z), h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[top : top + side, left : left + side]))
        crop = crop.permute(2, 0, 1)[None].float() / 255  # (1, 3, side, side)
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crop = torch.rot90(crop, int(rng.integers(0, 4)), (2, 3))
        if rng.random() < 0.5:
            crop = crop.flip(3)
        out.append(crop)
        boxes.append((top, left, side, side))
    x = torch.cat(out).clamp(0, 1)  # (N, 3, size, size)
    if jitter > 0:
        x = _jitter(x, rng, jitter)
    return x, np.array(boxes)


def resize_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Whole images resized (antialiased) to ``size`` x ``size``: (N, 3, size, size) in [0, 1]."""
    out = []
    for img in images:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out)
