"""Every named training recipe of the package, in one place: config overrides on top of the
dataclass defaults (``seglib.config``).

``python -m seglib.train_distill --config NAME`` takes a name of ``RECIPES`` (or a Python file of
your own). A research plugin registers its recipes here too (``register_recipe``; the study's
are in ``experiments/``). experiments/LOG.md has what each recipe gave, how long it took and why
it is set as it is.

Notebook 03 trains the teacher of ``teacher_overrides`` from its parameters (defaults:
``NOTEBOOK_TEACHER``); notebooks 04-06 train that same teacher from 03's parameter files
(``teacher_recipe``) when 03's run is absent.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config_file
from .paths import REPO_ROOT

__all__ = [
    "BUNDLED_HEAD",
    "FAST_STUDENT",
    "TEACHER_SYNTHETIC_CPU",
    "TEACHER_DUBAI_CPU",
    "STUDENT_SYNTHETIC_CPU",
    "STUDENT_DUBAI_CPU",
    "RECIPES",
    "register_recipe",
    "get_recipe",
    "config_overrides",
    "NOTEBOOK_TEACHER",
    "teacher_overrides",
    "teacher_params",
    "teacher_recipe",
]

_TRAIN = {"lr": 2e-3, "warmup": 50, "seed": 0}

# The teacher on procedural tiles: 800 steps of 4 crops of 128 px (longer was worse).
TEACHER_SYNTHETIC_CPU: dict = {
    "stage": "teacher",
    "data": {"synthetic": True, "size": 128, "batch_size": 4},
    "train": {**_TRAIN, "steps": 800, "checkpoint_every": 200},
}

# The same teacher on a folder of real tiles (no labels); pass --data-dir.
TEACHER_DUBAI_CPU: dict = {
    "stage": "teacher",
    "data": {"synthetic": False, "size": 128, "batch_size": 4},
    "train": {**_TRAIN, "steps": 2000, "checkpoint_every": 250},
}

# What the shipped students are: the `tiny` CNN with a space-to-depth stem, and at inference a
# cheaper head than the teacher's (docs/models.md): 4 radius-1 denoising passes 1, 2, 4, 1
# cells apart, 3 soft k-means iterations, the guided filter at the stride-4 grid.
FAST_STUDENT: dict = {
    "size": "tiny",
    "norm": "batch",
    "stem": "unshuffle",
    "head": {"denoise_iters": 4, "denoise_radius": 1, "denoise_dilations": (1, 2, 4), "iters": 3},
    "refine": {"smooth_iters": 0, "guide_scale": 4},
}

# How the bundled student runs, as per-call inference settings: images shrunk by 2, 1 soft
# k-means iteration, a size prior of 3 (each measured on the development tiles: experiments/LOG.md,
# "Real imagery"). Another model evaluated "with the bundled head" runs with these.
BUNDLED_HEAD: dict = {"downsample": 2, "iters": 1, "size_prior": 3.0}

# The student distilled from a synthetic teacher (pass --teacher-checkpoint).
STUDENT_SYNTHETIC_CPU: dict = {
    "stage": "student",
    "data": {"synthetic": True, "size": 128, "batch_size": 4},
    "student": FAST_STUDENT,
    "train": {**_TRAIN, "steps": 1500, "checkpoint_every": 250},
}

# The bundled default student: distilled on real tiles shrunk by 2, run with BUNDLED_HEAD, and
# the weight average of the last steps.
STUDENT_DUBAI_CPU: dict = {
    "stage": "student",
    "data": {"synthetic": False, "size": 128, "batch_size": 4, "downscale": 2},
    "student": {
        **FAST_STUDENT,
        "downsample": BUNDLED_HEAD["downsample"],
        "head": {**FAST_STUDENT["head"], "iters": BUNDLED_HEAD["iters"], "size_prior": BUNDLED_HEAD["size_prior"]},
    },
    "train": {**_TRAIN, "steps": 1500, "checkpoint_every": 250, "weight_average_decay": 0.995},
}

RECIPES: dict[str, dict] = {
    "teacher_synthetic_cpu": TEACHER_SYNTHETIC_CPU,
    "teacher_dubai_cpu": TEACHER_DUBAI_CPU,
    "student_synthetic_cpu": STUDENT_SYNTHETIC_CPU,
    "student_dubai_cpu": STUDENT_DUBAI_CPU,
}


def register_recipe(name: str, overrides: dict) -> dict:
    """Make ``overrides`` (with a ``stage``) available as ``--config NAME`` and ``get_recipe(name)``."""
    if "stage" not in overrides:
        raise ValueError(f"recipe {name!r} must name its stage")
    RECIPES[name] = overrides
    return overrides


def get_recipe(name: str) -> dict:
    """A copy of the recipe ``name``; ``ConfigError`` naming the known ones otherwise."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} (or give a config file.py)")
    return copy.deepcopy(RECIPES[name])


def config_overrides(spec: str | Path) -> dict:
    """The overrides ``--config`` names: a recipe of ``RECIPES`` by name, else a Python config
    file (``seglib.config.load_config_file``)."""
    if str(spec) in RECIPES:
        return get_recipe(str(spec))
    if not Path(spec).is_file():
        raise ConfigError(f"--config {spec}: neither a recipe ({', '.join(RECIPES)}) nor a config file")
    return load_config_file(spec)


# Notebook 03's parameters that make its teacher, with the defaults of its parameters cell
# (tests/test_notebooks.py checks that the cell says the same).
NOTEBOOK_TEACHER: dict[str, Any] = {
    "teacher_model": {"encoder": {"width": 32, "depth": 2}},
    "size": 64,
    "batch_size": 4,
    "steps": 150,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "snapshot_every": 50,
    "data_dir": "",
    "mask_dir": "",
    "ignore": [],
}


def teacher_overrides(
    checkpoint_dir: str | Path,
    *,
    teacher_model: dict[str, Any],
    size: int,
    batch_size: int,
    steps: int,
    seed: int,
    device: str,
    threads: int,
    snapshot_every: int,
    data_dir: str = "",
    mask_dir: str = "",
    ignore: Sequence[int] = (),
) -> dict[str, Any]:
    """Config overrides of notebook 03's teacher run from its parameters (the same names), on top
    of the package defaults; every checkpoint is kept (they are the snapshots over training).

    ``data_dir`` (a folder of RGB tiles; "": synthetic tiles) and ``mask_dir`` (its ground truth,
    only scored by the training-time probe) are resolved against the working directory and must
    exist (``FileNotFoundError`` naming the parameter otherwise); ``ignore`` are mask ids the
    probe leaves out."""
    data: dict[str, Any] = {"synthetic": True, "size": size, "batch_size": batch_size}
    if mask_dir and not data_dir:
        raise ValueError("mask_dir is set but data_dir is not: masks belong to the images of data_dir")
    for name, folder in (("data_dir", data_dir), ("mask_dir", mask_dir)):
        if folder and not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(
                f"{name} not found: {folder} (relative paths start at {Path.cwd()}); give an existing folder, "
                "e.g. an absolute path"
            )
    if data_dir:
        data.update(synthetic=False, data_dir=str(Path(data_dir).expanduser().resolve()))
        data.update(mask_dir=str(Path(mask_dir).expanduser().resolve()) if mask_dir else "")
        data.update(mask_ignore=[int(i) for i in ignore])
    return {
        "model": copy.deepcopy(teacher_model),
        "data": data,
        "train": {
            "steps": steps,
            "seed": seed,
            "device": device,
            "threads": threads,
            "checkpoint_dir": str(checkpoint_dir),
            "checkpoint_every": snapshot_every,
            "keep_checkpoints": 0,
        },
    }


def teacher_params(run_name: str) -> dict[str, Any]:
    """Notebook 03's parameters for its run ``run_name``: ``NOTEBOOK_TEACHER`` with
    ``params/03_teacher_train/<run_name>.yaml`` on top, as papermill runs it."""
    import yaml

    path = REPO_ROOT / "params" / "03_teacher_train" / f"{run_name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no parameters for notebook 03's run {run_name!r} ({path}); run notebook 03 with that run "
            "name first, or pass teacher_checkpoint"
        )
    params = {"run_name": run_name, **copy.deepcopy(NOTEBOOK_TEACHER), **yaml.safe_load(path.read_text())}
    if params["run_name"] != run_name:
        raise ValueError(f"{path} names the run {params['run_name']!r}, not {run_name!r}")
    return params


def teacher_recipe(run_name: str, checkpoint_dir: str | Path, **params: Any) -> dict[str, Any]:
    """``teacher_overrides`` of notebook 03's run ``run_name`` (``teacher_params``), writing to
    ``checkpoint_dir``: notebooks 04-06 train this teacher when 03's run is absent, so their
    numbers are the same whether or not 03 ran first. ``params`` replace some of 03's parameters,
    e.g. ``data_dir`` (the folder papermill was given rather than the one in the YAML file);
    empty values ("", None, []) keep the file's."""
    names = inspect.signature(teacher_overrides).parameters
    unknown = set(params) - set(names)
    if unknown:
        raise TypeError(f"teacher_recipe: {sorted(unknown)} are not parameters of notebook 03's recipe")
    params = {**teacher_params(run_name), **{k: v for k, v in params.items() if v not in ("", None, [], ())}}
    return teacher_overrides(checkpoint_dir, **{k: params[k] for k in names if k != "checkpoint_dir"})
