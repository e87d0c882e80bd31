"""Which formulation of an op runs: the fused training ones, the eager reference ones, or the
inference ones.

Each kernel of this package computes one quantity in two or three ways that differ only in
rounding and speed. ``reference_ops()`` switches the training step to the plain eager
formulations (one small op per denoising offset, per k-means step, per sample): the yardstick
that the tests hold the fused ones against (docs/performance.md). Without gradient (inference,
evaluation, a frozen teacher) the faster inference formulations run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["fused_training", "inference_numerics", "reference_ops", "use_reference_ops"]

_REFERENCE_OPS = [False]  # a list so the context manager can flip it in place


def use_reference_ops() -> bool:
    """Whether the training step runs the plain eager formulations instead of the fused ones."""
    return _REFERENCE_OPS[0]


@contextlib.contextmanager
def reference_ops(enabled: bool = True) -> Iterator[None]:
    """Context manager: run the reference formulations inside (``use_reference_ops``)."""
    before = _REFERENCE_OPS[0]
    _REFERENCE_OPS[0] = enabled
    try:
        yield
    finally:
        _REFERENCE_OPS[0] = before


def fused_training() -> bool:
    """Whether a step with gradient takes the fused formulations: gradient is recorded and
    ``reference_ops()`` is off."""
    return torch.is_grad_enabled() and not use_reference_ops()


def inference_numerics() -> bool:
    """Whether the faster formulations of a few steps are used: box means as separable sums,
    squared distances as |a|^2 + |b|^2 - 2ab, a written-out normalisation, the guided filter's
    output as multiply-adds. They compute the same quantities with different rounding (about a
    quarter of a student's CPU time). Always without gradient (inference, evaluation, a frozen
    teacher), and in training too unless ``reference_ops()`` asks for the original training
    formulations."""
    return not torch.is_grad_enabled() or not use_reference_ops()
