"""The methods a leave-one-tile-out run compares, and how their fold models are trained and cached.

A ``Method`` is one of three kinds:

* ``kmeans``: RGB k-means per image (no model);
* ``trained``: a training recipe (``seglib.recipes`` name or override dict) run on the images of
  the fold's training tiles (``data.exclude`` names the held-out tile's images, nothing is
  copied), or, with ``per_fold=False``, once on data outside the labelled folder (the synthetic
  teacher); a student recipe names the method whose model of the same fold it distils;
* ``random``: the architecture of another method at random weights (seed 0), same head.

``infer`` holds inference overrides (``iters``, ``size_prior``, ``downsample``...); an
``eval_of`` method reuses another method's trained models with other inference settings.

Fold models live under ``<runs>/<train name>/<fold>/`` with ``loto.json``, which records the
resolved config and the exact training images. A finished folder is reused; an unfinished
one resumes from its last checkpoint; a folder whose recorded config differs from the one
asked for is an error (delete the folder or name the method differently), so a changed
recipe is never scored with a stale model.
"""

from __future__ import annotations

import copy
import glob
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ... import recipes
from ...config import Config, ConfigError, merge

__all__ = [
    "Method",
    "METHODS",
    "DEFAULT_METHODS",
    "LotoError",
    "register",
    "load_plugin",
    "get_method",
    "FoldContext",
    "fold_model",
    "train_images",
    "link_training_images",
    "trains_on_folder",
    "is_reference",
]

SHARED = "shared"  # the fold folder of a model trained once, without the labelled folder's images


class LotoError(RuntimeError):
    """A protocol run that cannot continue; the message says what to do."""


@dataclass(frozen=True)
class Method:
    """One row of the leave-one-tile-out table.

    Arguments:
      name: the row's name (and, for trained methods, the folder under the runs directory).
      kind: kmeans | trained | random.
      recipe: a ``seglib.recipes`` name or a dict of config overrides (trained methods).
      teacher: for a student recipe, the method whose model of the same fold it distils.
      init_from: for a recipe whose stage takes ``init_from`` (the research stages of
        experiments/stages), the method whose model of the same fold starts the run
        (``stage_options.init_from``), e.g. the synthetic teacher fine-tuned on real tiles.
      per_fold: False: trained once, on data outside the labelled folder (synthetic tiles).
      random_of: for ``random``: the method whose architecture is evaluated at random weights.
      eval_of: reuse this method's trained models (only ``infer`` differs).
      infer: inference overrides passed to the model (iters, size_prior, downsample, ...).
      attrs: model attributes set before scoring, dotted paths allowed (``colour_weight``,
        ``head.denoise_iters``): settings of the head that are not arguments of a forward call.
      adapt: keyword arguments of ``seglib.inference.adapt.adapt`` (``steps``, ...): each image is
        segmented by a copy of the fold model adapted to that image first (``eval_of`` methods).
      extra_images: True: the fold's training images include the run's ``--extra-images`` (a
        per-fold recipe trains on them beside the fold's tiles; a build reads ``ctx.extra_images``).
      build: for models no recipe describes: ``build(ctx, fold) -> Path`` returns the fold's
        model file (any checkpoint ``seglib.models.load_model`` reads), training it first if
        needed; ``fold`` is ``"shared"`` for a method with ``per_fold=False``. A per-fold build
        may read only ``train_images(ctx, fold)`` (and ``ctx.extra_images``). With
        ``ctx.train`` False (``--no-train``) a build that would train raises ``LotoError``.
      saw_folder: True: a model trained on the labelled folder's images outside the protocol
        (the bundled student, trained on all 44 dev images): a transfer run scores it (and its
        random twin, its ``eval_of`` settings) as a reference, listed as such in the result.
      about: one line for the table's legend.
    """

    name: str
    kind: str = "trained"
    recipe: str | dict | None = None
    teacher: str | None = None
    init_from: str | None = None
    per_fold: bool = True
    random_of: str | None = None
    eval_of: str | None = None
    infer: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    adapt: dict = field(default_factory=dict)
    extra_images: bool = False
    build: Callable[[FoldContext, str], Path] | None = None
    saw_folder: bool = False
    about: str = ""

    def overrides(self) -> dict:
        if isinstance(self.recipe, str):
            if self.recipe not in recipes.RECIPES:
                raise LotoError(
                    f"method {self.name}: unknown recipe {self.recipe!r}; known: {', '.join(recipes.RECIPES)} "
                    "(a plugin registers its own recipes: seglib.recipes.register_recipe)"
                )
            return recipes.get_recipe(self.recipe)
        return copy.deepcopy(self.recipe or {})


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the methods a run can name (``--methods``); a research module registers
    its own at import (``python -m seglib.loto --plugin MODULE``, experiments/loto/methods.py)."""
    METHODS[method.name] = method
    return method


register(Method("rgb_kmeans", kind="kmeans", about="k-means on the RGB pixels of each image (full resolution)"))
register(
    Method(
        "teacher_synthetic",
        recipe="teacher_synthetic_cpu",
        per_fold=False,
        about="the teacher of the recipe teacher_synthetic_cpu, trained once on synthetic tiles (no real data)",
    )
)
register(Method("teacher_random", kind="random", random_of="teacher_synthetic", about="the teacher at random weights"))
register(
    Method(
        "student_dubai",
        recipe="student_dubai_cpu",
        teacher="teacher_synthetic",
        about="the bundled recipe (student_dubai_cpu): distilled from the synthetic teacher on the fold",
    )
)
register(
    Method(
        "student_random", kind="random", random_of="student_dubai", about="the bundled architecture at random weights"
    )
)

DEFAULT_METHODS = ("rgb_kmeans", "teacher_random", "teacher_synthetic", "student_random", "student_dubai")


def load_plugin(spec: str) -> None:
    """Import a module that registers methods (``register``): a dotted module name importable from
    the working directory (``experiments.loto.methods``), or the path of a ``.py`` file."""
    import importlib
    import importlib.util
    import sys

    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise LotoError(f"plugin file not found: {spec}")
        module_spec = importlib.util.spec_from_file_location(f"seglib_loto_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        return
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a dotted name is looked up from the working directory too
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise LotoError(
            f"plugin {spec!r} not found ({exc}); give a module importable from here or a .py file"
        ) from None


def get_method(name: str) -> Method:
    """A registered method, or a variant ``NAME@x<scale>s<seed>`` of one: its training (and
    that of a per-fold teacher) runs ``scale`` times the steps with training seed ``seed``."""
    if name in METHODS:
        return METHODS[name]
    base, _, tag = name.partition("@")
    if not tag or base not in METHODS:
        raise LotoError(f"unknown method {name!r}; registered: {', '.join(METHODS)} (variants: NAME@x4s1)")
    scale, seed = _parse_tag(tag, name)
    m = METHODS[base]
    if m.kind == "kmeans":
        raise LotoError(f"{name}: rgb_kmeans has no training to scale or seed")
    if m.build is not None or (m.kind == "random" and METHODS.get(m.random_of, m).build is not None):
        raise LotoError(f"{name}: {base} trains itself (Method.build); register its longer or reseeded runs by name")
    if m.kind == "random":
        return replace(m, name=name, random_of=f"{m.random_of}@{tag}")
    if m.eval_of:
        return replace(m, name=name, eval_of=f"{m.eval_of}@{tag}")
    over = m.overrides()
    train = over.setdefault("train", {})
    steps = int(train.get("steps", Config().train.steps))
    train["steps"] = steps * scale
    train["seed"] = seed
    if "checkpoint_every" in train:
        train["checkpoint_every"] = int(train["checkpoint_every"]) * scale
    teacher, init_from = m.teacher, m.init_from
    if teacher and METHODS[teacher].per_fold:
        teacher = f"{teacher}@{tag}"
    if init_from and METHODS[init_from].per_fold:
        init_from = f"{init_from}@{tag}"
    return replace(m, name=name, recipe=over, teacher=teacher, init_from=init_from)


def _parse_tag(tag: str, name: str) -> tuple[int, int]:
    import re

    match = re.fullmatch(r"x(\d+)s(\d+)", tag)
    if not match or int(match.group(1)) < 1:
        raise LotoError(f"{name}: a variant tag is x<steps scale>s<seed>, e.g. x4s1; got {tag!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass
class FoldContext:
    """Where the protocol reads and writes.

    Arguments:
      images: folder of the labelled images (training reads it too, minus the held-out tile).
      runs: root of the fold model folders.
      tiles: {tile: image stems} of every tile in ``images``.
      threads, device: for training and evaluation.
      train: False: a missing fold model is an error instead of being trained.
      extra_images: a folder of images (sub-folders included) that joins the training images of
        the methods that ask for it (``Method.extra_images``) and is never scored, e.g. UC
        Merced's scenes beside the dev split's tiles.
      train_dir: the folder those methods train on: a folder of links to ``images`` and
        ``extra_images`` (``link_training_images``); ``images`` when there are no extra images.
    """

    images: Path
    runs: Path
    tiles: dict[str, list[str]]
    threads: int = 1
    device: str = "cpu"
    train: bool = True
    log: Any = print
    extra_images: Path | None = None
    train_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.train_dir is None:
            self.train_dir = self.images


def train_images(ctx: FoldContext, fold: str, extra: bool = False) -> list[str]:
    """Stems of the images a model of ``fold`` trains on: every image of the labelled folder
    (with ``extra``, of ``ctx.train_dir``: the extra images too) except the held-out tile's
    (images without a tile id are kept: they are never scored)."""
    from ...io.images import list_images

    held = set(ctx.tiles.get(fold, []))
    return [p.stem for p in list_images(ctx.train_dir if extra else ctx.images) if p.stem not in held]


def _training_folder(method: Method, ctx: FoldContext) -> Path:
    if method.extra_images and ctx.extra_images is None:
        raise LotoError(f"{method.name} trains on the run's extra images too; give --extra-images DIR")
    return ctx.train_dir if method.extra_images else ctx.images


def link_training_images(images: Path, extra: Path, root: Path, tile_pattern: str) -> Path:
    """A folder under ``root`` of links to every image of ``images`` and of ``extra`` (searched
    recursively), the extra ones named ``extra-<relative path with '-' for '/'>-x`` so that no
    extra image carries a tile id (it is never a fold and never scored); the same inputs give
    the same folder. Falls back to copies where links cannot be made."""
    import hashlib
    import os
    import shutil

    from ...io.images import IMAGE_SUFFIXES, list_images
    from .folds import tile_of

    own = list_images(images)
    others = sorted(p for p in Path(extra).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not others:
        raise LotoError(f"--extra-images {extra}: no images found (searched sub-folders too)")
    names = {p.name: p for p in own}
    for p in others:
        rel = p.relative_to(extra).with_suffix("")
        name = "extra-" + "-".join(rel.parts) + "-x" + p.suffix.lower()
        if tile_of(Path(name).stem, tile_pattern) is not None or name in names:
            raise LotoError(f"extra image {p} would be named {name}, which the tile pattern reads as a tile")
        names[name] = p
    digest = hashlib.sha256("\n".join(f"{n}={p.resolve()}" for n, p in sorted(names.items())).encode()).hexdigest()[:12]
    folder = Path(root) / "_train_images" / digest
    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in names.items():
        link = folder / name
        if link.exists() or link.is_symlink():
            continue
        try:
            os.symlink(path.resolve(), link)
        except OSError:  # no symlinks here (e.g. Windows without the privilege)
            shutil.copyfile(path, link)
    done.write_text(f"{len(names)} images\n")
    return folder


def _resolved(
    method: Method, ctx: FoldContext, fold: str, teacher_path: Path | None, init_path: Path | None = None
) -> Config:
    over = method.overrides()
    if method.per_fold:
        held = ctx.tiles[fold]
        exclude = [glob.escape(s) for s in held]
        data = {"synthetic": False, "data_dir": str(_training_folder(method, ctx)), "include": [], "exclude": exclude}
        over = merge(over, {"data": data})
    over = merge(over, {"train": {"threads": ctx.threads, "device": ctx.device}})
    if teacher_path is not None:
        over = merge(over, {"distill": {"teacher_checkpoint": str(teacher_path)}})
    if init_path is not None:
        over = merge(over, {"stage_options": {"init_from": str(init_path)}})
    return Config.from_dict(over)


def _fingerprint(cfg: Config) -> dict:
    """The parts of a config that decide the trained model (not where it is written, nor threads),
    with the student's head and refinement overrides resolved against ``model.*``, so that two
    configs compare by what they mean."""
    d = cfg.to_dict()
    for part in ("head", "refine"):
        d["student"][part] = {**d["model"][part], **d["student"][part]}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("threads", "device", "checkpoint_dir")}
    d["stage_options"] = {k: v for k, v in d["stage_options"].items() if k != "init_from"}
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("data_dir", "num_workers")}
    d["distill"] = {k: v for k, v in d["distill"].items() if k != "teacher_checkpoint"}
    return d


def trains_on_folder(method: Method) -> bool:
    """Whether any model ``method`` scores with was trained on the labelled folder's images
    (a per-fold recipe or build, a ``saw_folder`` model, or a teacher / start / twin that was)."""
    if method.kind == "kmeans":
        return False
    if method.saw_folder:
        return True
    if method.kind == "random":
        return trains_on_folder(get_method(method.random_of))
    if method.eval_of:
        return trains_on_folder(get_method(method.eval_of))
    if method.per_fold:
        return True
    return any(trains_on_folder(get_method(other)) for other in (method.teacher, method.init_from) if other)


def is_reference(method: Method) -> bool:
    """Whether ``method`` scores a ``saw_folder`` model (itself, at random weights or with other
    settings): a reference a transfer run may show, never a transfer result."""
    if method.kind == "random":
        return is_reference(get_method(method.random_of))
    if method.eval_of:
        return is_reference(get_method(method.eval_of))
    return method.saw_folder


def fold_model(method: Method, ctx: FoldContext, fold: str) -> torch.nn.Module:
    """The model of ``method`` for ``fold`` (trained now if not cached), CPU, eval mode."""
    from ...models import load_model, random_init_like

    if method.kind == "random":
        model = random_init_like(fold_model(get_method(method.random_of), ctx, fold))
    elif method.kind != "trained":
        raise LotoError(f"{method.name} has no model")
    elif method.eval_of:
        model = fold_model(get_method(method.eval_of), ctx, fold)
    else:
        model = load_model(fold_artifact(method, ctx, fold))
    for path, value in method.attrs.items():
        owner, _, attr = path.rpartition(".")
        target = model.get_submodule(owner) if owner else model
        if not hasattr(target, attr):
            raise LotoError(f"method {method.name}: the model has no attribute {path!r}")
        setattr(target, attr, value)
    return model


def fold_artifact(method: Method, ctx: FoldContext, fold: str) -> Path:
    """Path of the trained ``teacher.pt`` / ``student.pt`` of ``method`` on ``fold``; trains it
    (resuming a killed run) when it is missing."""
    where = fold if method.per_fold else SHARED
    if method.build is not None:  # it knows whether it would train (ctx.train False: it must not)
        return Path(method.build(ctx, where))
    teacher_path = fold_artifact(get_method(method.teacher), ctx, fold) if method.teacher else None
    init_path = fold_artifact(get_method(method.init_from), ctx, fold) if method.init_from else None
    cfg = _resolved(method, ctx, fold, teacher_path, init_path)
    directory = ctx.runs / method.name / where
    cfg.train.checkpoint_dir = str(directory)
    record_path = directory / "loto.json"
    record = {
        "method": method.name,
        "fold": where,
        "config": _fingerprint(cfg),
        "teacher": None if teacher_path is None else _relative(teacher_path, ctx.runs),
        **({"init_from": _relative(init_path, ctx.runs)} if init_path is not None else {}),
        "train_images": train_images(ctx, fold, method.extra_images) if method.per_fold else [],
        "held_out": ctx.tiles.get(fold, []) if method.per_fold else [],
    }
    if record_path.is_file():
        saved = json.loads(record_path.read_text())
        if isinstance(saved.get("config"), dict):  # the saved fingerprint, read in today's layout
            try:
                saved["config"] = _fingerprint(Config.from_dict(saved["config"]))
            except ConfigError:
                saved["config"] = None  # settings this seglib does not have: another config
        same = {k: saved.get(k) for k in record} == json.loads(json.dumps(record))
        if not same:
            raise LotoError(
                f"{directory} holds a model trained with another config or other images than {method.name} "
                f"now asks for; delete that folder to retrain, or register the change under a new method name"
            )
        if saved.get("done") and _artifact(directory) is not None:
            return _artifact(directory)
    if not ctx.train:
        raise LotoError(f"no trained model in {directory} and training is off; run without --no-train first")
    directory.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    ctx.log(f"[loto] training {method.name} for fold {where} into {directory}")
    from ...training.run import run

    tic = time.perf_counter()
    run(cfg, resume=True)
    record.update(done=True, train_seconds=round(time.perf_counter() - tic, 1), threads=ctx.threads)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(record_path)
    return _artifact(directory)


def _artifact(directory: Path) -> Path | None:
    """The model a fold run wrote: its ``student.pt``, else its ``teacher.pt`` (the teacher a
    student run trains first sits in ``teacher/``)."""
    return next((directory / name for name in ("student.pt", "teacher.pt") if (directory / name).is_file()), None)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
