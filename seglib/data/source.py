"""The training data a config asks for: ``cfg.data`` turned into a step-indexed batch source."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import Config
from .batches import SyntheticBatches
from .tiles import FolderBatches

__all__ = ["make_source"]


def make_source(cfg: Config, *, rank: int = 0, world: int = 1) -> Dataset:
    """Synthetic tiles (``data.synthetic``) or random crops of the tiles in ``data.data_dir``;
    this process's slice (``rank`` of ``world``) of every global batch."""
    d = cfg.data
    if d.synthetic:
        return SyntheticBatches(size=d.size, batch_size=d.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    return FolderBatches(
        d.data_dir,
        size=d.size,
        batch_size=d.batch_size,
        seed=cfg.train.seed,
        rank=rank,
        world=world,
        downscale=d.downscale,
        include=tuple(d.include),
        exclude=tuple(d.exclude),
    )
