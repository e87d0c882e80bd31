"""Speed and memory of the training step and of inference (``python -m seglib.bench``).

Measured, each after ``--warmup`` untimed runs, as the median of ``--repeats`` timed runs:

* ``train_step_s`` / ``train_img_per_s``: the teacher's full training step: two augmented
  views per image, forward with shared prototypes, all losses, backward, clip, AdamW step
  (knobs fixed: K, cluster iterations, ``--lane``, downsample 1). The fast and none lanes are
  parameter-free and no loss reads their full-resolution output, so a training step skips
  them; the learned lane runs at its working resolution (``model.refine.learned_scale``, half
  by default) with its refinement loss;
* with ``--versus-lane L``: the step with lane L timed in turns with ``--lane``'s,
  ``train_step_s_versus`` and ``lane_step_ratio`` (L's step over ``--lane``'s);
* ``backbone_step_s``: forward + backward of the encoder alone on the same 2B views, so
  ``head_loss_overhead`` = train_step_s / backbone_step_s - 1 is what the head, the lanes and
  the losses add on top of the backbone;
* ``teacher_infer_ms`` / ``student_infer_ms``: one tile of ``--infer-size`` at ``--infer-k``
  through the full segmenter (fast lane), batch 1, no gradient. The two are timed in turns
  (teacher, student, teacher, ...), so a change of load on a shared machine hits both and
  ``student_speedup`` stays honest;
* ``peak_mem_mb``: CUDA max allocated during the training steps, or this process's peak RSS
  on CPU (which includes the Python runtime and the libraries);
* with ``--profile``, ``profile``: ``torch.profiler`` over ``--profile-steps`` training steps,
  per step: ``host_ms`` (the host's time to issue the step, no synchronisation inside),
  ``device_ms`` (CUDA kernel time; on CPU the operators' own compute time), ``ops`` (every
  aten operator call recorded, nested ones included) and ``top_level_ops`` (those the Python
  code and autograd issue themselves), and on CUDA ``kernels`` (launches), ``memcpy_htod``,
  ``memcpy_htod_pageable`` and ``syncs`` (device-to-host reads and synchronisations).

``--compile [MODE]`` runs the training forward through ``torch.compile`` (``train.compile``),
falling back to eager where compiling fails. Synchronises CUDA around every timed region.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch

from ..config import Config, apply_overrides
from ..device import autocast, maybe_compile, resolve_device

__all__ = ["benchmark", "cpu_latency_ms", "profile_steps"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    return _paired_median_times({"fn": fn}, device, warmup, repeats)["fn"]


def _paired_median_times(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of each function, timed in turns (a, b, a, b, ...): a load change on a
    shared machine then hits every function alike, so their ratio stays honest."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            tic = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def cpu_latency_ms(model: torch.nn.Module, rgb, k: int, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of one forward pass of ``model`` over one (H, W, 3) image ``rgb`` at
    ``k`` clusters, on the CPU (notebook 04)."""
    from ..inference.predictor import to_tensor

    x = to_tensor(rgb)
    return 1000 * _median_time(lambda: model(x, k), torch.device("cpu"), warmup, repeats)


def profile_steps(step: Callable[[], object], device: torch.device, steps: int) -> dict:
    """Per-step figures of ``steps`` calls of ``step`` under ``torch.profiler`` (module doc)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # one more warm-up, outside the profiler
    _sync(device)
    with profile(activities=activities) as prof:
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        host_s = time.perf_counter() - tic  # issued, not necessarily finished
        _sync(device)
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]

    def nested(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    out = {
        "steps": steps,
        "host_ms": round(1000 * host_s / steps, 2),
        "ops": round(len(aten) / steps, 1),
        "top_level_ops": round(sum(not nested(e) for e in aten) / steps, 1),
    }
    if device.type == "cuda":
        on_device = [e for e in events if e.device_type.name == "CUDA"]
        kernels = [e for e in on_device if "Memcpy" not in e.name and "Memset" not in e.name]
        copies = [e for e in on_device if "Memcpy HtoD" in e.name]
        launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense")
        out["device_ms"] = round(sum(e.time_range.elapsed_us() for e in kernels) / 1000 / steps, 2)
        out["kernels"] = round(sum(e.name in launch_names for e in events) / steps, 1)
        out["memcpy_htod"] = round(len(copies) / steps, 1)
        out["memcpy_htod_pageable"] = round(sum("Pageable" in e.name for e in copies) / steps, 1)
        out["syncs"] = round(sum(e.name in sync_names for e in events) / steps, 1)
    else:  # the operators' own compute time; the rest of host_ms is Python and dispatch
        out["device_ms"] = round(sum(e.self_cpu_time_total for e in aten) / 1000 / steps, 2)
    return out


def benchmark(cfg: Config, args: argparse.Namespace) -> dict:
    """Run the measurements of the module docstring; returns the result dict."""
    device = resolve_device(args.device)
    torch.manual_seed(0)
    result: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "dtype": "bf16" if args.amp else "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "size": args.size,
        "k": args.k,
        "cluster_iters": args.cluster_iters,
        "lane": args.lane,
    }
    if not args.skip_train:
        _train_measurements(cfg, args, device, result)
    if device.type != "cuda":
        # ru_maxrss is in KiB on Linux.
        result["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if not args.skip_infer:
        _infer_measurements(cfg, args, device, result)
    return result


def _train_measurements(cfg: Config, args: argparse.Namespace, device: torch.device, result: dict) -> None:
    """The training step's times (and profile) into ``result``."""
    from ..data.synthetic import make_tile
    from ..training.optim import make_optimizer
    from ..training.teacher import Knobs, TeacherTask

    task = TeacherTask(cfg, device)
    model = task.model.train()
    opt = make_optimizer(model.named_parameters(), lr=1e-4, weight_decay=1e-2)
    tiles = [make_tile(args.size, seed=i) for i in range(args.batch)]
    rgb = torch.stack([torch.from_numpy(t.rgb).permute(2, 0, 1) for t in tiles])
    batch = {"rgb": rgb.to(device), "index": torch.arange(args.batch)}
    knobs = Knobs(
        k=args.k, downsample=1, iters=args.cluster_iters, smooth_iters=cfg.model.refine.smooth_iters, lane=args.lane
    )
    forward = maybe_compile(model, args.compile)
    result["compile"] = args.compile or "off"

    def train_step(knobs: Knobs = knobs) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bool(args.amp)):
            out = task.step(forward, batch, 0, knobs=knobs)
        out.terms["total"].backward()
        opt.clip_grad_norm_(1.0)
        opt.step()

    views = torch.cat([rgb, rgb.flip(-1)]).to(device)  # same shapes as the two views

    def backbone_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bool(args.amp)):
            feats = model.encoder(views)
        feats.float().square().mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.versus_lane:
        # Both lanes' steps in turns (a, b, a, b, ...): their ratio survives a load change.
        versus = dataclasses.replace(knobs, lane=args.versus_lane)
        paired = _paired_median_times(
            {"main": train_step, "versus": lambda: train_step(versus)}, device, args.warmup, args.repeats
        )
        step_s = paired["main"]
        result.update(
            versus_lane=args.versus_lane,
            train_step_s_versus=round(paired["versus"], 4),
            lane_step_ratio=round(paired["versus"] / step_s, 2),
        )
    else:
        step_s = _median_time(train_step, device, args.warmup, args.repeats)
    if device.type == "cuda":
        result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    backbone_s = _median_time(backbone_step, device, args.warmup, args.repeats)
    result.update(
        train_step_s=round(step_s, 4),
        train_img_per_s=round(args.batch / step_s, 2),
        backbone_step_s=round(backbone_s, 4),
        head_loss_overhead=round(step_s / backbone_s - 1, 3),
    )
    if getattr(forward, "failed", None):
        result["compile"] = f"failed, eager ({forward.failed})"
    if args.profile:
        result["profile"] = profile_steps(train_step, device, args.profile_steps)


def _infer_measurements(cfg: Config, args: argparse.Namespace, device: torch.device, result: dict) -> None:
    """The teacher's and the student's inference latencies, timed in turns, into ``result``."""
    from ..data.synthetic import make_tile
    from ..models.student import StudentModelConfig, StudentSegmenter
    from ..models.teacher import MonolithicSegmenter
    from ..recipes import FAST_STUDENT

    tile = torch.from_numpy(make_tile(args.infer_size, seed=99).rgb).permute(2, 0, 1)[None].to(device)
    if args.teacher_checkpoint:
        teacher = MonolithicSegmenter.from_checkpoint(args.teacher_checkpoint).to(device).eval()
        result["teacher_checkpoint"] = args.teacher_checkpoint
    else:
        teacher = MonolithicSegmenter(cfg.model).to(device).eval()
    if args.student_checkpoint:
        from ..models import load_model

        student = load_model(None if args.student_checkpoint == "bundled" else args.student_checkpoint)
        student = student.to(device).eval()
        result["student_checkpoint"] = args.student_checkpoint
    else:
        # The student's head settings derive from cfg.student, so set it before deriving.
        with_student = apply_overrides(copy.deepcopy(cfg), {"student": {**FAST_STUDENT, "size": args.student_size}})
        student_cfg = StudentModelConfig.from_config(with_student)
        student = StudentSegmenter(student_cfg).to(device).eval()
    with torch.no_grad():
        infer = _paired_median_times(
            {"teacher": lambda: teacher(tile, args.infer_k), "student": lambda: student(tile, args.infer_k)},
            device,
            args.warmup,
            args.repeats,
        )
    result["teacher_infer_ms"] = round(1000 * infer["teacher"], 1)
    result["student_infer_ms"] = round(1000 * infer["student"], 1)
    result["student_speedup"] = round(result["teacher_infer_ms"] / result["student_infer_ms"], 2)
    student_size = student.config.student.size if args.student_checkpoint else args.student_size
    result.update(infer_size=args.infer_size, infer_k=args.infer_k, student_size=student_size)
    result["student_params"] = sum(p.numel() for p in student.parameters())
    result["teacher_params"] = sum(p.numel() for p in teacher.parameters())
