"""The training stages a run can name (``cfg.stage``): the core's ``teacher`` and ``student``, and
any stage a plugin registers (the research stages of ``experiments/stages/`` do).

A stage is a name, a function that builds its ``Task`` (``seglib.training.loop``) for a config
on a device, and, for a plugin, a dataclass of its own settings: the config carries them as
``stage_options``, checked against that dataclass (``seglib.config.stage_settings``), and the build
function gets the checked dataclass. A plugin's settings never enter the core config. The core
stages have no build function: ``make_task`` builds them by name, so the path from a run's config
to the model and the loss reads as plain calls.

    register_stage(Stage("mine", build=lambda cfg, device, options: MyTask(cfg, device, options),
                         options=MyOptions))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError
from ..models.teacher import MonolithicSegmenter
from .loop import Task
from .student import StudentTask
from .teacher import TeacherTask

__all__ = ["Stage", "STAGES", "register_stage", "get_stage", "make_task"]


@dataclass(frozen=True)
class Stage:
    """Arguments:
    name: what ``cfg.stage`` says.
    build: (cfg, device, options) -> the stage's ``Task``; ``options`` is None for a stage
      without settings of its own. None for the core stages (``make_task`` builds them).
    options: the dataclass of the stage's settings (``cfg.stage_options``), or None.
    about: one line for error messages and listings.
    """

    name: str
    build: Callable[[Config, torch.device, Any], Task] | None = None
    options: type | None = None
    about: str = ""


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Make ``stage`` available to ``cfg.stage`` (a later registration of the name replaces it)."""
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """The registered stage ``name``; ``ConfigError`` naming the registered ones otherwise."""
    if name not in STAGES:
        known = ", ".join(f"{s.name} ({s.about})" if s.about else s.name for s in STAGES.values())
        raise ConfigError(
            f"unknown stage {name!r}; registered: {known}. A research stage is registered by importing its "
            "plugin (experiments/stages): python -m experiments.train ..."
        )
    return STAGES[name]


def make_task(stage: Stage, options: Any, cfg: Config, device: torch.device, teacher: Path | None = None) -> Task:
    """The task of ``stage`` with its checked settings ``options`` (``seglib.config.stage_settings``);
    ``teacher``: the checkpoint a student distils from (``teacher_first``), loaded here."""
    if stage.build is not None:  # a plugin's stage
        return stage.build(cfg, device, options)
    if stage.name == "teacher":
        return TeacherTask(cfg, device)
    if teacher is None:
        raise ValueError("the student stage needs its teacher checkpoint (seglib.training.student.teacher_first)")
    frozen = MonolithicSegmenter.from_checkpoint(teacher)
    return StudentTask(cfg, device, frozen)


register_stage(Stage("teacher", about="the teacher on view pairs"))
register_stage(
    Stage(
        "student",
        about="the student distilled from a teacher (trained first when distill.teacher_checkpoint is empty)",
    )
)
