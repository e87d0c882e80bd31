"""Procedural aerial-like tiles with ground-truth land-cover maps.

Each tile holds 2 to 8 classes laid out the way aerial scenes are: large smooth regions
(fields, water, bare land) from a warped Voronoi partition, thin long structures (roads) and
compact blobs (buildings). Every class has a mean colour *and* a texture; on purpose, some
class pairs share the same mean colour and differ only in texture, so that clustering colour
alone cannot separate them (that is what the learned model has to beat).

Textures are defined in pixels (a fixed ground sampling distance), layouts in fractions of the
tile, so a 128 px tile looks like a crop of a 512 px one, not a shrunken one.

Everything is a pure function of a seed: ``make_tile(seed=...)`` always returns the same
tile, ``SyntheticTiles`` maps an index to a tile, and ``eval_set`` is the fixed test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SyntheticTile", "make_tile", "eval_set", "tile_seed", "TEXTURES"]

# Aerial-looking base colours (sRGB in [0, 1]).
PALETTE = np.array(
    [
        [0.33, 0.45, 0.22],  # crop green
        [0.20, 0.30, 0.16],  # dark vegetation
        [0.76, 0.68, 0.52],  # sand
        [0.60, 0.50, 0.38],  # bare soil
        [0.55, 0.55, 0.53],  # concrete
        [0.30, 0.31, 0.33],  # asphalt
        [0.16, 0.30, 0.38],  # water
        [0.62, 0.36, 0.28],  # red roof
        [0.85, 0.84, 0.80],  # white roof
        [0.45, 0.52, 0.30],  # dry grass
    ],
    dtype=np.float32,
)

TEXTURES = ("smooth", "stripes", "grid", "speckle", "blotchy", "dots")

# Split namespaces keep the training stream and the evaluation set disjoint for any seed.
_TRAIN, _EVAL = 0, 1


@dataclass(frozen=True)
class SyntheticTile:
    """One generated tile: ``rgb`` float32 (H, W, 3) in [0, 1], ``labels`` int64 (H, W)
    with ids 0..n_classes-1 (all present), and the texture and kind of each class."""

    rgb: np.ndarray
    labels: np.ndarray
    textures: tuple[str, ...]
    kinds: tuple[str, ...]  # "region", "road" or "building" per class

    @property
    def n_classes(self) -> int:
        return len(self.textures)


def tile_seed(seed: int, index: int, split: str = "train", rank: int = 0) -> np.random.SeedSequence:
    """The seed sequence of tile ``index`` of a split; stateless so runs resume exactly."""
    space = {"train": _TRAIN, "eval": _EVAL}[split]
    return np.random.SeedSequence([int(seed), space, int(rank), int(index)])


def make_tile(
    size: int = 512,
    *,
    seed: int | np.random.SeedSequence = 0,
    n_classes: int | None = None,
    min_classes: int = 2,
    max_classes: int = 8,
    extent: int | None = None,
) -> SyntheticTile:
    """Generate one tile of ``size`` x ``size`` pixels (``size`` divisible by 4).

    Arguments:
      size: tile side in pixels; must be a positive multiple of 4.
      seed: an int or a ``numpy.random.SeedSequence``; same seed, same tile.
      n_classes: force the number of classes (2..8); drawn uniformly when None.
      min_classes, max_classes: the range drawn from when ``n_classes`` is None.
      extent: lay the scene out as if the tile were ``extent`` pixels wide and return a
        random ``size`` window of it (a training crop of a full-size tile). Classes that fall
        outside the window are dropped, so a window may hold a single class.
    """
    if size <= 0 or size % 4:
        raise ValueError(f"tile size must be a positive multiple of 4, got {size}")
    extent = size if extent is None else int(extent)
    if extent < size:
        raise ValueError(f"extent ({extent}) must be at least the tile size ({size})")
    rng = np.random.default_rng(seed)
    c = int(n_classes) if n_classes is not None else int(rng.integers(min_classes, max_classes + 1))
    if not 2 <= c <= 8:
        raise ValueError(f"n_classes must be in 2..8, got {c}")

    origin = rng.integers(0, extent - size + 1, 2) if extent > size else np.zeros(2, dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    grid = (yy + float(origin[0]), xx + float(origin[1]))
    labels, kinds = _layout(rng, grid, extent, c)
    # Relabel so that ids are 0..n-1 and every id is present (a class can be painted over).
    present = np.unique(labels)
    remap = np.full(c, -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    labels = remap[labels]
    kinds = [kinds[i] for i in present]

    colours, textures = _appearance(rng, kinds)
    rgb = _render(rng, labels, colours, textures, extent)
    return SyntheticTile(rgb=rgb, labels=labels, textures=tuple(textures), kinds=tuple(kinds))


def eval_set(n: int = 32, size: int = 512, seed: int = 123) -> list[SyntheticTile]:
    """The fixed, seeded evaluation set (disjoint from every training stream)."""
    return [make_tile(size, seed=tile_seed(seed, i, "eval")) for i in range(n)]


# ----------------------------------------------------------------------------- layout

Grid = tuple[np.ndarray, np.ndarray]  # (yy, xx) pixel coordinates in the scene frame


def _layout(rng: np.random.Generator, grid: Grid, extent: int, c: int) -> tuple[np.ndarray, list[str]]:
    """Class map (H, W) and the kind of each class ("region", "road" or "building")."""
    n_road = int(c >= 3 and rng.random() < 0.6)
    n_building = int(c >= 3 and rng.random() < 0.6)
    n_region = c - n_road - n_building
    kinds = ["region"] * n_region + ["road"] * n_road + ["building"] * n_building

    labels = _regions(rng, grid, extent, n_region)
    if n_building:
        _draw_buildings(rng, grid, extent, labels, n_region + n_road)
    if n_road:
        _draw_roads(rng, grid, extent, labels, n_region)
    return labels, kinds


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std noise blurred at ``sigma`` pixels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _regions(rng: np.random.Generator, grid: Grid, extent: int, n: int) -> np.ndarray:
    """A domain-warped Voronoi partition in which each of ``n`` classes owns some cells."""
    n_cells = int(rng.integers(max(n, 3), 3 * n + 4))
    cells = rng.random((n_cells, 2)) * extent
    owner = np.concatenate([rng.permutation(n), rng.integers(0, n, n_cells - n)])[:n_cells]
    yy, xx = grid
    # Warping the coordinates gives the cells organic, field-like boundaries.
    amp = extent * rng.uniform(0.02, 0.06)
    yy = yy + amp * _smooth_noise(rng, yy.shape, extent / 10)
    xx = xx + amp * _smooth_noise(rng, xx.shape, extent / 10)
    d2 = (yy[None] - cells[:, 0, None, None]) ** 2 + (xx[None] - cells[:, 1, None, None]) ** 2
    return owner[np.argmin(d2, axis=0)].astype(np.int64)


def _draw_roads(rng: np.random.Generator, grid: Grid, extent: int, labels: np.ndarray, cls: int) -> None:
    """Thin, gently curving roads crossing the scene."""
    yy, xx = grid
    for _ in range(int(rng.integers(1, 4))):
        width = max(2.0, extent * rng.uniform(0.008, 0.02))
        angle = rng.uniform(0, np.pi)
        normal = np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)
        offset = rng.uniform(0.2, 0.8) * extent
        # Signed distance to a line, bent by a low-frequency wiggle along the road.
        along = -normal[1] * yy + normal[0] * xx
        bend = extent * rng.uniform(0.0, 0.05) * np.sin(along / extent * rng.uniform(1, 4) + rng.uniform(0, 6))
        dist = np.abs(normal[0] * yy + normal[1] * xx - offset - bend)
        labels[dist < width / 2] = cls


def _draw_buildings(rng: np.random.Generator, grid: Grid, extent: int, labels: np.ndarray, cls: int) -> None:
    """Compact rotated rectangles, clustered around a few block centres."""
    yy, xx = grid
    centres = rng.random((int(rng.integers(1, 4)), 2)) * extent
    for _ in range(int(rng.integers(3, 12))):
        cy, cx = centres[rng.integers(len(centres))] + rng.normal(0, extent * 0.12, 2)
        h, w = extent * rng.uniform(0.03, 0.09, 2)
        angle = rng.uniform(0, np.pi / 2)
        dy, dx = yy - cy, xx - cx
        u = np.cos(angle) * dx + np.sin(angle) * dy
        v = -np.sin(angle) * dx + np.cos(angle) * dy
        labels[(np.abs(u) < w / 2) & (np.abs(v) < h / 2)] = cls


# ------------------------------------------------------------------------- appearance


def _appearance(rng: np.random.Generator, kinds: list[str]) -> tuple[np.ndarray, list[str]]:
    """A mean colour and a texture per class, with some colour-twins told apart by texture."""
    c = len(kinds)
    base = rng.choice(len(PALETTE), size=c, replace=c > len(PALETTE))
    colours = PALETTE[base] + rng.normal(0, 0.03, (c, 3)).astype(np.float32)
    textures = []
    for kind in kinds:
        if kind == "road":
            textures.append("smooth")
        elif kind == "building":
            textures.append(str(rng.choice(["smooth", "grid"])))
        else:
            textures.append(str(rng.choice(TEXTURES)))
    # Colour twins: a region class copies another class's mean colour but must differ in
    # texture. About half the tiles with 3+ classes get one pair, some get two.
    regions = [i for i, k in enumerate(kinds) if k == "region"]
    n_pairs = int(rng.random() < 0.6) + int(rng.random() < 0.25) if c >= 3 else int(rng.random() < 0.4)
    for _ in range(n_pairs):
        if not regions or c < 2:
            break
        a = int(rng.choice(regions))
        others = [i for i in range(c) if i != a]
        b = int(rng.choice(others))
        colours[a] = colours[b]
        textures[a] = str(rng.choice([t for t in TEXTURES if t != textures[b]]))
    return np.clip(colours, 0.05, 0.95), textures


def _texture(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A zero-mean luminance pattern (H, W) of the named texture (amplitudes in [0, 1] units)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if name == "smooth":
        return 0.015 * rng.standard_normal((size, size)).astype(np.float32)
    if name == "stripes":  # crop rows
        period = rng.uniform(5, 12)
        angle = rng.uniform(0, np.pi)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period
        return rng.uniform(0.10, 0.16) * np.sin(phase)
    if name == "grid":  # orchards, urban blocks
        period = rng.uniform(6, 12)
        angle = rng.uniform(0, np.pi / 2)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        v = -np.sin(angle) * xx + np.cos(angle) * yy
        cells = (np.sin(u * 2 * np.pi / period) > 0.3) | (np.sin(v * 2 * np.pi / period) > 0.3)
        return rng.uniform(0.10, 0.15) * (cells.astype(np.float32) - cells.mean())
    if name == "speckle":  # scrub, rubble
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 0.8)
        return rng.uniform(0.10, 0.15) * noise / (noise.std() + 1e-8)
    if name == "blotchy":  # patchy grass, wet sand
        return rng.uniform(0.06, 0.10) * _smooth_noise(rng, (size, size), rng.uniform(4, 8))
    if name == "dots":  # tree plantations
        spots = (rng.random((size, size)) < rng.uniform(0.01, 0.03)).astype(np.float32)
        spots = ndimage.gaussian_filter(spots, 1.5)
        spots = spots / (spots.max() + 1e-8)
        return -rng.uniform(0.20, 0.30) * (spots - spots.mean())
    raise ValueError(f"unknown texture {name!r}; choose one of {TEXTURES}")


def _render(
    rng: np.random.Generator, labels: np.ndarray, colours: np.ndarray, textures: list[str], extent: int
) -> np.ndarray:
    size = labels.shape[0]
    rgb = colours[labels]  # (H, W, 3)
    for cls, name in enumerate(textures):
        mask = labels == cls
        pattern = _texture(rng, name, size)[mask]
        # Mostly luminance, with a slight tint so textures are not perfectly grey.
        tint = 1.0 + rng.normal(0, 0.15, 3).astype(np.float32)
        rgb[mask] += pattern[:, None] * tint[None]
    # Sensor-like effects: slow illumination change, a soft point-spread, noise.
    light = 1.0 + 0.05 * _smooth_noise(rng, (size, size), extent / 4)
    rgb = rgb * light[..., None]
    rgb = ndimage.gaussian_filter(rgb, (0.6, 0.6, 0))
    rgb = rgb + rng.normal(0, 0.01, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)
