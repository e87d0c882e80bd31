"""Step-indexed training batches: ``source[i]`` is micro-batch ``i``, a pure function of
(seed, i, rank).

Indexing by step instead of iterating a stateful stream is what makes runs resumable to the
exact trajectory (a resumed run asks for the same indices) and lets several DataLoader
workers prefetch without changing what is drawn. Under DDP every rank reads its slice of the
same global batch, so N processes see exactly what one process would see at N times the
batch (``global_index`` numbers samples across ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .synthetic import make_tile, tile_seed

__all__ = ["SyntheticBatches", "StepSampler", "batch_loader", "sample_rngs", "step_generator"]


def sample_rngs(seed: int, indices: torch.Tensor | list[int], purpose: int) -> list[np.random.Generator]:
    """One generator per sample, keyed by (seed, purpose, global sample index)."""
    return [np.random.default_rng([int(seed), int(purpose), int(i)]) for i in indices]


def step_generator(seed: int, purpose: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` keyed by (seed, purpose, micro-batch index): what a
    batched augmentation draws a whole (global) batch's random numbers from, on the device,
    the same in a resumed run and on every rank."""
    key = np.random.SeedSequence([int(seed), int(purpose), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(key[0]) << 32 | int(key[1]))


@dataclass
class SyntheticBatches(Dataset):
    """Micro-batches of procedural tiles: item ``i`` -> {"rgb": (B, 3, S, S), "labels": (B, S, S),
    "index": (B,) global sample ids}.

    Arguments:
      size: tile side (multiple of 16).
      batch_size: samples per rank and micro-batch.
      seed: run seed.
      rank, world: this process's slice of the global batch of ``batch_size * world``.
    """

    size: int = 128
    batch_size: int = 4
    seed: int = 0
    rank: int = 0
    world: int = 1
    length: int = 10**9

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        first = (i * self.world + self.rank) * self.batch_size
        index = torch.arange(first, first + self.batch_size)
        tiles = [make_tile(self.size, seed=tile_seed(self.seed, int(j), "train")) for j in index]
        rgb = torch.from_numpy(np.stack([t.rgb for t in tiles])).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(np.stack([t.labels for t in tiles]))
        return {"rgb": rgb, "labels": labels, "index": index}


class StepSampler(Sampler[int]):
    """Yields micro-batch indices ``start .. stop-1`` in order."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def batch_loader(source: Dataset, start: int, stop: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over micro-batches ``start..stop-1`` of a step-indexed source;
    ``pin_memory`` (for a CUDA run) makes the copy to the device asynchronous."""
    return DataLoader(
        source,
        batch_size=None,
        sampler=StepSampler(start, stop),
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        pin_memory=pin_memory,
    )
