"""What an archive run does, decided before any work: its settings, inputs, outputs and blocks.

Nothing here imports dask: the plan is plain data that the client keeps and the tasks receive.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ...io.images import list_inputs as expand_inputs
from ..kselect import DEFAULT_RANGE
from ..windows import DEFAULT_OVERLAP, DEFAULT_TILE, FIT_PIXELS, Tiling, axis_plan

__all__ = ["Settings", "expand_inputs", "input_identity", "block_edges", "BLOCK_SIZE"]

BLOCK_SIZE = 8192  # a raster of more than BLOCK_SIZE**2 pixels is split into blocks of about that many


@dataclass(frozen=True)
class Settings:
    """Everything that decides an archive run's outputs besides the model and the legend.

    ``k``: K (2..16), ``"auto"`` (picked per file) or None with a loaded legend. ``checkpoint``:
    a path every worker can read (None: the bundled model). ``block_size``: rasters of more than
    ``block_size**2`` pixels are split into row blocks of about that many pixels, segmented on
    different workers (``BLOCK_SIZE``; 0 never splits). The others are ``python -m
    seglib.predict``'s options of the same names."""

    k: int | str | None = None
    checkpoint: str | None = None
    device: str = "cpu"
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    lane: str | None = None
    fit_windows: int = 16
    seed: int = 0
    k_range: tuple[int, int] = DEFAULT_RANGE
    vector: str | None = None
    min_area: object | None = None
    preview: bool = False
    overviews: bool = False
    block_size: int = BLOCK_SIZE
    alpha: str = "auto"
    colours: str = "mean"

    @property
    def tiling(self) -> Tiling:
        """The windows and the fit sample these settings give (``Tiling``)."""
        return Tiling(self.tile, self.overlap, self.fit_windows, FIT_PIXELS, self.seed)

    def key(self) -> str:
        """A SHA-256 of the settings that shape the outputs (not where the work runs)."""
        shaping = {name: value for name, value in asdict(self).items() if name not in ("device", "checkpoint")}
        shaping["min_area"] = repr(self.min_area)
        return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()


def input_identity(path: Path) -> list:
    """What says that an input is the same file as in an earlier run: its resolved path, size
    and modification time (a VRT's own file only: rewrite it when its sources change)."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def block_edges(starts: list[int], length: int, size: int, block: int) -> list[int]:
    """Row edges (0, ..., size) of the blocks a raster of ``size`` rows is split into: cell
    edges of the window grid (``axis_plan``) about ``block`` rows apart, so that each block's
    cells are whole and come out as the pass over the whole raster computes them."""
    cuts = axis_plan(starts, length, size)[1]
    edges = [0]
    for cut in cuts[1:-1]:
        if cut - edges[-1] >= block and size - cut >= block // 2:
            edges.append(cut)
    return [*edges, size]
