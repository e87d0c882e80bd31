"""Run the configured training stage: what ``python -m seglib.train`` and the notebooks call.

    from seglib.config import Config
    from seglib.training.run import run
    history = run(Config.from_dict({"train": {"steps": 100}}))   # dict of lists, one entry per step

``run`` validates the config and checks its folders exist, sets the thread count for the run
(``train.threads``, 0: automatic, see ``seglib.device.training_threads``; restored afterwards),
joins the process group under torchrun,
seeds torch (the same initial weights on every rank), builds the data source and the stage's
task and hands them to ``train_loop``. The student stage distils from
``distill.teacher_checkpoint``; without one, ``teacher_first`` trains a teacher with the same
config for ``distill.teacher_steps`` steps into ``<checkpoint_dir>/teacher/`` (resumable like
any teacher run) and the student distils from its ``teacher.pt``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .. import distributed as dist
from ..config import Config
from ..data.source import make_source
from ..device import busy_note, resolve_device, training_threads
from .cluster import ClusterTask
from .loop import train_loop
from .state import default_checkpoint_dir
from .student import StudentTask
from .teacher import TeacherTask

__all__ = ["run", "start_from", "teacher_first"]


def teacher_first(cfg: Config, device: torch.device, info: dist.DistInfo) -> Path:
    """The teacher checkpoint a student run distils from: ``distill.teacher_checkpoint`` (it must
    exist), else ``<checkpoint_dir>/teacher/teacher.pt``, trained first when it is absent."""
    if cfg.distill.teacher_checkpoint:
        path = Path(cfg.distill.teacher_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher checkpoint not found: {path}; train one with `python -m seglib.train "
                "--stage teacher` or leave --teacher-checkpoint empty to train one first"
            )
        return path
    teacher_dir = default_checkpoint_dir(cfg) / "teacher"
    if (teacher_dir / "teacher.pt").is_file():
        return teacher_dir / "teacher.pt"
    tcfg = copy.deepcopy(cfg)
    tcfg.stage, tcfg.train.steps = "teacher", cfg.distill.teacher_steps
    tcfg.train.checkpoint_dir = str(teacher_dir)
    if info.rank == 0:
        print(f"no --teacher-checkpoint: training a teacher for {tcfg.train.steps} steps into {teacher_dir}")
    torch.manual_seed(cfg.train.seed)
    task = TeacherTask(tcfg, device)
    source = make_source(tcfg, rank=info.rank, world=info.world)
    train_loop(task, tcfg, source, device=device, resume=True)
    dist.barrier()
    return teacher_dir / "teacher.pt"


def start_from(task: TeacherTask | ClusterTask | StudentTask, path: str | Path) -> None:
    """Load the weights of the segmenter in ``path`` (a ``teacher.pt``) into the model a teacher
    or cluster run trains, e.g. to fine-tune the synthetic teacher on real imagery. A resumed run
    then replaces them with its checkpoint's."""
    from ..models import load_model

    if isinstance(task, StudentTask):
        raise ValueError("train.init_from starts a teacher or cluster run; a student starts from random weights")
    source = load_model(path)
    target = task.model.segmenter if isinstance(task, ClusterTask) else task.model
    if type(source) is not type(target):
        raise ValueError(
            f"train.init_from: {path} holds a {type(source).__name__}, the run trains a {type(target).__name__}"
        )
    try:
        target.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"train.init_from: {path} does not fit the configured model: {exc}") from None


def run(
    cfg: Config, *, resume: bool = False, callbacks: Iterable[Callable[[int, dict[str, float]], None]] = ()
) -> dict[str, list[float]]:
    """Train the stage ``cfg.stage``; returns its history (``train_loop``'s). ``resume``
    continues from the latest complete checkpoint in ``train.checkpoint_dir``."""
    cfg.validate().check_paths()
    threads_before = torch.get_num_threads()
    info, device = dist.setup(resolve_device(cfg.train.device))
    threads = training_threads(cfg.train.threads, device)
    torch.set_num_threads(threads)
    if info.rank == 0 and device.type == "cpu":
        how = "train.threads" if cfg.train.threads else "automatic; set train.threads or --threads to change"
        print(f"training on {threads} CPU thread(s) ({how})")
        if note := busy_note(threads):
            print(note)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    try:
        source = make_source(cfg, rank=info.rank, world=info.world)
        if cfg.stage == "teacher":
            task = TeacherTask(cfg, device)
        elif cfg.stage == "cluster":
            task = ClusterTask(cfg, device)
        else:
            task = StudentTask(cfg, device, teacher_first(cfg, device, info))
        if cfg.train.init_from:
            start_from(task, cfg.train.init_from)
        return train_loop(task, cfg, source, device=device, resume=resume, callbacks=callbacks)
    finally:
        dist.teardown()
        torch.set_num_threads(threads_before)
