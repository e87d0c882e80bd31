"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..kernels.adamw import FlatAdamW

__all__ = ["CLIP", "WEIGHT_DECAY", "make_optimizer", "make_schedule", "warmup_cosine"]

WEIGHT_DECAY = 1e-4  # AdamW's decoupled weight decay, on every parameter
CLIP = 1.0  # the gradient's total 2-norm is clipped to this


def make_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float = WEIGHT_DECAY
) -> FlatAdamW:
    """``FlatAdamW``, fused (one operator call for all parameters) where PyTorch has a fused
    kernel for the parameters' device (CPU and CUDA), the per-tensor loop elsewhere."""
    named_params = list(named_params)
    try:
        return FlatAdamW(named_params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device without a fused kernel
        return FlatAdamW(named_params, lr=lr, weight_decay=weight_decay, fused=False)


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_schedule(optimizer: torch.optim.Optimizer, *, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of every step: ``warmup_cosine`` times the optimizer's peak rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
