"""A folder of scene images sorted into class sub-folders (UC Merced Land Use), in memory.

    images/<class>/<name>.jpg  ->  SceneFolder: uint8 images, class ids, stratified folds

Folds are class-stratified and fixed by the sorted file names alone: the i-th image of a class
(in name order) is in fold ``i % folds``. Everything that must not see a fold (a scene-label
training run, the probe's scoring) asks for it by number, so a fold is never drawn by chance.

``random_crops`` draws a batch of augmented square crops as a float tensor: a random zoom
(log-uniform in ``zoom``, output pixels per source pixel, so UC Merced's 0.3 m pixels can be
made as coarse as the tiles the model will read), flips, quarter turns and a mild photometric
jitter. Its random numbers come from one generator per step, so a resumed run draws the same
crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seglib.io.images import IMAGE_SUFFIXES, read_image

__all__ = ["SceneFolder", "load_scenes", "random_crops", "centre_crops"]


@dataclass
class SceneFolder:
    images: list[np.ndarray]  # uint8 (H, W, 3)
    labels: np.ndarray  # (N,) int class ids
    folds: np.ndarray  # (N,) int fold ids
    classes: list[str]
    names: list[str]

    def subset(self, keep: np.ndarray) -> SceneFolder:
        idx = np.flatnonzero(keep)
        return SceneFolder(
            [self.images[i] for i in idx], self.labels[idx], self.folds[idx], self.classes, [self.names[i] for i in idx]
        )

    def __len__(self) -> int:
        return len(self.images)


def load_scenes(root: str | Path, folds: int = 5) -> SceneFolder:
    """Every image of ``root``'s class sub-folders (an ``images/`` level is looked through)."""
    root = Path(root)
    if (root / "images").is_dir():
        root = root / "images"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root}: expected one sub-folder per scene class, found {len(classes)}")
    images, labels, fold_ids, names = [], [], [], []
    for c, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for i, path in enumerate(files):
            images.append(read_image(path)[0])
            labels.append(c)
            fold_ids.append(i % folds)
            names.append(f"{cls}/{path.name}")
    return SceneFolder(images, np.array(labels), np.array(fold_ids), classes, names)


def _jitter(x: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    n = x.shape[0]
    b, c, s = (torch.from_numpy(rng.uniform(1 - strength, 1 + strength, (3, n, 1, 1, 1)).astype(np.float32)))
    x = x * b
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * s + grey
    return x.clamp(0, 1)


def random_crops(
    images: list[np.ndarray],
    rng: np.random.Generator,
    *,
    size: int = 96,
    zoom: tuple[float, float] = (0.375, 1.0),
    jitter: float = 0.2,
) -> tuple[torch.Tensor, np.ndarray]:
    """One augmented crop of each of ``images``: (N, 3, size, size) in [0, 1], and the
    (N, 4) boxes (top, left, height, width) they were cut from."""
    out, boxes = [], []
    for img in images:
        h, w = img.shape[:2]
        z = float(np.exp(rng.uniform(np.log(zoom[0]), np.log(zoom[1]))))
        side = int(min(round(size / z), h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[top : top + side, left : left + side])).permute(2, 0, 1)
        crop = crop.float()[None] / 255
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        turns = int(rng.integers(0, 4))
        crop = torch.rot90(crop, turns, (2, 3))
        if rng.random() < 0.5:
            crop = crop.flip(3)
        out.append(crop)
        boxes.append((top, left, side, side))
    x = torch.cat(out).clamp(0, 1)
    if jitter > 0:
        x = _jitter(x, rng, jitter)
    return x, np.array(boxes)


def centre_crops(images: list[np.ndarray], size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` crop of each image (all images at least that big): (N, 3, size, size)."""
    out = []
    for img in images:
        h, w = img.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        out.append(torch.from_numpy(np.ascontiguousarray(img[top : top + size, left : left + size])).permute(2, 0, 1))
    return torch.stack(out).float() / 255
