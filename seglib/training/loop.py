"""The training loop, shared by the teacher and student stages.

One plain function, ``train_loop``, read top to bottom: batch -> forward -> loss dict ->
backward (micro-batches under ``no_sync`` except the last) -> non-finite guard -> clip ->
optimizer step -> log -> checkpoint. What differs between stages lives in a ``Task``: the
module to train and a ``step`` method that turns a batch into a loss dict.

Guarantees:
* same seed, same device, same thread count -> the same losses (the data and augmentations are
  pure functions of (seed, sample index); the soft k-means initialisation uses no randomness);
* ``resume=True`` restarts from the latest complete checkpoint in the checkpoint folder and
  continues the same trajectory (``seglib.training.state``); the TensorBoard event files are
  cut back to that checkpoint's step first (emptied when the killed run left no checkpoint and
  the run starts again from step 0), so the resumed run draws every point once;
* checkpoints are written every ``train.checkpoint_every`` steps, at the last step, and
  whenever ``train.checkpoint_minutes`` passed since the previous one; TensorBoard images come
  with the step checkpoints and at the first step;
* every ``probe.every`` steps the model segments a few fixed images and the label-free proxies
  (and mIoU, with ground truth) are logged (``seglib.training.probe``);
* a non-finite loss or gradient never reaches the weights: the step is skipped and reported by
  term, and ``MAX_BAD_STEPS`` consecutive bad steps stop the run with ``NonFiniteLossError``;
* the step never reads a value back from the device: loss terms, gradient norm and the skip
  decision stay tensors until the records are read, every ``train.log_every`` steps (and before
  checkpoints, images, probes and the end);
* under DDP only rank 0 logs, prints and writes files; BatchNorm layers become SyncBatchNorm
  on CUDA.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist
from ..config import Config, TrainConfig
from ..data.batches import batch_loader
from ..device import autocast, maybe_compile
from ..kernels.adamw import FlatAdamW
from ..viz import progress_bar
from .averaging import WeightAverage
from .logging import RunLogger, trim_events
from .optim import CLIP, make_optimizer, make_schedule
from .probe import QualityProbe
from .state import Checkpoints, NonFiniteLossError, Records, default_checkpoint_dir

__all__ = ["StepOutput", "Task", "NonFiniteLossError", "train_loop"]


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


def train_loop(
    task: Task,
    cfg: Config,
    source: torch.utils.data.Dataset,
    *,
    config: dict[str, Any],
    device: torch.device,
    resume: bool = False,
    callbacks: Iterable[Callable[[int, dict[str, float]], None]] = (),
) -> dict[str, list[float]]:
    """Train ``task.model`` on micro-batches of ``source``; returns the history (dict of lists,
    one entry per step: ``step``, ``loss/<term>``, ``train/lr``, ``train/img_per_s``, ...).
    ``config`` is ``cfg`` as a plain dict (``cfg.to_dict()``, made once by the caller): what every
    checkpoint and the TensorBoard run store."""
    t, main = cfg.train, dist.is_main()
    model, step_model, opt = _prepare(task, device, t)
    sched = make_schedule(opt, steps=t.steps, warmup=t.warmup)
    average = WeightAverage(model, t.weight_average_decay) if t.weight_average_decay > 0 else None
    saves = Checkpoints(default_checkpoint_dir(cfg), config, t, task, opt, sched, average)
    start, history = saves.resume() if resume else (0, {})
    if main and resume:
        # Events the killed run wrote after its checkpoint would be drawn twice (SummaryWriter's
        # purge_step only hides them from readers that honour it, and hides step `start` too).
        trim_events(saves.directory / "tb", start if start else None)
    logger = RunLogger(saves.directory / "tb", config=saves.config, enabled=main)
    # Closed however the run ends (Ctrl-C too): its writer thread may hold events a resume needs.
    with contextlib.closing(logger):
        probe = _make_probe(task, cfg) if main else None
        if probe is not None and start == 0:
            _log_probe(probe, task, average, 0, history, logger)  # the weights before training
        saves.start_clock()
        accum = max(1, t.grad_accum)
        pin = device.type == "cuda"
        batches = iter(batch_loader(source, start * accum, t.steps * accum, cfg.data.num_workers, pin_memory=pin))
        model.train()
        bar = progress_bar(
            range(start, t.steps), initial=start, total=t.steps, disable=not main, desc=task.kind, dynamic_ncols=True
        )
        records = Records(history, warn=lambda text: bar.write(text, file=sys.stderr) if main else None)
        for step in bar:
            done = step + 1
            opt.zero_grad(set_to_none=True)
            last, terms, n_images = _accumulate(task, step_model, batches, step, accum, device, t.amp)
            names, stacked = list(terms), torch.stack([value.float().reshape(()) for value in terms.values()])
            grad_norm = opt.clip_grad_norm_(CLIP)
            bad = _any_rank(~(torch.isfinite(stacked).all() & torch.isfinite(grad_norm)))  # () bool, on the device
            skipped = opt.step_unless(bad)
            if average is not None:
                average.update(skip=skipped)
            sched.step()
            records.add(
                done, names, stacked, grad_norm, bad, lr=sched.get_last_lr()[0], n_images=n_images, scalars=last.scalars
            )
            log_now = done % max(1, t.log_every) == 0
            scheduled, timed = saves.scheduled(done), main and saves.timed()
            image_now = last.rgb is not None and (step == start or scheduled)
            probe_now = probe is not None and (done % cfg.probe.every == 0 or done == t.steps)
            if not (log_now or image_now or scheduled or probe_now or timed):
                continue
            read = records.read()  # the records since the last read: one transfer from the device
            if main and log_now:
                logger.scalars(done, read[-1]["values"])
                bar.set_postfix(loss=f"{read[-1]['values'].get('loss/total', float('nan')):.4f}", refresh=False)
            if main and image_now:
                logger.images(done, last.rgb, last.probs, extra=last.extra_images)
            if probe_now:
                _log_probe(probe, task, average, done, history, logger)
            if main and (scheduled or timed):
                logger.flush()  # the events up to the checkpoint are on disk when it is
                saves.save(done, history)
            if log_now or image_now or scheduled:  # the same on every rank (the probe and timed saves are rank 0's)
                dist.barrier()
            for record in read:
                for callback in callbacks:
                    callback(record["step"], record["values"])
        if average is not None:
            model.load_state_dict(average.state)  # what the run exports (and leaves in task.model)
        if main:
            task.export(saves.directory)
    return history


def _prepare(task: Task, device: torch.device, t: TrainConfig) -> tuple[nn.Module, nn.Module, FlatAdamW]:
    """The model the run trains, the module a step calls (DDP-wrapped under torchrun, compiled
    when ``train.compile`` asks) and the optimizer."""
    if dist.world_size() > 1 and device.type == "cuda":
        # Batch statistics over the global batch; GroupNorm models are left as they are.
        # (PyTorch has no CPU SyncBatchNorm: on CPU each process keeps its own statistics.)
        task.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task.model)
    model = task.model
    # Before DDP wraps the model: the optimizer re-points the parameters at its flat buffers.
    opt = make_optimizer(model.named_parameters(), lr=t.lr)
    step_model = model
    if dist.world_size() > 1:
        # Refinement lanes are drawn per batch, so some parameters sit out some steps.
        ids = [device.index] if device.type == "cuda" else None
        step_model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    return model, maybe_compile(step_model, t.compile), opt


def _accumulate(
    task: Task,
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    step: int,
    accum: int,
    device: torch.device,
    amp: bool,
) -> tuple[StepOutput, dict[str, torch.Tensor], int]:
    """Forward and backward over the ``accum`` micro-batches of optimizer step ``step``: the last
    micro-batch's output, each loss term's mean over the micro-batches (detached), the images."""
    sums: dict[str, torch.Tensor] = {}
    n_images, out = 0, None
    for micro in range(accum):
        batch = next(batches)
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = model.no_sync() if dist.world_size() > 1 and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast(device, amp):
                out = task.step(model, batch, step * accum + micro)
            # A non-finite loss makes non-finite gradients, so every rank still takes part
            # in the all-reduce and every rank then skips the step.
            (out.terms["total"] / accum).backward()
        for name, value in out.terms.items():  # micro-batches may differ in terms (lanes)
            value = value.detach() / accum if accum > 1 else value.detach()
            sums[name] = sums[name] + value if name in sums else value
        n_images += out.n_images
    return out, sums, n_images


def _any_rank(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a bool tensor) or-ed over all ranks (a term can be non-finite on one rank
    only), without reading it on the host."""
    if dist.world_size() == 1:
        return flag
    value = flag.float()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value > 0


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
    average: WeightAverage | None,
    step: int,
    history: dict[str, list[float]],
    logger: RunLogger,
) -> None:
    """Probe the weights the run would export now (their average when
    ``train.weight_average_decay`` > 0); the scores go to TensorBoard and to
    ``history["probe/step"]``, ``history["probe/<metric>"]``."""
    with average.applied() if average is not None else contextlib.nullcontext():
        scores = probe(task.inference_model)
    logger.scalars(step, scores)
    history.setdefault("probe/step", []).append(step)
    for key, value in scores.items():
        history.setdefault(key, []).append(float(value))
