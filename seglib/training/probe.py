"""The quality signal of a training run: a few fixed images segmented with the model being trained.

Losses say whether the optimiser makes progress, not whether the segmentations get better. The
probe segments ``IMAGES`` fixed images every ``probe.every`` steps (and before the first
step and after the last) and reports:

* label-free proxies (``seglib.evaluation.metrics.proxy_scores``): ``view_agreement``, the one-to-one
  agreement between the labels of an image and of its mirror image (higher is better);
  ``utilization`` (all K clusters used); ``speckle`` and ``boundary_density`` (lower: cleaner);
* with ground truth (synthetic tiles, or ``data.mask_dir`` for a folder): Hungarian ``miou`` at
  K = the classes present, and once, on the same images, ``miou_rgb_kmeans`` for reference.

The images are fixed (spread over the folder's sorted file list, shrunk so the longer side is
``SIZE``, cropped to multiples of ``STRIDE`` so that every model reads them without
padding), so the curve compares like with like. The probe runs in eval mode without gradients
and draws no random numbers, so it does not change the training trajectory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.select import select_images
from ..data.synthetic import eval_set
from ..evaluation.baselines import rgb_kmeans
from ..evaluation.metrics import proxy_scores, segmentation_scores
from ..io.images import ImageReadError, list_images, read_image, read_mask, shrink

__all__ = ["QualityProbe", "PROBE_SEED", "STRIDE", "IMAGES", "SIZE", "K"]

log = logging.getLogger("seglib.training")

IMAGES, SIZE = 4, 256  # the probe's images and their longer side in pixels: a few seconds a probe on a CPU
K = 6  # clusters for the label-free proxies of images without masks (with masks: the classes present)
PROBE_SEED = 321  # synthetic probe tiles: a stream disjoint from training (seed 0..) and the test set (123)
STRIDE = 32  # the largest input stride of the package's models (a student, 16, reading images shrunk by 2)


def _crop(a: np.ndarray) -> np.ndarray:
    """The top-left part of an image or mask whose sides are multiples of ``STRIDE``."""
    return a[: a.shape[0] // STRIDE * STRIDE, : a.shape[1] // STRIDE * STRIDE]


@torch.no_grad()
def _labels(model: torch.nn.Module, rgb: np.ndarray, k: int) -> np.ndarray:
    """(H, W) labels of one (H, W, 3) float image whose sides are multiples of ``STRIDE``."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(device)
    return model(x, k)["probs"][0].argmax(0).cpu().numpy()  # (H, W)


class QualityProbe:
    """Scores a segmenter on fixed images.

    Arguments:
      images: (H, W, 3) float32 RGB in [0, 1].
      masks: ground-truth label maps (H, W), one per image, or None.
      k: clusters of the label-free proxies when there is no ground truth.
      ignore: label ids left out of the mIoU.
      names: image names (for messages).
    """

    def __init__(
        self,
        *,
        images: list[np.ndarray],
        masks: list[np.ndarray] | None = None,
        k: int = K,
        ignore: tuple[int, ...] = (),
        names: list[str] | None = None,
    ):
        if masks is not None and len(masks) != len(images):
            raise ValueError(f"{len(images)} probe images but {len(masks)} masks")
        if small := [i for i, img in enumerate(images) if min(img.shape[:2]) < STRIDE]:
            raise ValueError(f"probe images {small} are smaller than {STRIDE} px")
        images = [_crop(img) for img in images]
        masks = [_crop(m) for m in masks] if masks is not None else None
        self.images, self.masks, self.k, self.ignore = images, masks, k, tuple(ignore)
        self.names = names or [str(i) for i in range(len(images))]
        self.ks = [self._k(i) for i in range(len(images))]
        self.reference: dict[str, float] = {}
        if masks is not None:  # what the analyst gets for free, on the same images and K
            scores = [
                segmentation_scores(rgb_kmeans(img, kk, seed=0), m, self.ignore)["miou"]
                for img, m, kk in zip(images, masks, self.ks, strict=True)
            ]
            self.reference["miou_rgb_kmeans"] = float(np.mean(scores))

    def _k(self, i: int) -> int:
        if self.masks is None:
            return self.k
        present = np.setdiff1d(np.unique(self.masks[i]), np.asarray(self.ignore, dtype=self.masks[i].dtype))
        return int(np.clip(len(present), 2, 16))

    @classmethod
    def from_config(cls, cfg: Config, *, images: int = IMAGES, size: int = SIZE) -> QualityProbe | None:
        """The probe a config asks for (``images`` images, their longer side ``size`` pixels), or
        None when ``probe.every`` is 0."""
        d = cfg.data
        if cfg.probe.every <= 0:
            return None
        if d.synthetic:
            tiles = eval_set(images, size, PROBE_SEED)
            return cls(images=[t.rgb for t in tiles], masks=[t.labels for t in tiles], names=None)
        paths = select_images(list_images(d.data_dir), include=d.include, exclude=d.exclude, folder=d.data_dir)
        mask_dir = Path(d.mask_dir).expanduser() if d.mask_dir else None
        if mask_dir is not None:
            paths = [path for path in paths if (mask_dir / f"{path.stem}.png").is_file()]
            if not paths:
                raise ConfigError(
                    f"data.mask_dir: no image of {d.data_dir} has a mask in {d.mask_dir}; masks are label PNGs "
                    "named like the images (<stem>.png)"
                )
        # Spread over the sorted list. An unreadable image (FolderBatches warns about it) or one
        # whose mask holds fewer than 2 classes (no mIoU: the scoring convention skips them) is
        # replaced by the next image of the list not picked yet.
        spread = [int(i) for i in np.linspace(0, len(paths) - 1, min(images, len(paths))).round()]
        order = list(dict.fromkeys(spread + list(range(len(paths)))))
        names, picked, masks = [], [], []
        for i in order:
            if len(picked) == images:
                break
            try:
                rgb, _ = read_image(paths[i])
            except ImageReadError:
                continue
            mask = None
            if mask_dir is not None:
                mask = read_mask(mask_dir / f"{paths[i].stem}.png")
                if mask.shape != rgb.shape[:2]:
                    raise ImageReadError(
                        f"{mask_dir / paths[i].stem}.png: mask is {mask.shape[::-1]}, image is "
                        f"{rgb.shape[1::-1]}; they must match"
                    )
                if len(np.setdiff1d(np.unique(mask), np.asarray(d.mask_ignore, dtype=mask.dtype))) < 2:
                    continue
            rgb, mask = shrink(rgb, mask, size)
            if min(rgb.shape[:2]) < STRIDE:
                continue  # too small to probe (FolderBatches pads such images for training)
            names.append(paths[i].stem)
            picked.append(rgb.astype(np.float32) / 255.0)
            masks.append(mask)
        if not picked:
            raise ImageReadError(f"no readable image in {d.data_dir} for the quality probe")
        masks = masks if mask_dir is not None else None
        return cls(images=picked, masks=masks, k=K, ignore=tuple(d.mask_ignore), names=names)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean scores over the probe images (``probe/<metric>`` keys) and ``probe/seconds``.
        ``model`` is left in the mode it came in."""
        tic = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            rows = []
            for i, rgb in enumerate(self.images):
                k = self.ks[i]
                labels = _labels(model, rgb, k)
                mirrored = _labels(model, rgb[:, ::-1], k)[:, ::-1]
                row = proxy_scores(labels, k, labels_other_view=mirrored)
                if self.masks is not None:
                    row["miou"] = segmentation_scores(labels, self.masks[i], self.ignore)["miou"]
                rows.append(row)
        finally:
            model.train(was_training)
        out = {f"probe/{key}": float(np.mean([r[key] for r in rows])) for key in rows[0]}
        out.update({f"probe/{key}": value for key, value in self.reference.items()})
        out["probe/seconds"] = time.perf_counter() - tic
        return out
