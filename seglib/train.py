"""Command line of the trainer (teacher and student stages); ``seglib.training.run.run`` does the work.

    python -m seglib.train --synthetic --steps 3 --amp 0 --seed 123 \\
        --checkpoint_dir /tmp/seg_ckpt --grad-accum 2
    python -m seglib.train --stage student --teacher-checkpoint runs/teacher/teacher.pt
    torchrun --standalone --nproc_per_node=2 -m seglib.train --synthetic --steps 100

Settings come from, in increasing priority: the dataclass defaults (``seglib.config``), a
``--config FILE.py`` exporting ``get_config()`` or ``CONFIG``, ``--set key=value`` pairs, and
the explicit flags below. The full config is printed at start-up (rank 0) and stored in every
checkpoint and TensorBoard run. ``python -m seglib.train_distill`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .config import Config, ConfigError, apply_overrides, load_config_file, merge, nest, parse_set
from .training.run import run
from .training.state import default_checkpoint_dir

__all__ = ["build_parser", "config_from_args", "main"]


def _int01(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 192,128,96, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seglib.train",
        description="Train the seglib teacher (stage 'teacher') or distil the student (stage 'student').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--stage",
        choices=["teacher", "student", "cluster"],
        default=None,
        help="training stage (config: stage; default teacher)",
    )
    g.add_argument(
        "--config",
        default=None,
        help="Python file exporting get_config() or CONFIG (dict of overrides or a Config)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set loss.smoothness=0.5 (repeatable)",
    )
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (config: train.steps)")
    g.add_argument("--seed", type=int, default=None, help="run seed: data, augmentations and init (config: train.seed)")
    g.add_argument(
        "--amp",
        type=_int01,
        default=None,
        help="1: bf16 autocast where supported, 0: fp32 (config: train.amp)",
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=None,
        help="micro-batches per optimizer step (config: train.grad_accum)",
    )
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (config: train.lr)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (config: train.device)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads, 0 = automatic: half the cores (config: train.threads)",
    )
    g.add_argument(
        "--checkpoint_dir",
        "--checkpoint-dir",
        dest="checkpoint_dir",
        default=None,
        help="folder of checkpoints (*.pt) and TensorBoard logs (tb/); default runs/train "
        "(config: train.checkpoint_dir)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints (config: train.checkpoint_every)",
    )
    g.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=None,
        help="also checkpoint when this many minutes passed since the last one, 0 = off: a kill loses at "
        "most that much work (config: train.checkpoint_minutes)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=None,
        help="newest step checkpoints kept, 0 = all (config: train.keep_checkpoints)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in --checkpoint_dir",
    )
    g.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")

    g = p.add_argument_group("data")
    g.add_argument(
        "--synthetic",
        action="store_true",
        default=None,
        help="train on procedural tiles (config: data.synthetic)",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder of RGB tiles (PNG/JPEG/GeoTIFF); implies not --synthetic (config: data.data_dir)",
    )
    g.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="GLOB",
        help="train only on images of --data-dir whose name matches this glob, e.g. '*t1' (repeatable; "
        "config: data.include)",
    )
    g.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="GLOB",
        help="leave out images whose name matches this glob (repeatable; config: data.exclude)",
    )
    g.add_argument(
        "--mask-dir",
        default=None,
        help="ground-truth label PNGs for --data-dir's images (<stem>.png); never trained on, only scored by the "
        "quality probe (config: data.mask_dir)",
    )
    g.add_argument(
        "--mask-ignore",
        type=_int_list,
        default=None,
        help="label ids the probe's mIoU ignores, e.g. 5,255 (config: data.mask_ignore)",
    )
    g.add_argument(
        "--probe-every",
        type=int,
        default=None,
        help="steps between quality probes (proxies, and mIoU with --mask-dir), 0 = off (config: probe.every)",
    )
    g.add_argument("--size", type=int, default=None, help="training crop side, multiple of 16 (config: data.size)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per micro-batch and process (config: data.batch_size)",
    )
    g.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (config: data.num_workers)")

    g = p.add_argument_group("student stage")
    g.add_argument(
        "--teacher-checkpoint",
        default=None,
        help="teacher.pt to distil from; without it a teacher is trained first (config: distill.teacher_checkpoint)",
    )
    g.add_argument("--student-size", default=None, help="named student size, e.g. small | base (config: student.size)")
    g.add_argument(
        "--disable-multires",
        action="store_true",
        default=None,
        help="distil only the fine (stride-4) slice (config: student.multires=false)",
    )
    g.add_argument(
        "--student-dims",
        type=_int_list,
        default=None,
        help="coarse,mid,fine widths, e.g. 192,128,96 (config: student.dims)",
    )
    g.add_argument(
        "--student-depths",
        type=_int_list,
        default=None,
        help="3x3 blocks per slice, e.g. 3,2,1 (config: student.depths)",
    )
    g.add_argument(
        "--student-norm",
        choices=["group", "batch", "instance", "none"],
        default=None,
        help="config: student.norm",
    )
    g.add_argument(
        "--consistency-weight",
        type=float,
        default=None,
        help="cross-resolution consistency weight (config: distill.consistency_weight)",
    )
    g.add_argument(
        "--loss-norm-decay",
        "--ema-decay",
        dest="loss_norm_decay",
        type=float,
        default=None,
        help="decay of the running means that normalise each slice's loss (config: distill.loss_norm_decay)",
    )
    g.add_argument(
        "--cluster-iters",
        type=int,
        default=None,
        help="soft k-means iterations on student embeddings (config: distill.cluster_iters)",
    )
    g.add_argument(
        "--disable-autoencoder",
        action="store_true",
        default=None,
        help="turn the reconstruction loss off (config: autoencoder.enabled=false)",
    )
    g.add_argument("--ae-lambda", type=float, default=None, help="config: autoencoder.lambda_recon")
    g.add_argument(
        "--ae-loss-norm-decay",
        "--ae-ema-decay",
        dest="ae_loss_norm_decay",
        type=float,
        default=None,
        help="config: autoencoder.loss_norm_decay",
    )
    g.add_argument("--ae-blur-sigma", type=float, default=None, help="config: autoencoder.blur_sigma")
    g.add_argument("--ae-grad-weight", type=float, default=None, help="config: autoencoder.grad_weight")
    g.add_argument(
        "--ae-detach-backbone",
        type=_int01,
        default=None,
        help="1: the decoder's gradient does not reach the student (config: autoencoder.detach_backbone)",
    )
    return p


# flag name -> config path; a value of None means "flag not given".
_FLAG_PATHS = {
    "stage": "stage",
    "steps": "train.steps",
    "seed": "train.seed",
    "amp": "train.amp",
    "grad_accum": "train.grad_accum",
    "lr": "train.lr",
    "device": "train.device",
    "threads": "train.threads",
    "checkpoint_minutes": "train.checkpoint_minutes",
    "mask_dir": "data.mask_dir",
    "mask_ignore": "data.mask_ignore",
    "probe_every": "probe.every",
    "checkpoint_dir": "train.checkpoint_dir",
    "checkpoint_every": "train.checkpoint_every",
    "keep_checkpoints": "train.keep_checkpoints",
    "synthetic": "data.synthetic",
    "data_dir": "data.data_dir",
    "include": "data.include",
    "exclude": "data.exclude",
    "size": "data.size",
    "batch_size": "data.batch_size",
    "num_workers": "data.num_workers",
    "teacher_checkpoint": "distill.teacher_checkpoint",
    "student_size": "student.size",
    "student_dims": "student.dims",
    "student_depths": "student.depths",
    "student_norm": "student.norm",
    "consistency_weight": "distill.consistency_weight",
    "loss_norm_decay": "distill.loss_norm_decay",
    "cluster_iters": "distill.cluster_iters",
    "ae_lambda": "autoencoder.lambda_recon",
    "ae_loss_norm_decay": "autoencoder.loss_norm_decay",
    "ae_blur_sigma": "autoencoder.blur_sigma",
    "ae_grad_weight": "autoencoder.grad_weight",
    "ae_detach_backbone": "autoencoder.detach_backbone",
}


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < --config file < --set < explicit flags."""
    overrides: dict[str, Any] = {}
    if args.config:
        overrides = merge(overrides, load_config_file(args.config))
    overrides = merge(overrides, parse_set(args.set))
    for flag, path in _FLAG_PATHS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides = merge(overrides, nest(path, value))
    if args.data_dir is not None and args.synthetic is None:
        overrides = merge(overrides, {"data": {"synthetic": False}})
    if args.disable_multires:
        overrides = merge(overrides, {"student": {"multires": False}})
    if args.disable_autoencoder:
        overrides = merge(overrides, {"autoencoder": {"enabled": False}})
    cfg = Config()
    apply_overrides(cfg, overrides)
    return cfg.validate()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.print_config:
        print(cfg.to_json())
        return 0
    try:
        cfg.check_paths()
    except ConfigError as exc:
        parser.error(str(exc))
    main_process = int(os.environ.get("RANK", 0)) == 0  # the process group is not up yet
    if main_process:
        print(json.dumps({"config": cfg.to_dict()}, sort_keys=True))
    history = run(cfg, resume=args.resume)
    if main_process and history.get("step"):
        last = {k: round(v[-1], 5) for k, v in history.items() if k.startswith("loss/")}
        ckdir = str(default_checkpoint_dir(cfg))
        print(json.dumps({"final_step": history["step"][-1], "final_losses": last, "checkpoint_dir": ckdir}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
