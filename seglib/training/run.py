"""Run the configured training stage: what ``python -m seglib.train_distill`` and the notebooks call.

    from seglib.config import Config
    from seglib.training.run import run
    history = run(Config.from_dict({"train": {"steps": 100}}))   # dict of lists, one entry per step

``run`` resolves the config once (validated, its folders checked, the stage's settings applied,
serialised for the checkpoints), sets the thread count for the run
(``train.threads``, 0: automatic, see ``seglib.device.training_threads``; restored afterwards),
joins the process group under torchrun, seeds torch (the same initial weights on every rank),
trains the teacher first for a student run that names none
(``seglib.training.student.teacher_first``), builds the stage's task: its model and loss
(``seglib.training.stages.make_task``), then the data source, and hands them to ``train_loop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .. import distributed as dist
from ..config import Config, stage_settings
from ..data.source import make_source
from ..device import busy_note, resolve_device, training_threads
from .loop import train_loop
from .stages import get_stage, make_task
from .student import teacher_first

__all__ = ["run"]


def run(
    cfg: Config, *, resume: bool = False, callbacks: Iterable[Callable[[int, dict[str, float]], None]] = ()
) -> dict[str, list[float]]:
    """Train the stage ``cfg.stage``; returns its history (``train_loop``'s). ``resume``
    continues from the latest complete checkpoint in ``train.checkpoint_dir``."""
    stage = get_stage(cfg.stage)
    # The config resolved once: checked, the stage's settings applied, serialised for the
    # checkpoints; the layers below get these values.
    cfg.validate().check_paths()
    options = stage_settings(stage.options, cfg.stage_options, stage.name)
    config = cfg.to_dict()
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
        teacher = teacher_first(cfg, device) if stage.name == "student" else None  # trained first when none is named
        task = make_task(stage, options, cfg, device, teacher)
        source = make_source(cfg, rank=info.rank, world=info.world)
        return train_loop(task, cfg, source, config=config, device=device, resume=resume, callbacks=callbacks)
    finally:
        dist.teardown()
        torch.set_num_threads(threads_before)
