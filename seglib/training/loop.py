"""The training loop, shared by the teacher and student stages.

One plain function, ``train_loop``, read top to bottom: batch -> forward -> loss dict ->
backward (micro-batches under ``no_sync`` except the last) -> non-finite guard -> clip ->
optimizer step -> log -> checkpoint. What differs between stages lives in a ``Task``: the
module to train and a ``step`` method that turns a batch into a loss dict.

Guarantees:
* same seed, same device, same thread count -> the same losses (the data and augmentations are
  pure functions of (seed, sample index); the soft k-means initialisation uses no randomness);
* ``resume=True`` restarts from the latest complete checkpoint in the checkpoint folder and
  continues the same trajectory (model, optimizer, scheduler, RNG states, history, task state);
  the TensorBoard event files are cut back to that checkpoint's step first (emptied when the
  killed run left no checkpoint and the run starts again from step 0), so the resumed run
  draws every point once;
* checkpoints are written every ``train.checkpoint_every`` steps, at the last step, and
  whenever ``train.checkpoint_minutes`` passed since the previous one, so a kill at any moment
  loses at most that much work; a time-triggered checkpoint is deleted once a later one exists;
* every ``probe.every`` steps the model segments a few fixed images and the label-free proxies
  (and mIoU, with ground truth) are logged (``seglib.training.probe``);
* a non-finite loss or gradient never reaches the weights: the step is skipped and reported by
  term, and ``max_bad_steps`` consecutive bad steps stop the run with ``NonFiniteLossError``;
* under DDP only rank 0 logs, prints and writes files.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist
from ..checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    model_checkpoint,
    prune_checkpoints,
    save_atomic,
)
from ..config import Config
from ..data.batches import batch_loader
from ..device import autocast, maybe_compile
from ..kernels.adamw import FlatAdamW
from ..viz import progress_bar
from .logging import RunLogger, trim_events
from .probe import QualityProbe

__all__ = [
    "StepOutput",
    "Task",
    "NonFiniteLossError",
    "train_loop",
    "warmup_cosine",
    "default_checkpoint_dir",
    "make_optimizer",
]


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient."""


@dataclass
class StepOutput:
    terms: dict[str, torch.Tensor]  # must hold "total"
    n_images: int
    rgb: torch.Tensor | None = None  # (B, 3, H, W) shown in TensorBoard
    probs: torch.Tensor | None = None  # (B, K, H, W)
    scalars: dict[str, float] = field(default_factory=dict)  # extra diagnostics (not losses)
    extra_images: dict[str, torch.Tensor] = field(default_factory=dict)  # more (B, K, H, W) maps to show


class Task(Protocol):
    kind: str
    model: nn.Module  # what the optimizer trains
    inference_model: nn.Module  # the segmenter inside it (``model(rgb, k)``), probed during training

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], index: int) -> StepOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, directory: Path) -> None: ...


_clock = time.monotonic  # the wall clock of time-triggered checkpoints (tests replace it)


def default_checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.checkpoint_dir or "runs/train")


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float) -> FlatAdamW:
    """``FlatAdamW``, fused (one operator call for all parameters) where PyTorch has a fused
    kernel for the parameters' device (CPU and CUDA), the per-tensor loop elsewhere."""
    named_params = list(named_params)
    try:
        return FlatAdamW(named_params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device without a fused kernel
        return FlatAdamW(named_params, lr=lr, weight_decay=weight_decay, fused=False)


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_loop(
    task: Task,
    cfg: Config,
    source: torch.utils.data.Dataset,
    *,
    device: torch.device,
    resume: bool = False,
    callbacks: Iterable[Callable[[int, dict[str, float]], None]] = (),
) -> dict[str, list[float]]:
    """Train ``task.model`` on micro-batches of ``source``; returns the history (dict of lists,
    one entry per step: ``step``, ``loss/<term>``, ``train/lr``, ``train/img_per_s``, ...)."""
    t = cfg.train
    main = dist.is_main()
    if dist.world_size() > 1 and device.type == "cuda" and t.sync_batchnorm:
        # Batch statistics over the global batch; GroupNorm models are left as they are.
        # (PyTorch has no CPU SyncBatchNorm: on CPU each process keeps its own statistics.)
        task.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task.model)
    model = task.model
    # Before DDP wraps the model: the optimizer re-points the parameters at its flat buffers.
    opt = make_optimizer(model.named_parameters(), lr=t.lr, weight_decay=t.weight_decay)
    ddp_model = model
    if dist.world_size() > 1:
        # Refinement lanes are drawn per batch, so some parameters sit out some steps.
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    ddp_model = maybe_compile(ddp_model, t.compile)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(t.steps, t.warmup))
    ckdir = default_checkpoint_dir(cfg)

    ema = WeightAverage(model, t.weight_average_decay) if t.weight_average_decay > 0 else None
    start, history = 0, {}
    if resume:
        found = latest_checkpoint(ckdir)
        if found is None:
            if main:
                print(f"--resume: no checkpoint in {ckdir}, starting from step 0")
        else:
            path, state = found
            _check_resumable(state, task, cfg, path)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            task.load_state_dict(state.get("task_state", {}))
            if ema is not None and "ema" in state:
                ema.load_state_dict(state["ema"])
            _set_rng_state(state["rng"])
            start, history = int(state["step"]), {k: list(v) for k, v in state["history"].items()}
            if main:
                print(f"resumed from {path} at step {start}")

    if main and resume:
        # Events the killed run wrote after its checkpoint would be drawn twice (SummaryWriter's
        # purge_step only hides them from readers that honour it, and hides step `start` too);
        # without a checkpoint the run starts again from step 0 and all of them go.
        trim_events(ckdir / "tb", start if start else None)
    logger = RunLogger(ckdir / "tb", config=cfg.to_dict(), enabled=main)
    probe = _make_probe(task, cfg) if main else None
    if probe is not None and start == 0:
        _log_probe(probe, task, ema, 0, history, logger)  # the weights before training
    last_save = _clock()
    accum = max(1, t.grad_accum)
    batches = iter(
        batch_loader(source, start * accum, t.steps * accum, cfg.data.num_workers, pin_memory=device.type == "cuda")
    )
    bad_steps = 0
    model.train()
    bar = progress_bar(
        range(start, t.steps),
        initial=start,
        total=t.steps,
        disable=not main,
        desc=task.kind,
        dynamic_ncols=True,
    )
    # The step itself never reads a value back from the device: loss terms, gradient norm and
    # the skip decision stay tensors until the records are read, every log_every steps (and
    # before checkpoints, images and the end). The fused AdamW skips a non-finite step on the
    # device; without it the decision is read on the host (one sync a step).
    pending: list[dict[str, Any]] = []
    flushed_at = time.perf_counter()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        n_images, last = 0, None
        for micro in range(accum):
            batch = next(batches)
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = ddp_model.no_sync() if dist.world_size() > 1 and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(device, t.amp):
                    out = task.step(ddp_model, batch, step * accum + micro)
                # A non-finite loss makes non-finite gradients, so every rank still takes part
                # in the all-reduce and every rank then skips the step.
                (out.terms["total"] / accum).backward()
            for name, value in out.terms.items():  # micro-batches may differ in terms (lanes)
                value = value.detach() / accum if accum > 1 else value.detach()
                sums[name] = sums[name] + value if name in sums else value
            n_images += out.n_images
            last = out
        names = list(sums)
        terms = torch.stack([sums[name].float().reshape(()) for name in names])  # one tensor of the terms
        grad_norm = opt.clip_grad_norm_(t.clip if t.clip > 0 else float("inf"))
        bad = ~(torch.isfinite(terms).all() & torch.isfinite(grad_norm))  # () bool, on the device
        if dist.world_size() > 1:  # a term can be non-finite on one rank only
            bad = _any_rank_tensor(bad)
        skipped = opt.step_unless(bad)
        if ema is not None:
            ema.update(skip=skipped)
        sched.step()
        pending.append(
            {
                "step": step + 1,
                "names": names,
                "terms": terms,
                "grad_norm": grad_norm.detach(),
                "bad": bad,
                "lr": sched.get_last_lr()[0],
                "n_images": n_images,
                "scalars": dict(last.scalars),
            }
        )
        log_now = (step + 1) % max(1, t.log_every) == 0
        image_now = last.rgb is not None and (step == start or (step + 1) % max(1, t.image_every) == 0)
        scheduled = _scheduled(step + 1, t)
        probe_now = probe is not None and ((step + 1) % cfg.probe.every == 0 or step + 1 == t.steps)
        timed = main and t.checkpoint_minutes > 0 and _clock() - last_save >= 60 * t.checkpoint_minutes
        if not (log_now or image_now or scheduled or probe_now or timed):
            continue
        # Read the records of the steps since the last read: one transfer from the device.
        records, flushed_at = _read_records(pending, flushed_at), time.perf_counter()
        pending = []
        for record in records:
            history.setdefault("step", []).append(record["step"])
            for key, value in record["values"].items():
                history.setdefault(key, []).append(value)
            if record["bad_terms"]:
                bad_steps += 1
                if main:
                    bar.write(
                        f"step {record['step']}: non-finite {', '.join(record['bad_terms'])}; "
                        f"step skipped ({bad_steps} in a row)",
                        file=sys.stderr,
                    )
                if bad_steps >= t.max_bad_steps:
                    logger.close()
                    raise NonFiniteLossError(
                        f"{bad_steps} consecutive steps had a non-finite loss or gradient (last: step "
                        f"{record['step'] - 1}, term(s) {', '.join(record['bad_terms'])}); lower train.lr, "
                        "check the input data for NaN/inf, or run with --amp 0"
                    )
            else:
                bad_steps = 0
        final = records[-1]["values"]
        if main and log_now:
            logger.scalars(step + 1, final)
            bar.set_postfix(loss=f"{final.get('loss/total', float('nan')):.4f}", refresh=False)
        if main and image_now:
            logger.images(step + 1, last.rgb, last.probs, extra=last.extra_images)
        if probe_now:
            _log_probe(probe, task, ema, step + 1, history, logger)
        if main and (scheduled or timed):
            logger.flush()  # the events up to the checkpoint are on disk when it is
            _save(task, cfg, opt, sched, step + 1, history, ckdir, ema)
            last_save = _clock()
        if log_now or image_now or scheduled:  # the same on every rank (the probe and timed saves are rank 0's)
            dist.barrier()
        for record in records:
            for callback in callbacks:
                callback(record["step"], record["values"])

    if ema is not None:
        model.load_state_dict(ema.state)  # what the run exports (and leaves in task.model)
    if main:
        task.export(ckdir)
        logger.close()
    return history


def _scheduled(step: int, t) -> bool:
    """Whether ``step`` gets a step checkpoint (kept) rather than a time-triggered one."""
    return step % max(1, t.checkpoint_every) == 0 or step == t.steps


def _make_probe(task: Task, cfg: Config) -> QualityProbe | None:
    if cfg.probe.every <= 0:
        return None
    if getattr(task, "inference_model", None) is None:
        print(f"note: the {task.kind} stage has no segmenter to probe; probe.every ignored")
        return None
    return QualityProbe.from_config(cfg)


def _log_probe(
    probe: QualityProbe,
    task: Task,
    ema: WeightAverage | None,
    step: int,
    history: dict[str, list[float]],
    logger: RunLogger,
) -> None:
    """Probe the weights the run would export now (their average when
    ``train.weight_average_decay`` > 0); the scores go to TensorBoard and to
    ``history["probe/step"]``, ``history["probe/<metric>"]``."""
    backup = None
    if ema is not None and ema.updates:
        backup = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        task.model.load_state_dict(ema.state)
    try:
        scores = probe(task.inference_model)
    finally:
        if backup is not None:
            task.model.load_state_dict(backup)
    logger.scalars(step, scores)
    history.setdefault("probe/step", []).append(step)
    for key, value in scores.items():
        history.setdefault(key, []).append(float(value))


class WeightAverage:
    """Exponential moving average of a model's floating-point parameters and buffers.

    ``update()`` after every optimizer step; the effective decay ramps up as
    min(decay, (1 + n) / (10 + n)) so the average is not dominated by the initial weights.
    Integer buffers (BatchNorm's batch counter) are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay, self.updates = model, float(decay), 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, skip: torch.Tensor | bool = False) -> None:
        """One averaging step, after an optimizer step; ``skip`` (what ``FlatAdamW.step_unless``
        returns: a bool, or a bool tensor read on the device) leaves the average and its step
        count as they are, for an optimizer step that was skipped."""
        if skip is True:
            return
        if skip is False:
            self.updates += 1
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            for key, value in self.model.state_dict().items():
                if value.is_floating_point():
                    self.state[key].lerp_(value.detach(), 1 - decay)
                else:
                    self.state[key].copy_(value)
            return
        keep = (~skip).float()
        if not isinstance(self.updates, torch.Tensor):
            self.updates = torch.tensor(float(self.updates), device=skip.device)
        self.updates += keep
        n = self.updates
        weight = (1 - torch.clamp((1 + n) / (10 + n), max=self.decay)) * keep  # 0 when skipped
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                self.state[key].lerp_(value.detach(), weight.to(value.dtype))
            else:
                self.state[key].copy_(torch.where(skip, self.state[key], value))

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "updates": int(self.updates)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state = {k: v.clone() for k, v in saved["state"].items()}
        self.updates = int(saved["updates"])


def _any_rank_tensor(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a bool tensor) or-ed over all ranks, without reading it on the host."""
    value = flag.float()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value > 0


def _read_records(pending: list[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    """Host-side records of the pending steps, their device values read in one transfer; the
    wall time since the previous read is shared out as the interval's images per second."""
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


def _save(
    task: Task,
    cfg: Config,
    opt,
    sched,
    step: int,
    history: dict[str, list[float]],
    ckdir: Path,
    ema: WeightAverage | None = None,
) -> None:
    state = model_checkpoint(
        "train-state",
        cfg.to_dict(),
        task.model.state_dict(),
        task=task.kind,
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        task_state=task.state_dict(),
        step=step,
        rng=_rng_state(),
        history=history,
    )
    if ema is not None:
        state["ema"] = ema.state_dict()
    save_atomic(state, checkpoint_path(ckdir, step))
    for older, path in list_checkpoints(ckdir):  # time-triggered ones are superseded now
        if older < step and not _scheduled(older, cfg.train):
            path.unlink(missing_ok=True)
    prune_checkpoints(ckdir, cfg.train.keep_checkpoints)


def _check_resumable(state: dict[str, Any], task: Task, cfg: Config, path: Path) -> None:
    if state.get("kind") != "train-state" or state.get("task") != task.kind:
        raise ValueError(
            f"{path} is not a {task.kind} training checkpoint (kind={state.get('kind')}, task={state.get('task')}); "
            "point --checkpoint_dir at this stage's own folder"
        )
    saved, current = state["config"].get("model"), cfg.to_dict().get("model")
    if task.kind == "teacher" and saved != current:
        raise ValueError(
            f"{path} was written with a different model config; resume with the same config "
            f"(saved: {saved}, current: {current})"
        )
