"""What a training run keeps: the checkpoints it writes and resumes from, and the records of its
steps.

A checkpoint (``ckpt_<step>.pt``, written atomically by ``seglib.checkpoint``) holds the model,
the optimizer and its schedule, the stage's own state, the weight average, the RNG states of
torch, numpy and Python, and the history of every logged value, so that a resumed run continues
the same trajectory. Step checkpoints come every ``train.checkpoint_every`` steps and at the
last step; a time-triggered one whenever ``train.checkpoint_minutes`` passed since the previous
save (a kill loses at most that much work), deleted once a later checkpoint exists.

The records of the steps stay on the device until they are read, in one transfer
(``Records.read``): the step itself never waits for the device.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from ..checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    model_checkpoint,
    prune_checkpoints,
    save_atomic,
)
from ..config import Config, TrainConfig

__all__ = [
    "MAX_BAD_STEPS",
    "Checkpoints",
    "NonFiniteLossError",
    "Records",
    "default_checkpoint_dir",
    "rng_state",
    "set_rng_state",
]

_clock = time.monotonic  # the wall clock of time-triggered checkpoints (tests replace it)
MAX_BAD_STEPS = 5  # consecutive steps with a non-finite loss or gradient that stop a run


class NonFiniteLossError(RuntimeError):
    """Raised after ``MAX_BAD_STEPS`` consecutive steps with a non-finite loss or gradient."""


def default_checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.checkpoint_dir or "runs/train")


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (and CUDA), numpy and Python as tensors and plain values."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoint folder of one run and the parts every checkpoint holds.

    Arguments:
      directory: the run's checkpoint folder.
      config: the run's config as a plain dict (``Config.to_dict()``), stored in every checkpoint.
      train: the run's ``train`` settings (when to write, how many to keep).
      task: the stage (``kind``, ``model``, its own ``state_dict``).
      optimizer, scheduler, average: the run's optimizer, learning-rate schedule and weight
        average (None: none).
    """

    def __init__(
        self,
        directory: Path,
        config: dict[str, Any],
        train: TrainConfig,
        task: Any,
        optimizer: Any,
        scheduler: Any,
        average: Any = None,
    ):
        self.directory, self.config, self.train = Path(directory), config, train
        self.task, self.optimizer, self.scheduler, self.average = task, optimizer, scheduler, average
        self.last_save = _clock()

    def start_clock(self) -> None:
        """Count the minutes of time-triggered checkpoints from now (the end of the set-up)."""
        self.last_save = _clock()

    def scheduled(self, step: int) -> bool:
        """Whether ``step`` gets a step checkpoint (kept) rather than a time-triggered one."""
        return _scheduled(step, self.train)

    def timed(self) -> bool:
        """Whether ``train.checkpoint_minutes`` passed since the last save (or the start)."""
        minutes = self.train.checkpoint_minutes
        return minutes > 0 and _clock() - self.last_save >= 60 * minutes

    def save(self, step: int, history: dict[str, list[float]]) -> None:
        """Write the checkpoint of ``step``; older time-triggered ones and step checkpoints past
        ``train.keep_checkpoints`` go."""
        state = model_checkpoint(
            "train-state",
            self.config,
            self.task.model.state_dict(),
            task=self.task.kind,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            task_state=self.task.state_dict(),
            step=step,
            rng=rng_state(),
            history=history,
        )
        if self.average is not None:
            state["ema"] = self.average.state_dict()
        save_atomic(state, checkpoint_path(self.directory, step))
        for older, path in list_checkpoints(self.directory):  # time-triggered ones are superseded now
            if older < step and not _scheduled(older, self.train):
                path.unlink(missing_ok=True)
        prune_checkpoints(self.directory, self.train.keep_checkpoints)
        self.last_save = _clock()

    def resume(self) -> tuple[int, dict[str, list[float]]]:
        """Load the latest complete checkpoint into every part; (its step, its history), or
        (0, {}) when the folder has none."""
        found = latest_checkpoint(self.directory)
        if found is None:
            if dist.is_main():
                print(f"--resume: no checkpoint in {self.directory}, starting from step 0")
            return 0, {}
        path, state = found
        self._check_resumable(state, path)
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.task.load_state_dict(state.get("task_state", {}))
        if self.average is not None and "ema" in state:
            self.average.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        if dist.is_main():
            print(f"resumed from {path} at step {state['step']}")
        return int(state["step"]), {k: list(v) for k, v in state["history"].items()}

    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        kind = self.task.kind
        if state.get("kind") != "train-state" or state.get("task") != kind:
            raise ValueError(
                f"{path} is not a {kind} training checkpoint (kind={state.get('kind')}, task={state.get('task')}); "
                "point --checkpoint_dir at this stage's own folder"
            )
        saved, current = state["config"].get("model"), self.config.get("model")
        if kind == "teacher" and saved != current:
            raise ValueError(
                f"{path} was written with a different model config; resume with the same config "
                f"(saved: {saved}, current: {current})"
            )


def _scheduled(step: int, train: TrainConfig) -> bool:
    return step % max(1, train.checkpoint_every) == 0 or step == train.steps


class Records:
    """The values of every step, kept as device tensors until ``read``, then appended to
    ``history`` (dict of lists: ``step``, ``loss/<term>``, ``train/lr``, ``train/img_per_s``...).

    A step whose loss or gradient was not finite is reported by term (``warn``); after
    ``MAX_BAD_STEPS`` of them in a row ``read`` raises ``NonFiniteLossError``.
    """

    def __init__(self, history: dict[str, list[float]], warn: Callable[[str], None]):
        self.history, self.warn = history, warn
        self.pending: list[dict[str, Any]] = []
        self.bad_steps, self.since = 0, time.perf_counter()

    def add(
        self,
        step: int,
        names: list[str],
        terms: torch.Tensor,
        grad_norm: torch.Tensor,
        bad: torch.Tensor,
        **more: Any,
    ) -> None:
        """The record of ``step``: its loss terms (``names``, stacked into ``terms``), gradient
        norm and skip flag as device tensors (no host read), and ``lr``, ``n_images`` and
        ``scalars`` (a dict of floats or device tensors)."""
        record = {"step": step, "names": names, "terms": terms, "grad_norm": grad_norm.detach(), "bad": bad}
        self.pending.append(record | {"lr": more["lr"], "n_images": more["n_images"], "scalars": dict(more["scalars"])})

    def read(self) -> list[dict[str, Any]]:
        """The pending steps' records ({"step", "values", "bad_terms"}), read in one transfer
        from the device and appended to the history; the wall time since the previous read is
        shared out as the interval's images per second."""
        records, self.since = _read_records(self.pending, self.since), time.perf_counter()
        self.pending = []
        for record in records:
            self.history.setdefault("step", []).append(record["step"])
            for key, value in record["values"].items():
                self.history.setdefault(key, []).append(value)
            if not record["bad_terms"]:
                self.bad_steps = 0
                continue
            self.bad_steps += 1
            terms = ", ".join(record["bad_terms"])
            self.warn(f"step {record['step']}: non-finite {terms}; step skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise NonFiniteLossError(
                    f"{self.bad_steps} consecutive steps had a non-finite loss or gradient (last: step "
                    f"{record['step'] - 1}, term(s) {terms}); lower train.lr, "
                    "check the input data for NaN/inf, or run with --amp 0"
                )
        return records


def _read_records(pending: list[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    if not pending:
        return []
    on_device = []
    for p in pending:
        on_device += [p["terms"], p["grad_norm"].reshape(1), p["bad"].float().reshape(1)]
        on_device += [v.detach().float().reshape(1) for v in p["scalars"].values() if isinstance(v, torch.Tensor)]
    flat = iter(torch.cat(on_device).tolist())
    img_per_s = sum(p["n_images"] for p in pending) * dist.world_size() / max(time.perf_counter() - since, 1e-9)
    records = []
    for p in pending:
        terms = [next(flat) for _ in p["names"]]
        grad_norm, bad = next(flat), next(flat)
        values = {f"loss/{name}": v for name, v in zip(p["names"], terms, strict=True)}
        values.update({"train/lr": p["lr"], "train/grad_norm": grad_norm, "train/skipped": bad})
        values["train/img_per_s"] = img_per_s
        values.update({k: next(flat) if isinstance(v, torch.Tensor) else float(v) for k, v in p["scalars"].items()})
        bad_terms = [name for name, v in zip(p["names"], terms, strict=True) if not math.isfinite(v)]
        if bad and not bad_terms:
            bad_terms = ["gradient"] if not math.isfinite(grad_norm) else ["(on another rank)"]
        records.append({"step": p["step"], "values": values, "bad_terms": bad_terms if bad else []})
    return records
