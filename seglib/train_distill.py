"""The trainer: ``python -m seglib.train_distill`` (``python -m seglib.train`` is the same command).

    python -m seglib.train_distill --synthetic --steps 3 --amp 0 --seed 123 \\
        --checkpoint_dir /tmp/seg_ckpt --grad-accum 2
    python -m seglib.train_distill --config student_synthetic_cpu --teacher-checkpoint runs/demo/teacher.pt
    torchrun --standalone --nproc_per_node=2 -m seglib.train_distill --synthetic --steps 100

Settings come from, in increasing priority: the dataclass defaults (``seglib.config``; every
setting: docs/settings.md), ``--config`` (a recipe of ``seglib.recipes`` by name, or a Python file
exporting ``get_config()`` or ``CONFIG``), ``--set key=value`` pairs, and the flags below. The
flags of the training contract (the run, student and autoencoder groups) are kept as they are
documented; every other setting is reached with ``--set``. The full config is printed at start-up
(rank 0) and stored in every checkpoint and TensorBoard run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .config import Config, ConfigError, apply_overrides, merge, nest, parse_set
from .recipes import config_overrides
from .training.run import run
from .training.stages import get_stage
from .training.state import default_checkpoint_dir

__all__ = ["build_parser", "config_from_args", "main"]


def _int01(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def _norm(text: str) -> str:
    if text not in ("group", "batch", "instance", "none"):
        raise argparse.ArgumentTypeError(f"choose group, batch, instance or none, got {text!r}")
    return text


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 192,128,96, got {text!r}") from exc


# Flags of the training contract: (flag, config path, type, help). A flag that only switches a
# setting off (store_true) has the value to set in place of a type.
_CONTRACT = {
    "training contract: the run": [
        ("--synthetic", "data.synthetic", True, "train on procedural tiles"),
        ("--steps", "train.steps", int, "optimizer steps"),
        ("--amp", "train.amp", _int01, "1: bf16 autocast where supported, 0: fp32"),
        ("--seed", "train.seed", int, "run seed: data, augmentations and initial weights"),
        ("--checkpoint_dir", "train.checkpoint_dir", str, "checkpoints (*.pt), teacher.pt / student.pt, tb/"),
        ("--grad-accum", "train.grad_accum", int, "micro-batches per optimizer step"),
    ],
    "training contract: the student": [
        ("--disable-multires", "student.multires", False, "distil only the fine (stride-4) slice"),
        ("--student-dims", "student.dims", _int_list, "coarse,mid,fine widths, e.g. 192,128,96"),
        ("--student-depths", "student.depths", _int_list, "3x3 blocks per slice, e.g. 3,2,1"),
        ("--student-norm", "student.norm", _norm, "group | batch | instance | none"),
        ("--consistency-weight", "distill.consistency_weight", float, "cross-resolution consistency weight"),
        ("--ema-decay", "distill.loss_norm_decay", float, "decay of the running means normalising each slice's loss"),
        ("--cluster-iters", "distill.cluster_iters", int, "soft k-means iterations on the student's embeddings"),
    ],
    "training contract: the autoencoder": [
        ("--disable-autoencoder", "autoencoder.enabled", False, "turn the reconstruction loss off"),
        ("--ae-lambda", "autoencoder.lambda_recon", float, "weight of the normalised reconstruction loss"),
        ("--ae-ema-decay", "autoencoder.loss_norm_decay", float, "decay of its normalising running mean"),
        ("--ae-blur-sigma", "autoencoder.blur_sigma", float, "Gaussian blur of the stride-4 target"),
        ("--ae-grad-weight", "autoencoder.grad_weight", float, "weight of the Sobel-gradient term"),
        ("--ae-detach-backbone", "autoencoder.detach_backbone", _int01, "1: the decoder's gradient stops there"),
    ],
}
# The other run flags, beside --config and --set.
_RUN = [
    ("--stage", "stage", str, "teacher | student (or a registered plugin stage)"),
    ("--data-dir", "data.data_dir", str, "folder of RGB tiles (PNG/JPEG/GeoTIFF) to train on: not --synthetic"),
    ("--mask-dir", "data.mask_dir", str, "label PNGs of --data-dir's images (<stem>.png), only scored by the probe"),
    ("--teacher-checkpoint", "distill.teacher_checkpoint", str, "teacher.pt to distil from (else one is trained)"),
    ("--device", "train.device", str, "auto | cpu | cuda | cuda:N"),
    ("--threads", "train.threads", int, "torch CPU threads, 0: half the cores"),
]
_FLAGS = [flag for group in _CONTRACT.values() for flag in group] + _RUN


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seglib.train_distill",
        description="Train the teacher (stage 'teacher') or distil the student (stage 'student'); "
        "every setting is reachable with --set KEY=VALUE (docs/settings.md).",
    )
    g = p.add_argument_group("settings")
    g.add_argument("--config", default=None, help="a recipe name of seglib.recipes, or a Python config file")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. train.lr=1e-3")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint_dir")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    for flag, path, kind, text in _RUN:
        g.add_argument(flag, type=kind, default=None, help=f"{text} ({path})")
    for title, flags in _CONTRACT.items():
        g = p.add_argument_group(title)
        for flag, path, kind, text in flags:
            if isinstance(kind, bool):
                g.add_argument(flag, dest=_dest(flag), action="store_true", default=None, help=f"{text} ({path})")
            else:
                g.add_argument(flag, dest=_dest(flag), type=kind, default=None, help=f"{text} ({path})")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < --config < --set < flags; validated."""
    overrides: dict[str, Any] = config_overrides(args.config) if args.config else {}
    overrides = merge(overrides, parse_set(args.set))
    for flag, path, kind, _ in _FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            overrides = merge(overrides, nest(path, kind if isinstance(kind, bool) else value))
    if args.data_dir is not None and args.synthetic is None:
        overrides = merge(overrides, {"data": {"synthetic": False}})
    cfg = Config()
    apply_overrides(cfg, overrides)
    return cfg.validate()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        get_stage(cfg.stage)
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
