"""Two-view augmentation with an exact warp between the views.

View A is the tile with photometric jitter only. View B is the tile under a random geometric
transform G (horizontal/vertical flip, rotation by a multiple of 90 degrees, a crop of a
fraction ``s`` of the side resized back to full size) plus its own photometric jitter.

G is one affine map in ``grid_sample``'s normalised coordinates (``align_corners=False``):
``source_xy = s * M @ view_xy + c`` with M a signed permutation (flips and 90-degree turns).
The *same* matrix both renders view B from the tile and warps any map of view A (the
probabilities at stride 4, say) into view B's frame, so corresponding pixels line up exactly,
at any resolution: an equivariant model gives a consistency loss of ~0. ``to_source`` applies
the inverse and marks the source pixels the view does not cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentConfig

__all__ = ["ViewTransform", "sample_transforms", "photometric", "make_views"]

# The eight signed permutations of the plane (flips x rotations by 90 degrees).
_ROT = [
    np.array([[1, 0], [0, 1]]),
    np.array([[0, -1], [1, 0]]),
    np.array([[-1, 0], [0, -1]]),
    np.array([[0, 1], [-1, 0]]),
]


@dataclass(frozen=True)
class ViewTransform:
    """Geometric transforms of a batch: ``theta`` (B, 2, 3) maps view coords to source coords."""

    theta: torch.Tensor

    def _grid(self, theta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b, c, h, w = like.shape
        return F.affine_grid(theta.to(like.device, torch.float32), [b, c, h, w], align_corners=False)

    def to_view(self, source: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resample a source-frame map (B, C, h, w) into the view's frame (same size)."""
        grid = self._grid(self.theta, source)
        return F.grid_sample(source.float(), grid, mode=mode, padding_mode="border", align_corners=False)

    def to_source(self, view: torch.Tensor, mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse warp of a view-frame map into the source frame.

        Returns the map and a (B, 1, h, w) mask of the source pixels the view covers.
        """
        a = self.theta[:, :, :2]
        inv_a = torch.linalg.inv(a)
        inv = torch.cat([inv_a, -(inv_a @ self.theta[:, :, 2:])], 2)  # (B, 2, 3)
        grid = self._grid(inv, view)
        out = F.grid_sample(view.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
        # A source pixel is covered when its centre maps inside the view.
        inside = (grid.abs() <= 1 + 1e-4).all(-1)
        return out, inside[:, None].float()

    @staticmethod
    def identity(batch: int) -> ViewTransform:
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        return ViewTransform(theta)


def sample_transforms(rngs: list[np.random.Generator], cfg: AugmentConfig) -> ViewTransform:
    """One random geometric transform per sample, from per-sample generators."""
    thetas = []
    for rng in rngs:
        m = _ROT[int(rng.integers(4))] if cfg.rot90 else _ROT[0]
        if cfg.flip and rng.random() < 0.5:
            m = m @ np.array([[-1, 0], [0, 1]])
        s = rng.uniform(cfg.scale_min, 1.0) if cfg.scale_min < 1 else 1.0
        cx, cy = rng.uniform(-(1 - s), 1 - s, 2)  # the crop stays inside the tile
        thetas.append(np.concatenate([s * m, [[cx], [cy]]], 1))
    return ViewTransform(torch.tensor(np.stack(thetas), dtype=torch.float32))


def photometric(x: torch.Tensor, rngs: list[np.random.Generator], cfg: AugmentConfig) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation, hue and noise jitter on (B, 3, H, W)."""
    out = []
    for img, rng in zip(x, rngs, strict=True):
        u = rng.uniform(-1, 1, 5)
        img = img + cfg.brightness * u[0]
        mean = img.mean()
        img = (img - mean) * (1 + cfg.contrast * u[1]) + mean
        grey = img.mean(0, keepdim=True)
        img = grey + (img - grey) * (1 + cfg.saturation * u[2])
        if cfg.hue:
            img = _rotate_hue(img, 2 * math.pi * cfg.hue * u[3])
        if cfg.noise:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            img = img + cfg.noise * torch.randn(img.shape, generator=gen).to(img.device)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def _rotate_hue(img: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by ``angle`` radians."""
    to_yiq = img.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(angle), math.sin(angle)
    rot = img.new_tensor([[1, 0, 0], [0, c, -s], [0, s, c]])
    mat = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,jhw->ihw", mat, img)


def make_views(
    x: torch.Tensor, rngs: list[np.random.Generator], cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor, ViewTransform]:
    """(view A, view B, G) for a batch of tiles x (B, 3, H, W); G maps A's frame to B's."""
    transform = sample_transforms(rngs, cfg)
    view_a = photometric(x, rngs, cfg)
    view_b = photometric(transform.to_view(x), rngs, cfg)
    return view_a, view_b, transform
