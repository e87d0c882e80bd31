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
from ..models.head import Clusters
from ..models.segmenter import Segmenter
from ..viz import progress_bar
from .forward import argmax_labels, bands_tensor, model_device, model_stride, pad_to_stride
from .pipeline import model_workers, ordered_map, prefetch, timed, torch_threads
from .windows import DEFAULT_OVERLAP, DEFAULT_TILE, Layout, axis_plan, consecutive_runs, window_layout

__all__ = ["FitWindow", "WindowProbs", "blended_cells", "iter_blended"]


FitWindow = tuple[np.ndarray, np.ndarray | None, torch.Tensor | None]


class WindowProbs:
    """A window's probabilities (K, H, W), held as the model returned them: at full resolution,
    or at 1/f of it (``forward(..., upsample=False)``) with the last bilinear step done for each
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


@torch.no_grad()
def blended_cells(
    model: torch.nn.Module,
    source: Source,
    k: int,
    clusters: Clusters,
    layout: Layout,
    *,
    lane: str | None,
    want_probs: bool,
    progress: bool,
    cache: dict[tuple[int, int], FitWindow] | None = None,
    times: dict[str, float] | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """Yield ``(y, x, labels (h, w) uint8, probs (K, h, w) or None)`` for every finished cell.

    Windows are read (and stretched) one or two ahead in a background thread while the model
    runs. Cells are cut by ``axis_plan``: a cell that one window has all the weight of takes
    that window's labels (and probabilities); the others accumulate their windows' weighted
    probabilities until the last window with weight there has been added, and a window adds
    nothing where its weight is zero. Without ``want_probs`` the model's probabilities stay at
    the resolution its last bilinear step starts from (``WindowProbs``): labels come from there,
    full-resolution maps only for the blended cells. The worker threads label their window's
    own cells and weight its share of the blended ones. Nodata pixels get the label ``NODATA``.

    ``rows`` = (top, bottom), two cell edges (``block_edges``): only the cells of those rows, from
    only the rows of windows with weight there, each as the whole pass computes it (a block of a
    raster segmented on its own, e.g. by another process).
    """
    m, ys, lh, xs, lw = layout
    wy, cuts_y, rows_of, sole_y, last_row = axis_plan(ys, lh, source.height)
    wanted = range(len(cuts_y) - 1)  # the rows of cells to yield
    if rows is not None:
        if rows[0] not in cuts_y or rows[1] not in cuts_y:
            raise ValueError(f"rows {rows} are not both cell edges of the window grid (block_edges)")
        wanted = range(cuts_y.index(rows[0]), cuts_y.index(rows[1]))
    needed = [r for r in range(len(ys)) if any(i in wanted for i in rows_of[r])]  # window rows with weight there
    wx, cuts_x, cols_of, sole_x, last_col = axis_plan(xs, lw, source.width)
    wy = [torch.from_numpy(w) for w in wy]
    wx = [torch.from_numpy(w) for w in wx]
    device = model_device(model)
    clusters = clusters.to(device)
    cache = {} if cache is None else cache
    # Leave the last upsampling to the cells (WindowProbs) when only labels are wanted; the
    # windows are made here from uint8 pixels, so their values need no check.
    low = {} if not isinstance(model, Segmenter) else {"upsample": want_probs, "check_values": False}

    def windows() -> Iterator[tuple]:  # the reader thread
        for r in needed:
            y = ys[r]
            for c, x in enumerate(xs):
                h, w = min(lh, source.height - y), min(lw, source.width - x)  # the last may stick out
                with timed(times, "read"):
                    rgb, valid, clustered = cache.pop((y, x), None) or (*source.read_masked(y, x, h, w), None)
                    tensor = pad_to_stride(bands_tensor(rgb), m)  # (1, 3, lh, lw)
                yield r, c, h, w, tensor, valid, clustered

    @torch.no_grad()  # grad mode is per thread: a worker thread must switch it off itself
    def run(window: tuple) -> tuple[list, dict]:  # the model on one window, in a worker thread
        r, c, _, _, rgb, valid, clustered = window
        y, x = ys[r], xs[c]
        kept = {} if clustered is None else {"clustered": clustered}  # a fit window: the encoder ran in the fit
        out = model(rgb.to(device), k, lane=lane, clusters=clusters, **low, **kept)["probs"]  # (1, K, lh, lw) or 1/f
        probs = WindowProbs(out[0].float().cpu(), tuple(rgb.shape[-2:]))
        own, parts = [], {}
        # The cells this window has all the weight of: one rectangle per run, labelled at once.
        for i0, i1 in consecutive_runs([i for i in rows_of[r] if sole_y[i] == r and i in wanted]):
            for j0, j1 in consecutive_runs([j for j in cols_of[c] if sole_x[j] == c]):
                ry = slice(cuts_y[i0] - y, cuts_y[i1 + 1] - y)
                rx = slice(cuts_x[j0] - x, cuts_x[j1 + 1] - x)
                labels = probs.labels(ry, rx)
                if valid is not None:
                    labels[~valid[ry, rx]] = NODATA
                for i in range(i0, i1 + 1):
                    for j in range(j0, j1 + 1):
                        cy = slice(cuts_y[i] - y, cuts_y[i + 1] - y)
                        cx = slice(cuts_x[j] - x, cuts_x[j + 1] - x)
                        cell = labels[
                            cy.start - ry.start : cy.stop - ry.start, cx.start - rx.start : cx.stop - rx.start
                        ]
                        own.append((cuts_y[i], cuts_x[j], cell, probs.probs(cy, cx).numpy() if want_probs else None))
        for i in rows_of[r]:
            if i not in wanted:
                continue
            for j in cols_of[c]:
                if sole_y[i] == r and sole_x[j] == c:
                    continue
                cy, cx = slice(cuts_y[i] - y, cuts_y[i + 1] - y), slice(cuts_x[j] - x, cuts_x[j + 1] - x)
                parts[(i, j)] = probs.probs(cy, cx) * (wy[r][cy, None] * wx[c][None, cx])  # (K, ch, cw), weighted
        return own, parts

    pending: dict[tuple[int, int], torch.Tensor] = {}  # cell -> blended probs so far (K, ch, cw)
    workers, threads = model_workers(device)
    bar = progress_bar(total=len(needed) * len(xs), desc="windows", unit="win", disable=not progress)
    with bar, torch_threads(threads):
        windows_read = prefetch(windows(), depth=2, times=times)
        labelled = ordered_map(run, windows_read, workers=workers, times=times, stage="model")
        for (r, c, _, _, _, valid, _), (done, parts) in labelled:
            y, x = ys[r], xs[c]
            with timed(times, "blend"):
                for (i, j), part in parts.items():
                    acc = pending.get((i, j))
                    if acc is None:
                        pending[(i, j)] = acc = part
                    else:
                        acc += part
                    if last_row[i] == r and last_col[j] == c:
                        del pending[(i, j)]
                        labels = argmax_labels(acc)
                        if valid is not None:  # the cell's pixels, as every window covering it reads them
                            cy, cx = slice(cuts_y[i] - y, cuts_y[i + 1] - y), slice(cuts_x[j] - x, cuts_x[j + 1] - x)
                            labels[~valid[cy, cx]] = NODATA
                        done.append((cuts_y[i], cuts_x[j], labels, acc.numpy() if want_probs else None))
                done.sort(key=lambda cell: cell[:2])  # rows of cells finish top to bottom
            yield from done
            bar.update()


def iter_blended(
    model: torch.nn.Module,
    source: Source,
    k: int,
    clusters: Clusters,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    lane: str | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(y, x, probs (K, h, w))`` for every finished cell of the blended probabilities.

    Cells are cut by all window edges; rows of cells finish top to bottom. Only cells still
    waiting for a later window are held in memory. ``tile`` as ``check_tiling`` returns it.
    """
    layout = window_layout(source.height, source.width, tile, overlap, model_stride(model))
    for y, x, _, probs in blended_cells(
        model, source, k, clusters, layout, lane=lane, want_probs=True, progress=progress
    ):
        yield y, x, probs
