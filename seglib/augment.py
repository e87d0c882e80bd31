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

__all__ = [
    "ViewTransform",
    "sample_transforms",
    "photometric",
    "make_views",
    "VIEW_UNIFORMS",
    "transforms_from_uniforms",
    "colour_jitter",
    "make_views_batched",
]

# The eight signed permutations of the plane (flips x rotations by 90 degrees).
_ROT = [
    np.array([[1, 0], [0, 1]]),
    np.array([[0, -1], [1, 0]]),
    np.array([[-1, 0], [0, -1]]),
    np.array([[0, 1], [-1, 0]]),
]


_BASE_GRIDS: dict[tuple[int, int, str], torch.Tensor] = {}


def _base_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(1, h*w, 3): [x, y, 1] of every pixel centre in grid_sample's normalised coordinates
    (``align_corners=False``), exactly as ``F.affine_grid`` builds them."""
    key = (h, w, str(device))
    if key not in _BASE_GRIDS:
        identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        xy = F.affine_grid(identity, [1, 1, h, w], align_corners=False).reshape(1, h * w, 2)  # exact
        _BASE_GRIDS[key] = torch.cat([xy, torch.ones(1, h * w, 1)], 2).to(device)
    return _BASE_GRIDS[key]


@dataclass(frozen=True)
class ViewTransform:
    """Geometric transforms of a batch: ``theta`` (B, 2, 3) maps view coords to source coords."""

    theta: torch.Tensor

    def _grid(self, theta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b, _, h, w = like.shape
        # affine_grid's own computation (base grid @ theta^T) with the base grid made once per
        # size and device: the same numbers, without rebuilding the base in every call.
        base = _base_grid(h, w, like.device)  # (1, h*w, 3)
        theta = theta.to(like.device, torch.float32)
        return torch.bmm(base.expand(b, -1, -1), theta.transpose(1, 2)).view(b, h, w, 2)

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
        m = _ROT[int(rng.integers(4))]
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


# The batched form below is what the teacher's training step runs: every random number of a
# batch comes from one torch generator on the batch's device, and the jitter of each image is
# one 3x3 colour matrix and an offset, so a batch costs a fixed handful of operator calls and
# no host-to-device copy. The per-sample functions above stay for the student's training,
# whose recipe is pinned to their random numbers.

VIEW_UNIFORMS = 12  # uniforms per sample: 4 for the geometric transform, 4 jitter per view


_SIGNED_PERMS: dict[str, torch.Tensor] = {}


def _signed_perms(device: torch.device) -> torch.Tensor:
    """(8, 2, 2): quarter turn q then, at 2q + 1, the mirror of x, as ``sample_transforms``
    composes them; made once per device."""
    key = str(device)
    if key not in _SIGNED_PERMS:
        mirror = np.array([[-1, 0], [0, 1]])
        table = [m @ f for m in _ROT for f in (np.eye(2, dtype=int), mirror)]
        _SIGNED_PERMS[key] = torch.tensor(np.stack(table), dtype=torch.float32).to(device)
    return _SIGNED_PERMS[key]


def transforms_from_uniforms(u: torch.Tensor, cfg: AugmentConfig) -> ViewTransform:
    """Geometric transforms with ``sample_transforms``' distribution from uniforms u (B, 4) in
    [0, 1): u0 picks one of the allowed flips x quarter turns (all equally likely), u1 the crop
    scale, u2 and u3 the crop centre."""
    turns, mirrors = 4, (2 if cfg.flip else 1)
    pick = (u[:, 0] * (turns * mirrors)).long()  # (B,) in 0 .. turns * mirrors - 1
    m = _signed_perms(u.device)[pick if cfg.flip else 2 * pick]  # (B, 2, 2)
    lo = cfg.scale_min if cfg.scale_min < 1 else 1.0
    scale = u[:, 1:2] * (1 - lo) + lo  # (B, 1)
    shift = (u[:, 2:4] * 2 - 1) * (1 - scale)  # (B, 2): the crop stays inside the tile
    return ViewTransform(torch.cat([m * scale[:, :, None], shift[:, :, None]], 2))  # (B, 2, 3)


_COLOUR_BASIS: dict[str, torch.Tensor] = {}


def _colour_basis(device: torch.device) -> torch.Tensor:
    """(6, 9): flattened 3x3 matrices [H0, H1, H2, H0 P, H1 P, H2 P], where the hue rotation of
    ``_rotate_hue`` by a is H0 + cos(a) H1 + sin(a) H2 and P = I - 1/3 (the colour minus its
    grey level); made once per device."""
    key = str(device)
    if key not in _COLOUR_BASIS:
        to_yiq = torch.tensor(
            [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
        )
        parts = torch.zeros(3, 3, 3, dtype=torch.float64)
        parts[0, 0, 0] = 1  # the luma axis stays
        parts[1, 1, 1] = parts[1, 2, 2] = 1  # the cos part of the chroma rotation
        parts[2, 2, 1], parts[2, 1, 2] = 1, -1  # the sin part
        hue = torch.linalg.inv(to_yiq) @ parts @ to_yiq  # (3, 3, 3)
        grey_free = torch.eye(3, dtype=torch.float64) - 1 / 3
        _COLOUR_BASIS[key] = torch.cat([hue, hue @ grey_free]).reshape(6, 9).float().to(device)
    return _COLOUR_BASIS[key]


def colour_jitter(
    x: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """``photometric``'s jitter of x (B, 3, H, W) from uniforms u (B, 4) in [0, 1) (brightness,
    contrast, saturation, hue) and standard-normal noise (B, 3, H, W), batched.

    Brightness, contrast around the image mean, saturation around the grey level and the hue
    rotation are all affine in the colour vector, so they compose into one 3x3 matrix and one
    offset per image: x' = (1 + c) H (I + s P) x + (b - c * mean), with P = I - 1/3 (saturation
    scales the colour minus its grey level) and H the hue rotation, which keeps grey."""
    b, _, hh, ww = x.shape
    j = 2 * u - 1  # (B, 4) in [-1, 1)
    contrast, sat = cfg.contrast * j[:, 1:2], cfg.saturation * j[:, 2:3]  # (B, 1)
    angle = (2 * math.pi * cfg.hue) * j[:, 3:4]
    cos, sin = torch.cos(angle), torch.sin(angle)
    coef = torch.cat([torch.ones_like(cos), cos, sin, sat, sat * cos, sat * sin], 1)  # (B, 6)
    mat = (coef * (1 + contrast)).mm(_colour_basis(x.device)).view(b, 3, 3)
    offset = (cfg.brightness * j[:, 0] - contrast[:, 0] * x.mean((1, 2, 3)))[:, None, None]  # (B, 1, 1)
    res = torch.baddbmm(offset, mat, x.reshape(b, 3, hh * ww)).view(b, 3, hh, ww)
    if cfg.noise and noise is not None:
        res.add_(noise, alpha=cfg.noise)
    return res.clamp_(0, 1)


def make_views_batched(
    x: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
    *,
    rows: slice | None = None,
    total: int | None = None,
) -> tuple[torch.Tensor, ViewTransform]:
    """cat([view A, view B]) (2B, 3, H, W) and G (A's frame -> B's) for tiles x (B, 3, H, W),
    every random number drawn from ``generator`` (on x's device).

    ``total`` samples' numbers are drawn and ``rows`` of them used (default: all B): under DDP
    each rank draws the global batch's numbers from the same generator and keeps its own
    rows, so N processes augment exactly like one process at N times the batch."""
    b, _, hh, ww = x.shape
    total = b if total is None else total
    rows = slice(0, b) if rows is None else rows
    u = torch.rand(total, VIEW_UNIFORMS, generator=generator, device=x.device)[rows]  # (B, 12)
    noise = None
    if cfg.noise:
        # (2B, 3, H, W): view A's noise for rows 0..B-1, view B's after.
        noise = torch.randn(2, total, 3, hh, ww, generator=generator, device=x.device)[:, rows].reshape(
            2 * b, 3, hh, ww
        )
    transform = transforms_from_uniforms(u[:, :4], cfg)
    views = torch.cat([x, transform.to_view(x)])  # (2B, 3, H, W)
    jitter = u[:, 4:].reshape(b, 2, 4).transpose(0, 1).reshape(2 * b, 4)  # (2B, 4), same order
    return colour_jitter(views, jitter, cfg, noise), transform
