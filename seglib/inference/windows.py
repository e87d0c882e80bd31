"""Window geometry: where the windows of a large image start, how their probabilities blend,
which cells each window finishes, and which windows the clusters are fitted on.

Windows of ``tile`` pixels (a multiple of the model's stride) overlap by at least ``overlap``
pixels; their starts are spread evenly and snapped to the stride so the model's pixel grid lines
up with the whole-image grid (``axis_windows``). Each window's probabilities are weighted by a
separable cosine taper that falls towards every side that has a neighbour, and the weights are
normalised to sum to one at every pixel, so the blend is a convex combination with no visible
seams (``axis_weights``). ``axis_plan`` cuts an axis into cells at every window edge and wherever
a window's weight changes between zero, a taper and one. Pure NumPy: no model here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "DEFAULT_TILE",
    "DEFAULT_OVERLAP",
    "FIT_PIXELS",
    "Tiling",
    "Layout",
    "axis_windows",
    "axis_weights",
    "check_tiling",
    "window_layout",
    "axis_plan",
    "consecutive_runs",
]


Layout = tuple[int, list[int], int, list[int], int]  # stride, row starts, window height, column starts, width

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 128
FIT_PIXELS = 4 << 20  # pixels of the sampled windows the clusters are fitted on, at most


@dataclass(frozen=True)
class Tiling:
    """How an image larger than ``tile`` is cut into windows, and which of them the clusters
    are fitted on.

    Arguments:
      tile: window side in pixels (rounded up to the model's stride by ``checked``).
      overlap: minimum overlap of neighbouring windows, 0..tile/2.
      fit_windows, fit_pixels: the fit sample holds up to ``fit_windows`` windows and no more
        than ``fit_pixels`` pixels in all (the fit holds them in the model at once, so this
        bounds its memory); at least one window.
      seed: which windows the sample draws.
    """

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    fit_windows: int = 16
    fit_pixels: int = FIT_PIXELS
    seed: int = 0

    def checked(self, multiple: int) -> Tiling:
        """This tiling with ``tile`` rounded up to the model's stride ``multiple``; ``ValueError``
        naming the fix for an unusable tile or overlap (``check_tiling``)."""
        return replace(self, tile=check_tiling(self.tile, self.overlap, multiple))

    def layout(self, height: int, width: int, multiple: int) -> Layout:
        """The window grid of a ``height`` x ``width`` image (``window_layout``)."""
        return window_layout(height, width, self.tile, self.overlap, multiple)

    def sample(self, layout: Layout) -> list[tuple[int, int]]:
        """The (y, x) starts of the windows the clusters are fitted on: the grid is split into
        ``n`` equal runs (row-major) and one window is drawn from each, so the sample covers
        the whole image; ``n`` is at most ``fit_windows`` and ``fit_pixels`` pixels' worth."""
        _, ys, lh, xs, lw = layout
        grid = [(y, x) for y in ys for x in xs]
        n = max(1, min(self.fit_windows, len(grid), self.fit_pixels // (lh * lw)))
        edges = np.linspace(0, len(grid), n + 1).astype(int)
        rng = np.random.default_rng(self.seed)
        pick = [int(rng.integers(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        return [grid[i] for i in pick]

    def sample_windows(self, height: int, width: int, multiple: int) -> list[tuple[int, int, int, int]]:
        """``(y, x, h, w)`` of ``sample``'s windows of a ``height`` x ``width`` image, each clipped
        to the image (the last window of a row or column may stick out)."""
        layout = self.layout(height, width, multiple)
        _, _, lh, _, lw = layout
        return [(y, x, min(lh, height - y), min(lw, width - x)) for y, x in self.sample(layout)]


def window_layout(height: int, width: int, tile: int, overlap: int, multiple: int) -> Layout:
    """(stride, row starts, window height, column starts, window width) of the window grid of a
    ``height`` x ``width`` image (``tile`` as ``check_tiling`` returns it, ``multiple`` the model's
    stride)."""
    ys, lh = axis_windows(height, tile, overlap, multiple)
    xs, lw = axis_windows(width, tile, overlap, multiple)
    return multiple, ys, lh, xs, lw


def axis_windows(size: int, tile: int, overlap: int, multiple: int) -> tuple[list[int], int]:
    """Window starts along one axis of ``size`` pixels, and the window length.

    Windows are ``tile`` long (the whole axis when it is shorter) and overlap by at least
    ``overlap``. Every start is a multiple of ``multiple`` (the model's input stride), so each
    window sees the whole image's pixel grid and computes the same features: a window shifted
    by a pixel off that grid changes the labels of a few percent of the pixels. The last window
    therefore ends at or up to ``multiple - 1`` pixels past ``size``; readers clip it and the
    model pads it the way it pads the whole image (``pad_to_stride``).
    """
    if size <= tile:
        return [0], size
    last = -(-(size - tile) // multiple) * multiple
    # n windows spaced about (last / (n - 1)) apart; one ``multiple`` of slack keeps the overlap
    # >= ``overlap`` after the starts are rounded down to the stride.
    n = max(2, math.ceil(last / max(1, tile - overlap - multiple)) + 1)
    step = last / (n - 1)
    starts = sorted({int(i * step) // multiple * multiple for i in range(n - 1)} | {last})
    return starts, tile


def _ramp(n: int) -> np.ndarray:
    """Cosine rise over n pixels, strictly inside (0, 1); ramp + its mirror == 1."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)


def _taper(a: int) -> np.ndarray:
    """Weights (a,) of a window across an overlap of ``a`` pixels, entering at index 0: zero
    over the outer third (where the CNN's receptive field reaches the window's padding and
    its features differ from the whole image's), a cosine rise over the middle third, one
    over the inner third. ``_taper(a) + _taper(a)[::-1] == 1``."""
    margin = a // 3
    return np.concatenate([np.zeros(margin), _ramp(a - 2 * margin), np.ones(margin)])


def axis_weights(starts: list[int], length: int, size: int) -> list[np.ndarray]:
    """Blend weights (length,) of each window along one axis; they sum to 1 at every pixel
    below ``size`` (a last window reaching past ``size`` has weights there that are never used).

    Each window tapers over its overlap with each neighbour (at most half its length) and
    ignores the outer third of it, so a pixel's label comes from windows in which it sits away
    from the border, where the CNN sees padding.
    """
    raw = []
    for i, s in enumerate(starts):
        w = np.ones(length)
        if i > 0:
            a = min(starts[i - 1] + length - s, length // 2)
            w[:a] *= _taper(a)
        if i < len(starts) - 1:
            a = min(s + length - starts[i + 1], length // 2)
            w[length - a :] *= _taper(a)[::-1]
        raw.append(w)
    total = np.zeros(max(size, starts[-1] + length))
    for s, w in zip(starts, raw, strict=True):
        total[s : s + length] += w
    return [(w / total[s : s + length]).astype(np.float32) for s, w in zip(starts, raw, strict=True)]


def check_tiling(tile: int, overlap: int, multiple: int) -> int:
    """The tile rounded up to the stride; ValueError for unusable tile/overlap."""
    if isinstance(tile, bool) or not isinstance(tile, int) or isinstance(overlap, bool) or not isinstance(overlap, int):
        raise ValueError(f"tile and overlap must be integers, got {tile!r} and {overlap!r}")
    tile = -(-tile // multiple) * multiple
    if tile < 4 * multiple:
        raise ValueError(f"tile must be at least {4 * multiple} px for this model (stride {multiple}), got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be in 0..tile/2 = 0..{tile // 2}, got {overlap}; e.g. overlap={tile // 8}")
    return tile


def axis_plan(
    starts: list[int], length: int, size: int
) -> tuple[list[np.ndarray], list[int], list[list[int]], list[int | None], list[int]]:
    """How the windows along one axis share it: (blend weights of each window, cell edges,
    the cells each window has weight in, the one window a cell takes all its weight from (or
    None where windows blend), the last window with weight in each cell).

    Cells are cut at the window edges and wherever a window's weight changes between zero,
    one and in between, so each window's weight in a cell is all zero, all one or a taper. A
    window adds nothing to a cell where its weight is zero (the outer third of an overlap,
    ``axis_weights``), and a cell where one window has all the weight takes that window's
    probabilities as they are: only the cells where weights taper are blended."""
    weights = axis_weights(starts, length, size)
    cuts = {0, size}
    for s, w in zip(starts, weights, strict=True):
        end = min(s + length, size)
        v = w[: end - s]
        kind = (v > 0).astype(np.int8) + (v == 1)  # 0: no weight, 1: a taper, 2: all of it
        cuts.update((s, end, *(s + np.flatnonzero(np.diff(kind)) + 1).tolist()))
    edges = sorted(cuts)
    n = len(edges) - 1
    cells: list[list[int]] = [[] for _ in starts]
    contributors: list[list[int]] = [[] for _ in range(n)]
    for r, (s, w) in enumerate(zip(starts, weights, strict=True)):
        for i in range(n):
            if s <= edges[i] and edges[i + 1] <= s + length and w[edges[i] - s : edges[i + 1] - s].any():
                cells[r].append(i)
                contributors[i].append(r)
    # The weights sum to one, so a cell's only contributor has weight exactly one there.
    sole = [rs[0] if len(rs) == 1 else None for rs in contributors]
    return weights, edges, cells, sole, [rs[-1] for rs in contributors]


def consecutive_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers in sorted ``indices`` as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
