"""Distributed helpers that do nothing without a process group.

Launch with PyTorch's own launcher, e.g.::

    torchrun --standalone --nproc_per_node=2 -m seglib.train_distill --synthetic --steps 100

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; ``setup`` reads them, picks gloo on CPU and
nccl on CUDA, and pins each process to its local GPU. Only rank 0 (``is_main()``) writes
files, logs or prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "is_main", "world_size", "rank", "all_reduce_mean", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _env_info() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
    )


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns (info, this rank's device)."""
    info = _env_info()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity without a process group)."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
