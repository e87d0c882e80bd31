"""Training runs of the notebooks: their folders and the teacher a later notebook starts from
(notebook 03's teacher recipe is ``seglib.recipes.teacher_recipe``).

* ``run_folder``: ``runs/<notebook>/<run>/``, fresh unless resumed.
* ``resolve_teacher``: an explicit checkpoint, else 03's finished run, else none.
* ``snapshots``: a teacher run's models over training, step 0 included.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .checkpoint import list_checkpoints, load_checkpoint
from .models import random_init_like
from .models.teacher import MonolithicSegmenter
from .paths import REPO_ROOT, runs_dir

__all__ = [
    "TEACHER_NOTEBOOK",
    "run_folder",
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
