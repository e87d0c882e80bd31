"""Training runs of the notebooks: their folders, notebook 03's teacher recipe, and the teacher a
later notebook starts from.

* ``run_folder``: ``runs/<notebook>/<run>/``, fresh unless resumed.
* ``teacher_overrides``: notebook 03's teacher recipe as config overrides, from its parameters;
  ``teacher_recipe`` reads them for one of its runs (``params/03_teacher_train/<run>.yaml``), so
  04-06 train 03's very teacher when they have to train their own.
* ``resolve_teacher``: an explicit checkpoint, else 03's finished run, else none.
* ``snapshots``: a teacher run's models over training, step 0 included.
"""

from __future__ import annotations

import ast
import copy
import inspect
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import list_checkpoints, load_checkpoint
from .models import random_init_like
from .models.teacher import MonolithicSegmenter
from .paths import REPO_ROOT, runs_dir

__all__ = [
    "TEACHER_NOTEBOOK",
    "run_folder",
    "teacher_overrides",
    "teacher_params",
    "teacher_recipe",
    "resolve_teacher",
    "snapshots",
]

TEACHER_NOTEBOOK = "03_teacher_train"


def run_folder(notebook: str, run_name: str, *, resume: bool = False) -> Path:
    """``runs/<notebook>/<run_name>/`` (created). Unless ``resume``, what an earlier run of the
    same name left there is removed first: a rerun starts from step 0 (reproducibly), and its
    TensorBoard curves are not drawn on top of the old ones."""
    path = runs_dir(notebook, run_name)
    if not resume and any(path.iterdir()):
        shutil.rmtree(path)
        path.mkdir(parents=True)
        print(f"cleared {path} (an earlier run of that name; resume=True continues it instead)")
    return path


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
            "image_every": snapshot_every,
            "keep_checkpoints": 0,
        },
    }


def teacher_params(run_name: str) -> dict[str, Any]:
    """Notebook 03's parameters for its run ``run_name``: the defaults of its parameter cell with
    ``params/03_teacher_train/<run_name>.yaml`` on top, as papermill runs it."""
    import yaml

    path = REPO_ROOT / "params" / TEACHER_NOTEBOOK / f"{run_name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no parameters for notebook 03's run {run_name!r} ({path}); run notebook 03 with that run "
            "name first, or pass teacher_checkpoint"
        )
    params = {**_parameter_cell(REPO_ROOT / "notebooks" / f"{TEACHER_NOTEBOOK}.py"), **yaml.safe_load(path.read_text())}
    if params["run_name"] != run_name:
        raise ValueError(f"{path} names the run {params['run_name']!r}, not {run_name!r}")
    return params


def teacher_recipe(run_name: str, checkpoint_dir: str | Path, **params: Any) -> dict[str, Any]:
    """``teacher_overrides`` of notebook 03's run ``run_name`` (``teacher_params``), writing to
    ``checkpoint_dir``: notebooks 04-06 train this teacher when 03's run is absent, so their
    numbers are the same whether or not 03 ran first. ``params`` replace some of 03's parameters,
    e.g. ``data_dir`` (the folder papermill was given rather than the one in the YAML file);
    empty values ("", None, []) keep the file's."""
    unknown = set(params) - set(inspect.signature(teacher_overrides).parameters)
    if unknown:
        raise TypeError(f"teacher_recipe: {sorted(unknown)} are not parameters of notebook 03's recipe")
    params = {**teacher_params(run_name), **{k: v for k, v in params.items() if v not in ("", None, [], ())}}
    names = inspect.signature(teacher_overrides).parameters
    return teacher_overrides(checkpoint_dir, **{k: params[k] for k in names if k != "checkpoint_dir"})


def _parameter_cell(twin: Path) -> dict[str, Any]:
    """``name = literal`` lines of the cell tagged ``parameters`` in a notebook's .py twin."""
    cell = twin.read_text().split('# %% tags=["parameters"]\n', 1)[1].split("\n# %%", 1)[0]
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell).body}


def resolve_teacher(teacher_checkpoint: str = "", teacher_run: str = "") -> str:
    """The teacher checkpoint to start from: ``teacher_checkpoint`` when given (it must exist),
    else ``runs/03_teacher_train/<teacher_run>/teacher.pt`` when that run has finished, else ""
    (the caller trains a teacher itself). Prints which it is."""
    if teacher_checkpoint:
        path = Path(teacher_checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher_checkpoint not found: {path}; leave it empty to use notebook 03's run")
        print(f"teacher: {path} (the teacher_checkpoint parameter)")
        return str(path)
    if teacher_run:
        path = REPO_ROOT / "runs" / TEACHER_NOTEBOOK / teacher_run / "teacher.pt"  # (runs_dir would create it)
        if path.is_file():
            data = load_checkpoint(path)["config"]["data"]
            source = "synthetic tiles" if data["synthetic"] else data["data_dir"]
            print(f"teacher: {path} (notebook 03's run '{teacher_run}', trained on {source})")
            return str(path)
    print(f"teacher: none found in runs/{TEACHER_NOTEBOOK}/{teacher_run or '<run>'}/; a teacher is trained first")
    return ""


def snapshots(run_dir: str | Path) -> list[tuple[int, torch.nn.Module]]:
    """(step, teacher) for step 0 (the run's initial weights) and every checkpoint of a teacher
    run folder, oldest first; all on CPU in eval mode."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no ckpt_*.pt in {run_dir}; train the teacher first (notebook 03)")
    models = [(step, MonolithicSegmenter.from_checkpoint(path)) for step, path in found]
    seed = load_checkpoint(found[0][1])["config"]["train"]["seed"]
    # run() seeds torch with train.seed right before building the model: the same draw.
    return [(0, random_init_like(models[0][1], seed=seed)), *models]
