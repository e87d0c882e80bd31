"""The windowed pass: every window of a large image through the model, its probabilities
blended with its neighbours' cell by cell, labels handed out as soon as a cell is final.

The raster is cut into cells by all window edges and wherever a window's weight changes between
zero, a taper and one (``seglib.inference.windows.axis_plan``). A cell that one window has all the
weight of takes that window's labels at once; a window adds nothing to a cell where its weight is
zero; the other cells are finished once the last window with weight there has been added.

When only labels are wanted, a ``Segmenter`` hands back its probabilities before the lane's last
bilinear upsampling (``upsample=False``; 1/4 of the resolution for the bundled student) and
``WindowProbs`` labels the window's own cells from there: a pixel whose four source cells agree on
the most probable cluster has it as its label, and only the blocks at label edges are
interpolated. Blended cells get their full-resolution probabilities by upsampling just their part
(the same values).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..io.outputs import NODATA
from ..io.rasters import Source
from ..viz import progress_bar
from .pipeline import model_workers, ordered_map, prefetch, timed, torch_threads
from .predictor import Predictor, argmax_labels, bands_tensor, pad_to_stride
from .windows import Layout, Tiling, axis_plan, consecutive_runs

__all__ = ["FitWindow", "WindowProbs", "blended_cells", "iter_blended"]


FitWindow = tuple[np.ndarray, np.ndarray | None, torch.Tensor | None]


class WindowProbs:
    """A window's probabilities (K, H, W), held as the model returned them: at full resolution,
    or at 1/f of it (``Predictor.window(..., upsample=False)``) with the last bilinear step done for each
    region that asks for it.

    ``probs(ys, xs)`` gives the full-resolution probabilities of a region: the bilinear
    upsampling of the low-resolution rows and columns around it (one cell of margin), the
    values the whole window's upsampling has there (bit for bit for the fast lane's output,
    channels-last with f a power of two; else up to the last bit). ``labels(ys, xs)`` gives the region's
    argmax labels without the full-resolution maps where it can: each output pixel mixes (up
    to) four low-resolution cells with convex weights, so where those four agree on the most
    probable cluster it is the pixel's label (the same rounding for every cluster keeps that
    exact); only the f x f blocks of pixels whose four cells disagree are interpolated (one
    small matrix product) and their argmax taken.
    """

    def __init__(self, probs: torch.Tensor, size: tuple[int, int]):
        k, h, w = probs.shape
        f = size[0] // h if h else 0
        if (h, w) != tuple(size) and not (f >= 2 and (h * f, w * f) == tuple(size)):
            probs = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
            f = 1
        self.p, self.f, self.size = probs, max(f, 1), tuple(size)
        self._labels: np.ndarray | None = None  # (h + 2, w + 2) low-resolution argmax, edge-replicated
        self._padded: torch.Tensor | None = None  # (K, (h + 2) * (w + 2)) probabilities, edge-replicated

    def probs(self, ys: slice, xs: slice) -> torch.Tensor:
        """(K, ys, xs) full-resolution probabilities of a region (window coordinates)."""
        f, p = self.f, self.p
        if f == 1:
            return p[:, ys, xs]
        h, w = p.shape[-2:]
        top, left = max(0, ys.start // f - 1), max(0, xs.start // f - 1)
        bottom, right = min(h, -(-ys.stop // f) + 1), min(w, -(-xs.stop // f) + 1)
        crop = p[None, :, top:bottom, left:right]
        # The layout the model's own upsampling would have read (its kernel rounds alike then).
        layout = torch.channels_last if p[None].is_contiguous(memory_format=torch.channels_last) else None
        crop = crop.contiguous(memory_format=layout or torch.contiguous_format)
        up = F.interpolate(crop, size=((bottom - top) * f, (right - left) * f), mode="bilinear", align_corners=False)
        return up[0, :, ys.start - top * f : ys.stop - top * f, xs.start - left * f : xs.stop - left * f]

    def labels(self, ys: slice, xs: slice) -> np.ndarray:
        """uint8 (ys, xs) argmax labels of a region, first index on ties (``argmax_labels``)."""
        f = self.f
        if f == 1:
            return argmax_labels(self.p[:, ys, xs])
        k, h, w = self.p.shape
        if self._labels is None:
            low = self.p.max(0).indices.to(torch.uint8).numpy()  # (h, w)
            self._labels = np.pad(low, 1, mode="edge")
        # Pixel y samples rows i0, i0 + 1 of the edge-padded map, i0 = floor((y + 0.5) / f + 0.5):
        # blocks of f pixels, the first starting ``o`` pixels above the image.
        o = (f + 1) // 2
        b0, b1 = (ys.start + o) // f, (ys.stop - 1 + o) // f + 1  # block rows
        c0, c1 = (xs.start + o) // f, (xs.stop - 1 + o) // f + 1
        lab = self._labels[b0 : b1 + 1, c0 : c1 + 1]
        corner = lab[:-1, :-1]
        same = (corner == lab[:-1, 1:]) & (corner == lab[1:, :-1]) & (corner == lab[1:, 1:])
        blocks = np.where(same, corner, np.uint8(0)).repeat(f, 0).repeat(f, 1)  # (blocks * f, blocks * f)
        bi, bj = np.nonzero(~same)
        if len(bi):
            if self._padded is None:
                self._padded = F.pad(self.p[None], (1, 1, 1, 1), mode="replicate")[0].contiguous().view(k, -1)
            wp = w + 2
            index = torch.from_numpy(((bi + b0) * wp + bj + c0)[:, None] + np.array([0, 1, wp, wp + 1]))  # (N, 4)
            corners = self._padded[:, index].reshape(-1, 4)  # (K * N, 4): rows i0, i0 + 1 x columns
            lam = (torch.arange(f, dtype=torch.float32) - o + 0.5) / f + 0.5  # (f,) weight of row/column i0 + 1
            wy = torch.stack([1 - lam, lam], 1)  # (f, 2)
            mix = (wy[:, None, :, None] * wy[None, :, None, :]).reshape(f * f, 4).T  # (4, f * f)
            values = (corners @ mix).view(k, -1)  # (K, N * f * f)
            sub = values.max(0).indices.to(torch.uint8).numpy().reshape(-1, f, f)
            blocks.reshape(b1 - b0, f, c1 - c0, f)[bi, :, bj, :] = sub
        y0, x0 = ys.start - (b0 * f - o), xs.start - (c0 * f - o)
        return blocks[y0 : y0 + ys.stop - ys.start, x0 : x0 + xs.stop - xs.start]


class _CellPlan:
    """How the windows of a layout share a ``height`` x ``width`` raster's cells: ``axis_plan``
    along both axes, and what one window contributes to each of its cells."""

    def __init__(self, layout: Layout, height: int, width: int, rows: tuple[int, int] | None = None):
        _, self.ys, lh, self.xs, lw = layout
        wy, self.cuts_y, self.rows_of, self.sole_y, self.last_row = axis_plan(self.ys, lh, height)
        wx, self.cuts_x, self.cols_of, self.sole_x, self.last_col = axis_plan(self.xs, lw, width)
        self.wy = [torch.from_numpy(w) for w in wy]
        self.wx = [torch.from_numpy(w) for w in wx]
        self.wanted = range(len(self.cuts_y) - 1)  # the rows of cells to yield
        if rows is not None:
            if rows[0] not in self.cuts_y or rows[1] not in self.cuts_y:
                raise ValueError(f"rows {rows} are not both cell edges of the window grid (block_edges)")
            self.wanted = range(self.cuts_y.index(rows[0]), self.cuts_y.index(rows[1]))
        # The rows of windows with weight in the wanted cells.
        self.needed = [r for r in range(len(self.ys)) if any(i in self.wanted for i in self.rows_of[r])]

    def cell(self, i: int, j: int, r: int, c: int) -> tuple[slice, slice]:
        """Cell (i, j) in the coordinates of window (r, c)."""
        y, x = self.ys[r], self.xs[c]
        return slice(self.cuts_y[i] - y, self.cuts_y[i + 1] - y), slice(self.cuts_x[j] - x, self.cuts_x[j + 1] - x)

    def own(self, r: int, c: int, probs: WindowProbs, valid: np.ndarray | None, want_probs: bool) -> list:
        """``(y, x, labels, probs or None)`` of the cells window (r, c) has all the weight of,
        labelled one rectangle per run of such cells."""
        cells = []
        rows = [i for i in self.rows_of[r] if self.sole_y[i] == r and i in self.wanted]
        cols = [j for j in self.cols_of[c] if self.sole_x[j] == c]
        for i0, i1 in consecutive_runs(rows):
            for j0, j1 in consecutive_runs(cols):
                (y0, x0), (y1, x1) = self.cell(i0, j0, r, c), self.cell(i1, j1, r, c)
                ry, rx = slice(y0.start, y1.stop), slice(x0.start, x1.stop)
                labels = probs.labels(ry, rx)
                if valid is not None:
                    labels[~valid[ry, rx]] = NODATA
                for i in range(i0, i1 + 1):
                    for j in range(j0, j1 + 1):
                        cy, cx = self.cell(i, j, r, c)
                        oy, ox = cy.start - y0.start, cx.start - x0.start
                        cell = labels[oy : oy + cy.stop - cy.start, ox : ox + cx.stop - cx.start]
                        cell_probs = probs.probs(cy, cx).numpy() if want_probs else None
                        cells.append((self.cuts_y[i], self.cuts_x[j], cell, cell_probs))
        return cells

    def parts(self, r: int, c: int, probs: WindowProbs) -> dict[tuple[int, int], torch.Tensor]:
        """Window (r, c)'s weighted probabilities (K, ch, cw) in each cell it shares."""
        parts = {}
        for i in self.rows_of[r]:
            if i not in self.wanted:
                continue
            for j in self.cols_of[c]:
                if self.sole_y[i] == r and self.sole_x[j] == c:
                    continue
                cy, cx = self.cell(i, j, r, c)
                parts[(i, j)] = probs.probs(cy, cx) * (self.wy[r][cy, None] * self.wx[c][None, cx])
        return parts

    def last(self, i: int, j: int, r: int, c: int) -> bool:
        """Whether window (r, c) is the last with weight in cell (i, j)."""
        return self.last_row[i] == r and self.last_col[j] == c


@torch.no_grad()
def blended_cells(
    predictor: Predictor,
    source: Source,
    layout: Layout,
    *,
    want_probs: bool,
    progress: bool,
    cache: dict[tuple[int, int], FitWindow] | None = None,
    times: dict[str, float] | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """Yield ``(y, x, labels (h, w) uint8, probs (K, h, w) or None)`` for every finished cell,
    each window assigned to the predictor's clusters.

    Windows are read (and stretched) one or two ahead in a background thread while the model
    runs. Cells are cut by ``axis_plan``: a cell that one window has all the weight of takes
    that window's labels (and probabilities); the others accumulate their windows' weighted
    probabilities until the last window with weight there has been added, and a window adds
    nothing where its weight is zero. Without ``want_probs`` the model's probabilities stay at
    the resolution its last bilinear step starts from (``WindowProbs``): labels come from there,
    full-resolution maps only for the blended cells. The worker threads label their window's
    own cells and weight its share of the blended ones. Nodata pixels get the label ``NODATA``.
    ``cache``: windows read for the fit, by (y, x), with what the head clustered for them.
    ``rows`` = (top, bottom), two cell edges (``block_edges``): only the cells of those rows, from
    only the rows of windows with weight there, each as the whole pass computes it (a block of a
    raster segmented on its own, e.g. by another process).
    """
    m, ys, lh, xs, lw = layout
    plan = _CellPlan(layout, source.height, source.width, rows)
    cache = {} if cache is None else cache

    def windows() -> Iterator[tuple]:  # the reader thread
        for r in plan.needed:
            y = ys[r]
            for c, x in enumerate(xs):
                h, w = min(lh, source.height - y), min(lw, source.width - x)  # the last may stick out
                with timed(times, "read"):
                    rgb, valid, clustered = cache.pop((y, x), None) or (*source.read_masked(y, x, h, w), None)
                    tensor = pad_to_stride(bands_tensor(rgb), m)  # (1, 3, lh, lw)
                yield r, c, tensor, valid, clustered

    @torch.no_grad()  # grad mode is per thread: a worker thread must switch it off itself
    def run(window: tuple) -> tuple[list, dict]:  # the model on one window, in a worker thread
        r, c, rgb, valid, clustered = window
        # Labels alone: the last upsampling is left to the cells; a fit window: the encoder ran in the fit.
        out = predictor.window(rgb, upsample=want_probs, clustered=clustered)  # (1, K, lh, lw) or 1/f
        probs = WindowProbs(out[0].float().cpu(), tuple(rgb.shape[-2:]))
        return plan.own(r, c, probs, valid, want_probs), plan.parts(r, c, probs)

    pending: dict[tuple[int, int], torch.Tensor] = {}  # cell -> blended probs so far (K, ch, cw)
    workers, threads = model_workers(predictor.device)
    bar = progress_bar(total=len(plan.needed) * len(xs), desc="windows", unit="win", disable=not progress)
    with bar, torch_threads(threads):
        windows_read = prefetch(windows(), depth=2, times=times)
        labelled = ordered_map(run, windows_read, workers=workers, times=times, stage="model")
        try:
            for (r, c, _, valid, _), (done, parts) in labelled:
                with timed(times, "blend"):
                    for (i, j), part in parts.items():
                        acc = pending.get((i, j))
                        if acc is None:
                            pending[(i, j)] = acc = part
                        else:
                            acc += part
                        if plan.last(i, j, r, c):
                            del pending[(i, j)]
                            labels = argmax_labels(acc)
                            if valid is not None:  # the cell's pixels, as every window covering it reads them
                                labels[~valid[plan.cell(i, j, r, c)]] = NODATA
                            done.append((plan.cuts_y[i], plan.cuts_x[j], labels, acc.numpy() if want_probs else None))
                    done.sort(key=lambda cell: cell[:2])  # rows of cells finish top to bottom
                yield from done
                bar.update()
        finally:
            # Stopped here, not when the generators are collected: an exception's traceback keeps
            # them alive while it climbs, and the caller closes the source on the way; a reader
            # thread still reading it then (Ctrl-C while the model ran) crashed the process.
            labelled.close()
            windows_read.close()


def iter_blended(
    predictor: Predictor, source: Source, *, tiling: Tiling | None = None, progress: bool = False
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(y, x, probs (K, h, w))`` for every finished cell of the blended probabilities of
    ``source``'s windows, assigned to the predictor's clusters.

    Cells are cut by all window edges; rows of cells finish top to bottom. Only cells still
    waiting for a later window are held in memory. ``tiling``: the windows (default ``Tiling()``).
    """
    tiling = (tiling or Tiling()).checked(predictor.stride)
    layout = tiling.layout(source.height, source.width, predictor.stride)
    for y, x, _, probs in blended_cells(predictor, source, layout, want_probs=True, progress=progress):
        yield y, x, probs
