"""Folders of real RGB tiles: training crops and labelled evaluation sets.

``FolderBatches`` decodes every readable image of a folder once (unreadable files are skipped
with a warning that names them; a folder with none left is an error) and serves step-indexed
micro-batches of random crops. The order of images follows a ``DistributedSampler`` with
``set_epoch``: each rank walks its own shard of a fresh permutation every epoch, and a sample's
crop position is a pure function of (seed, rank, sample counter), so runs resume exactly.
Images smaller than the crop are reflect-padded (logged once per image).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from ..io.images import ImageReadError, list_images, read_image, read_mask, shrink
from .select import select_images

__all__ = ["FolderBatches", "load_folder", "load_labelled_folder"]

log = logging.getLogger("seglib.data")


def load_folder(
    folder: str | Path, *, min_side: int = 1, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> tuple[list[str], list[np.ndarray]]:
    """(names, uint8 RGB arrays) of every readable image in ``folder`` (optionally only those
    kept by the ``include`` / ``exclude`` globs, ``seglib.data.select``); unreadable files are
    skipped with a warning. Raises ``ImageReadError`` when no image is usable."""
    names, images, skipped = [], [], []
    for path in select_images(list_images(folder), include=include, exclude=exclude, folder=folder):
        try:
            rgb, _ = read_image(path)
        except ImageReadError as exc:
            log.warning("skipping %s", exc)
            skipped.append(path.name)
            continue
        if min(rgb.shape[:2]) < min_side:
            log.warning("skipping %s: %dx%d is smaller than %d px", path.name, rgb.shape[1], rgb.shape[0], min_side)
            skipped.append(path.name)
            continue
        names.append(path.stem)
        images.append(rgb)
    if not images:
        raise ImageReadError(f"no usable images in {folder} (skipped: {', '.join(skipped) or 'none'})")
    return names, images


def load_labelled_folder(
    images: str | Path,
    masks: str | Path,
    *,
    max_side: int = 0,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """(names, [(rgb float32 (H, W, 3) in [0, 1], labels (H, W))]) for every image with a mask
    of the same stem (``<stem>.png``) in ``masks`` (optionally only those kept by the
    ``include`` / ``exclude`` globs); optional downscale to ``max_side``."""
    masks = Path(masks)
    if not masks.is_dir():
        raise ImageReadError(f"mask folder not found: {masks}")
    names, pairs = [], []
    for path in select_images(list_images(images), include=include, exclude=exclude, folder=images):
        mask_path = masks / f"{path.stem}.png"
        if not mask_path.is_file():
            log.warning("skipping %s: no mask %s", path.name, mask_path.name)
            continue
        rgb, _ = read_image(path)
        mask = read_mask(mask_path)
        if mask.shape != rgb.shape[:2]:
            raise ImageReadError(
                f"{mask_path}: mask is {mask.shape[::-1]}, image is {rgb.shape[1::-1]}; they must match"
            )
        rgb, mask = shrink(rgb, mask, max_side)
        names.append(path.stem)
        pairs.append((rgb.astype(np.float32) / 255.0, mask))
    if not pairs:
        raise ImageReadError(f"no image in {images} has a mask in {masks}")
    return names, pairs


class FolderBatches(Dataset):
    """Micro-batches of random ``size`` crops from the images of a folder.

    Arguments:
      folder: directory of PNG/JPEG/GeoTIFF tiles.
      size: crop side.
      batch_size: crops per rank and micro-batch.
      seed: run seed (permutations and crop positions).
      rank, world: this process's shard.
      max_side: downscale images whose longer side exceeds this (0: keep).
      downscale: then shrink every image by this integer factor (block means), e.g. 2 for a
        model that runs with ``downsample = 2``, so it trains at the scale it will see.
      include, exclude: glob patterns choosing the folder's images by name
        (``seglib.data.select``), e.g. the tiles of one leave-one-tile-out fold.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        size: int = 128,
        batch_size: int = 4,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        max_side: int = 0,
        downscale: int = 1,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
    ):
        if downscale < 1:
            raise ValueError(f"downscale must be a positive integer, got {downscale}")
        self.names, images = load_folder(folder, include=include, exclude=exclude)
        self.images = []
        for name, rgb in zip(self.names, images, strict=True):
            rgb, _ = shrink(rgb, None, max_side)
            if downscale > 1:  # the area average of each downscale x downscale block
                h, w = rgb.shape[0] // downscale, rgb.shape[1] // downscale
                blocks = rgb[: h * downscale, : w * downscale].reshape(h, downscale, w, downscale, 3)
                rgb = blocks.mean((1, 3)).round().astype(np.uint8)
            h, w = rgb.shape[:2]
            if h < size or w < size:
                log.info("%s: %dx%d is smaller than the %d px crop; reflect-padded", name, w, h, size)
                pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
                rgb = np.pad(rgb, pad, mode="reflect" if min(h, w) > 1 else "edge")
            self.images.append(rgb)
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.sampler = DistributedSampler(
            range(len(self.images)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.per_epoch = len(self.sampler)  # samples of this rank per epoch
        self._epoch, self._order = -1, []

    def __len__(self) -> int:
        return 10**9

    def _image_index(self, counter: int) -> int:
        epoch, pos = divmod(counter, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        return self._order[pos]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        crops, index = [], []
        for j in range(self.batch_size):
            counter = i * self.batch_size + j  # this rank's sample counter
            img = self.images[self._image_index(counter)]
            rng = np.random.default_rng([self.seed, 3, self.rank, counter])
            y = int(rng.integers(0, img.shape[0] - self.size + 1))
            x = int(rng.integers(0, img.shape[1] - self.size + 1))
            crops.append(img[y : y + self.size, x : x + self.size])
            index.append(counter * self.world + self.rank)
        rgb = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
        return {"rgb": rgb.contiguous(), "index": torch.tensor(index)}
