"""Device and precision, resolved in one place (no ``.cuda()`` anywhere else)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch
from torch import nn

__all__ = [
    "resolve_device",
    "autocast",
    "amp_dtype",
    "set_threads",
    "available_cores",
    "training_threads",
    "busy_note",
    "COMPILE_MODES",
    "maybe_compile",
]

COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")


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


class _CompiledOrEager:
    """Calls the ``torch.compile``d module; if compiling fails (no C++ compiler, an
    unsupported operation, ...), says why once and runs the eager module from then on.
    Attributes are the eager module's (``no_sync``, ``module``, ...)."""

    def __init__(self, module: nn.Module, compiled: Any, mode: str):
        self.__dict__.update(eager=module, compiled=compiled, mode=mode, failed=None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # the compiler's errors have no common base class
                self.__dict__["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"train.compile={self.mode!r}: compiling failed ({self.failed}); running eager", file=sys.stderr)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.eager, name)


def maybe_compile(module: nn.Module, mode: str) -> nn.Module | _CompiledOrEager:
    """``module`` compiled with ``torch.compile(mode=...)`` ("default", "reduce-overhead": CUDA
    graphs as well, "max-autotune"), falling back to eager with a one-line reason on stderr
    where compiling is not possible; ``mode`` "" returns ``module`` itself (eager, the
    reference that the tests run)."""
    if not mode:
        return module
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {', '.join(map(repr, COMPILE_MODES))}, got {mode!r}")
    try:
        compiled = torch.compile(module, mode=mode)
    except Exception as exc:  # e.g. a Python version torch.compile does not support
        print(
            f"train.compile={mode!r}: torch.compile unavailable ({type(exc).__name__}: {exc}); running eager",
            file=sys.stderr,
        )
        return module
    return _CompiledOrEager(module, compiled, mode)
