"""Device and precision, resolved in one place (no ``.cuda()`` anywhere else)."""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["resolve_device", "autocast", "amp_dtype", "set_threads", "available_cores", "training_threads", "busy_note"]


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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def training_threads(threads: int, device: torch.device) -> int:
    """The torch CPU thread count of a training run. ``threads`` > 0 is taken as given. 0 means
    automatic: torch's default when ``OMP_NUM_THREADS`` is set or the run is on a GPU, else half
    the available cores shared among the processes of this machine (``LOCAL_WORLD_SIZE`` under
    torchrun), at least 1. The training step is many small convolutions; with every core busy
    each op waits for the slowest thread, so a 2-core machine trains fastest on 1 thread, and
    under other load 2 threads were measured 17x slower than 1 (docs in the README)."""
    if threads > 0:
        return threads
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, available_cores() // (2 * local))


def busy_note(threads: int) -> str | None:
    """A one-line warning when ``threads`` torch threads will compete for the CPU with other
    processes (the 1-minute load average plus ``threads`` exceeds the cores), else None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None
    cores = available_cores()
    if threads <= 1 or load + threads <= cores + 0.5:
        return None
    return (
        f"note: the CPU is busy (load average {load:.1f} on {cores} cores) and training uses {threads} torch "
        "threads; threads that wait for each other can make every step many times slower. "
        "Try --threads 1 (config train.threads)"
    )
