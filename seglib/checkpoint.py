"""Checkpoints: atomic writes, safe loads, rotation, and finding the latest complete one.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: loading never executes pickled code. It always carries
``format``, ``kind`` (``teacher``, ``student``, ``decoder`` or ``train-state``; a train-state
names its stage in ``task``) and the full ``config`` dict (``model_checkpoint`` builds one); a
model is rebuilt from the config's ``model`` section (and ``student`` for a student) alone.

Writes go to ``<name>.tmp`` in the same folder, are flushed and fsync'ed, then renamed over
the final name (``os.replace`` is atomic on POSIX and Windows), so a killed process leaves
either the previous checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "CheckpointError",
    "model_checkpoint",
    "save_atomic",
    "load_checkpoint",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
]

FORMAT = "seglib-checkpoint-v1"
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A file that is not a usable seglib checkpoint; the message says why and what to do."""


def model_checkpoint(kind: str, config: dict[str, Any], weights: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of one kind: ``config`` is ``Config.to_dict()``, ``weights`` a
    ``state_dict``; ``extra`` adds keys (a training state's optimizer, step, ...)."""
    return {"format": FORMAT, "kind": kind, "config": config, "model": weights, **extra}


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # Make the rename itself durable.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsync'ed on some systems
        pass
    return path


def load_checkpoint(path: str | Path, *, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format and kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it is not loaded "
            f"(loading it could run arbitrary code): {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a seglib checkpoint (no format tag '{FORMAT}'); "
            "pass a file written by seglib training (ckpt_*.pt, teacher.pt or student.pt)"
        )
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else kind
        if obj.get("kind") not in kinds:
            raise CheckpointError(
                f"{path} is a '{obj.get('kind')}' checkpoint, but a {' or '.join(kinds)} checkpoint is needed here"
            )
    return obj


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the ``ckpt_*.pt`` files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads cleanly (a damaged newest file is skipped)."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError:
            continue
    return None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``keep`` <= 0 keeps everything)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
