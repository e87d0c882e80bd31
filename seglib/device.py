"""Device and precision, resolved in one place (no ``.cuda()`` anywhere else)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_device", "autocast", "amp_dtype", "set_threads"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA devices that support it and on CPU; fp16 is never used (it needs loss
    scaling, and the soft k-means statistics overflow it)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support; run with --amp 0")
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``; a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def set_threads(threads: int) -> None:
    """Set torch's intra-op CPU threads (0 keeps the default)."""
    if threads > 0:
        torch.set_num_threads(threads)
