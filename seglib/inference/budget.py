"""The positions a shared legend is fitted on: a fixed budget over any number of files.

    budget = PositionBudget(MAX_POSITIONS, k=6)
    for index, path in enumerate(paths):          # in any order, in any process
        budget.add(file_sample(model, path, index, k=6, **sample, threshold=budget.threshold))
    legend = seglib.inference.legend.fit_positions(model, budget, 6, seed=0, meta={})

Each file contributes the window sample a single-file fit draws from it (``Tiling.sample_windows``),
embedded one window at a time. Every embedding cell (a k-means position) gets a random key from
a generator seeded by ``(seed, the file's index)``, and the legend is fitted on the ``positions``
cells with the smallest keys over all files (a bottom-k sample: uniform over the cells, the same
whatever order the files arrive in, whichever process embedded them). The farthest-point
initialisation's pooled cells are sampled alike, ``positions / init_pool**2`` of them.

So memory is bounded whatever the number of files: a ``PositionBudget`` stores its cells in
place, in storage allocated at the first file for the budget and a 32nd more (D + 2 numbers
per cell: 35 floats for the bundled student, 2^17 cells, ~21 MB), and one file's sample at a time
is embedded. The k-means runs on the cells sorted in that same storage (``take``), not on a
copy. ``threshold`` (the largest key in the budget once it is full) lets a file drop at once the
cells that cannot make the cut, so later files send less.

When all files together have no more cells than the budget, every cell is kept, in file order
then window order then position: exactly the positions (and so the clusters) of fitting all the
windows jointly (``fit_embeddings``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io.rasters import ArraySource, SourceFile, open_source
from .predictor import model_stride, pad_to_stride, to_tensor
from .windows import Tiling

__all__ = ["embed_windows", "opened", "FileSample", "PositionBudget", "file_sample"]


@torch.no_grad()
def embed_windows(
    model: torch.nn.Module, source, windows: Iterable[tuple[int, int, int, int]], *, flip: bool = False
) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """The head's denoised embeddings (1, D, h, w) of each window of ``source``, one window
    through the model at a time, and the windows' uint8 RGB (for cluster colours).

    ``flip`` embeds the horizontally flipped window and flips the embedding back, so its cells
    line up with the unflipped ones (a second view for agreement scores)."""
    m = model_stride(model)
    device = next(model.parameters()).device
    embs, reads = [], []
    for y, x, h, w in windows:
        rgb = source.read(y, x, h, w)
        x_in = pad_to_stride(to_tensor(rgb), m).to(device)  # (1, 3, h', w'), h' and w' multiples of the stride
        if flip:
            x_in = x_in.flip(-1)
        emb = model.clustered_embeddings(x_in)  # (1, D, h'/s, w'/s)
        embs.append(emb.flip(-1) if flip else emb)
        reads.append(rgb)
    return embs, reads


@contextlib.contextmanager
def opened(item) -> Iterator:
    """A window reader for ``item``: a source as it is, an array wrapped, a path opened (and
    closed after use, so a set of files is never held in memory at once)."""
    if isinstance(item, np.ndarray):
        yield ArraySource(item)
    elif isinstance(item, (str, Path)):
        with open_source(item) as source:
            yield source
    elif isinstance(item, SourceFile):  # a file with its read options (--alpha)
        with item.open() as source:
            yield source
    else:
        yield item


@dataclass
class FileSample:
    """The kept cells of one file's fit sample: ``x`` (D, n) positions and ``pooled`` (D, m)
    initialisation cells, each with its keys and its index in the file's full sample."""

    index: int
    name: str
    windows: int
    x: torch.Tensor
    keys: np.ndarray
    order: np.ndarray
    pooled: torch.Tensor
    pooled_keys: np.ndarray
    pooled_order: np.ndarray

    # Pickled (a worker's sample on its way to the client) with the cells as numpy arrays: those
    # travel as raw buffers, where a tensor is written and read back through ``torch.save``
    # (3.5 ms against 0.06 ms for a 512 px file's sample).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "x": self.x.numpy(), "pooled": self.pooled.numpy()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, x=torch.from_numpy(state["x"]), pooled=torch.from_numpy(state["pooled"]))


def _keep(values: torch.Tensor, keys: np.ndarray, budget: int, threshold: float):
    """(values, keys, order) of the at most ``budget`` cells with the smallest keys below
    ``threshold``, in their original order."""
    order = np.flatnonzero(keys < threshold)
    if len(order) > budget:
        order = np.sort(order[np.argpartition(keys[order], budget - 1)[:budget]])
    return values[:, torch.from_numpy(order)], keys[order], order


@torch.no_grad()
def file_sample(
    model: torch.nn.Module,
    item,
    index: int,
    *,
    k: int,
    tiling: Tiling,
    positions: int,
    threshold: tuple[float, float] = (1.0, 1.0),
) -> FileSample:
    """The cells of ``item``'s fit sample (a path, an array or a window reader) that can be in a
    budget of ``positions`` cells: at most that many, with keys below ``threshold`` (one for the
    positions, one for the pooled cells: ``PositionBudget.threshold``). Raises what opening or
    reading the file raises (``ImageReadError`` for a corrupt file). ``tiling``: the file's
    windows and fit sample; its seed and ``index`` seed the keys."""
    m = model_stride(model)
    tiling = tiling.checked(m)
    head = model.head
    with opened(item) as source:
        windows = tiling.sample_windows(source.height, source.width, m)
        embs = embed_windows(model, source, windows)[0]
        name = Path(getattr(source, "name", "image")).name
    x = torch.cat([e.flatten(2)[0] for e in embs], 1)  # (D, n): the windows' cells side by side
    pooled = torch.cat([head.init_cells(e).flatten(2)[0] for e in embs], 1)  # (D, m)
    rng = np.random.default_rng([tiling.seed, index])
    keys, pooled_keys = rng.random(x.shape[1]), rng.random(pooled.shape[1])
    x, keys, order = _keep(x.float().cpu(), keys, positions, threshold[0])
    pooled, pooled_keys, pooled_order = _keep(
        pooled.float().cpu(), pooled_keys, max(k, positions // head.init_pool**2), threshold[1]
    )
    return FileSample(index, name, len(windows), x, keys, order, pooled, pooled_keys, pooled_order)


class _Reservoir:
    """The cells with the smallest keys seen so far, at most ``size``, in storage allocated once
    (at the first cell, when D is known) and filled in place: ``size`` slots for the kept cells
    and a staging area of ``size // 32`` for candidates, merged into the slots of the cells they
    push out. Its memory is that of ``size * 33 / 32`` cells whatever the number of files; a file's
    sample is copied in and can be freed at once. The staging area is a separate allocation,
    freed before the k-means (``take``). Which cells are kept does not depend on the staging
    area's size, only how often it is merged (21 times for 2,000 files of 256 cells: 0.34 s for
    all their adds)."""

    def __init__(self, size: int):
        self.size, self.stage = size, max(1, size // 32)
        self.values: torch.Tensor | None = None  # (D, size): the slots
        self.staging: torch.Tensor | None = None  # (D, stage): the candidates, slots size, size + 1, ...
        self.keys = np.full(size + self.stage, np.inf)
        self.where = np.zeros(size + self.stage, np.int64)  # file index << 40 | the cell's order in its sample
        self.held = 0  # kept cells: slots [0, held)
        self.staged = 0  # candidates: slots [size, size + staged)
        self.threshold = 1.0  # once full: the largest kept key

    def add(self, values: torch.Tensor, keys: np.ndarray, index: int, order: np.ndarray) -> None:
        if not len(keys):
            return
        if self.values is None:
            self.values = torch.empty(values.shape[0], self.size, dtype=values.dtype)
            self.staging = torch.empty(values.shape[0], self.stage, dtype=values.dtype)
        where = index * (1 << 40) + order.astype(np.int64)
        take = min(len(keys), self.size - self.held)  # free slots first
        self._put(self.held, values[:, :take], keys[:take], where[:take])
        self.held += take
        if take and self.held == self.size:
            self.threshold = float(self.keys[: self.size].max())
        rest = take + np.flatnonzero(keys[take:] < self.threshold)
        for start in range(0, len(rest), self.stage):  # the rest compete for the slots
            chunk = rest[start : start + self.stage]
            if self.staged + len(chunk) > self.stage:
                self._merge()
            self._put(self.size + self.staged, values[:, torch.from_numpy(chunk)], keys[chunk], where[chunk])
            self.staged += len(chunk)

    def _put(self, at: int, values: torch.Tensor, keys: np.ndarray, where: np.ndarray) -> None:
        n = len(keys)
        if at < self.size:
            self.values[:, at : at + n] = values
        else:
            self.staging[:, at - self.size : at - self.size + n] = values
        self.keys[at : at + n], self.where[at : at + n] = keys, where

    def _merge(self) -> None:
        """The staged candidates into the slots of the kept cells with larger keys."""
        if not self.staged:
            return
        n = self.size + self.staged
        kept = np.zeros(n, bool)
        kept[np.argpartition(self.keys[:n], self.size - 1)[: self.size]] = True
        freed, incoming = np.flatnonzero(~kept[: self.size]), self.size + np.flatnonzero(kept[self.size : n])
        if len(freed):
            self.values[:, torch.from_numpy(freed)] = self.staging[:, torch.from_numpy(incoming - self.size)]
            self.keys[freed], self.where[freed] = self.keys[incoming], self.where[incoming]
        self.keys[self.size : n] = np.inf
        self.staged = 0
        self.threshold = float(self.keys[: self.size].max())

    def take(self) -> torch.Tensor:
        """(1, D, n) the kept cells in file order, then each file's own order, sorted in the
        reservoir's own storage (one row of n cells at a time through a buffer, not a second
        copy of them all), which the result now holds: the reservoir is spent afterwards."""
        self._merge()
        values, n, where = self.values, self.held, self.where[: self.held]
        self.values, self.staging, self.held, self.staged = None, None, 0, 0
        self.keys, self.where = np.empty(0), np.empty(0, np.int64)  # spent: its bookkeeping freed too
        if values is None:
            return torch.empty(1, 0, 0)
        d, width = values.shape
        order = torch.from_numpy(np.argsort(where, kind="stable"))
        del where
        flat = values.view(-1)
        # Row j goes to flat[j*n : (j+1)*n]: it overlaps only rows up to j, already read.
        for j in range(d):
            flat[j * n : (j + 1) * n] = flat[j * width : j * width + n][order]
        del order
        release_freed_memory()
        return flat[: d * n].view(1, d, n)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). What the reservoir freed (its staging area, keys, the sort's order) sits in the
    heap once glibc has raised its mmap threshold, and the k-means's (K, N) arrays would then come
    on top of it: 8 MiB of the client's peak at 2^18 cells, measured."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


class PositionBudget:
    """The bottom-k sample of the cells of many files' fit samples (see the module docstring)."""

    def __init__(self, positions: int, *, k: int, init_pool: int):
        self.positions, self.k = positions, k
        self.cells = _Reservoir(positions)
        self.pooled = _Reservoir(max(k, positions // init_pool**2))
        self.windows = 0
        self.files: list[tuple[int, str]] = []

    @property
    def threshold(self) -> tuple[float, float]:
        """Keys at or above these (positions, pooled cells) can no longer be kept (1.0 until
        that part of the budget has been full): ``file_sample(..., threshold=)``."""
        return self.cells.threshold, self.pooled.threshold

    def add(self, sample: FileSample) -> None:
        self.cells.add(sample.x, sample.keys, sample.index, sample.order)
        self.pooled.add(sample.pooled, sample.pooled_keys, sample.index, sample.pooled_order)
        self.windows += sample.windows
        self.files.append((sample.index, sample.name))
