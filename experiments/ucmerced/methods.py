"""Methods of the UC Merced study, registered into the leave-one-tile-out protocol.

    python -m experiments.ucmerced --data ../shared/data/dubai_aerial_dev \
        --extra-images ../shared/data/ucmerced_landuse --transfer --methods rgb_kmeans,scene,scene_random
    python -m experiments.ucmerced --list

Every method here trains on UC Merced (``--extra-images``, the scene folder with its class
sub-folders) and, unless its name says ``_bn``, never on a Dubai tile, so it is valid in a
transfer run (``--transfer``) and the same model serves every fold:

* ``scene``: ``SceneCNN`` pretrained on the 21 scene classes (``python -m seglib.pretrain``, 3200
  steps of 48 crops, zoom 0.375-1, fold 0 held out for the probe), under the bundled student's
  head, clustering its stride-8 map beside colour; ``scene_<setting>``: the same weights with
  other feature levels or colour weights (``SETTINGS``), for the nested choice.
* ``scene_random``: the same architecture at random weights (seed 0), BatchNorm statistics
  calibrated on UC Merced crops; ``scene_random_<setting>`` likewise.
* ``scene_50``, ``scene_1x``, ``scene_4x`` (50, 200 and 800 steps, the curve's 1x, 4x and 16x;
  ``scene`` is 3,200 steps, 64x; the names predate the curve's final steps) and ``_s1`` (seed 1): the
  compute curve. ``scene_coarse``: crops of 64 px at zoom 0.25-0.67 (coarser pixels).
* ``scene_bn``: per fold, ``scene`` with its BatchNorm statistics re-estimated on crops of the
  fold's four training tiles (shrunk by 2, as the head reads them): the one use of the Dubai
  images, never of the held-out tile.
* ``teacher_ucm`` / ``cluster_ucm`` / ``student_ucm``: the package's own label-free objectives
  on UC Merced shrunk by 2 (the teacher recipe of real tiles with its random downsample 1 or 2,
  the cluster stage, and the bundled recipe's distillation from ``teacher_ucm``), scored with
  the bundled student's head.
* ``scene_z<zoom>`` / ``scene_random_z<zoom>`` (``_c2``: colour weight 2): the CNN reading the tile
  resized by the zoom (scale matching); ``fuse_coarse`` / ``fuse_bundled`` (and ``_random``, with
  ``_w05``, ``_w2``, ``_c2`` settings): the scene map beside a second model's features
  (fusion.py); ``dense`` / ``dense_random`` (``_mix1``, ``_c2``): a projection of the frozen
  maps trained on UC Merced with a correspondence-distillation loss (dense.py).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

from experiments.stages import recipes as stage_recipes  # registers the cluster stage and its recipes
from seglib import recipes
from seglib.checkpoint import load_checkpoint, save_atomic
from seglib.config import Config, merge
from seglib.data.scenes import load_scenes, random_crops
from seglib.evaluation.loto import Method, register
from seglib.evaluation.loto.methods import LotoError, train_images
from seglib.models.scene import SceneModelConfig, SceneSegmenter, calibrate_batchnorm
from seglib.training.scene import ScenePretrainConfig, pretrain

__all__ = ["SETTINGS", "PRETRAIN", "scene_folder", "bn_crops"]

# The pretraining runs (ScenePretrainConfig changes from its defaults: 3200 steps, seed 0).
PRETRAIN = {
    "scene": {},
    "scene_s1": {"seed": 1},
    "scene_1x": {"steps": 200},
    "scene_1x_s1": {"steps": 200, "seed": 1},
    "scene_4x": {"steps": 800},
    "scene_4x_s1": {"steps": 800, "seed": 1},
    "scene_coarse": {"size": 64, "zoom": (0.25, 0.67)},
    "scene_50": {"steps": 50},
    "scene_50_s1": {"steps": 50, "seed": 1},
}
# Weights of the 3200-step run (``scene``) taken before its last step, scored while it trained (the
# learning rate had not decayed yet): the run's state.pt at that step (saved every 100 steps; a
# scene model loads from it), copied to runs/scene_at<step>/shared/scene.pt.
SNAPSHOTS = (2100,)
# Inference settings chosen between inside the folds: feature levels (weights) and colour weight.
SETTINGS = {
    "L8": {"levels": {"s8": 1.0}},
    "L816": {"levels": {"s8": 1.0, "s16": 1.0}},
    "L4816": {"levels": {"s4": 1.0, "s8": 1.0, "s16": 1.0}},
    "L8k": {"levels": {"s8": 1.0, "cls": 1.0}},
    "Lk": {"levels": {"cls": 1.0}},
    "L8c2": {"levels": {"s8": 1.0}, "colour_weight": 2.0},
    "L8c4": {"levels": {"s8": 1.0}, "colour_weight": 4.0},
    "L8c1": {"levels": {"s8": 1.0}, "colour_weight": 1.0},
}
REAL_HEAD = recipes.BUNDLED_HEAD  # the bundled student's head (half resolution, 1 iteration, prior 3)


def scene_folder(ctx) -> Path:
    if ctx.extra_images is None:
        raise LotoError(
            "the UC Merced methods read the scene folder given as --extra-images (e.g. ../shared/data/ucmerced_landuse)"
        )
    return Path(ctx.extra_images)


_SCENES: dict[str, object] = {}


def _scenes(ctx):
    key = str(scene_folder(ctx).resolve())
    if key not in _SCENES:
        _SCENES[key] = load_scenes(key)
    return _SCENES[key]


def _pretrain_build(name: str, changes: dict):
    def build(ctx, where: str) -> Path:
        cfg = ScenePretrainConfig(data_dir=str(scene_folder(ctx)), out_dir=str(ctx.runs / name / where), **changes)
        final = Path(cfg.out_dir) / "scene.pt"
        if not final.is_file():
            if not ctx.train:
                raise LotoError(f"no {final} and training is off")
            ctx.log(f"[loto] pretraining {name} on {cfg.data_dir} into {cfg.out_dir}")
        return Path(pretrain(cfg, scenes=None if final.is_file() else _scenes(ctx))["model"])

    return build


def _random_build(ctx, where: str, seed: int = 0) -> Path:
    """The default SceneCNN at random weights (seed ``seed``), BatchNorm calibrated on 8 batches of 48
    training-fold crops drawn as the pretraining draws them."""
    path = ctx.runs / ("scene_random" if seed == 0 else f"scene_random_s{seed}") / where / "scene.pt"
    if path.is_file():
        return path
    if not ctx.train:
        raise LotoError(f"no {path} and training is off")
    scenes = _scenes(ctx)
    cfg = ScenePretrainConfig()
    train = scenes.without_fold(cfg.holdout)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SceneSegmenter(SceneModelConfig(classes=len(scenes.classes)))
    batches = []
    for b in range(8):
        rng = np.random.default_rng([0, 10**6 + b])
        idx = rng.choice(len(train), cfg.batch, replace=False)
        batches.append(
            random_crops([train.images[i] for i in idx], rng, size=cfg.size, zoom=cfg.zoom, jitter=cfg.jitter)[0]
        )
    calibrate_batchnorm(model.cnn, batches)
    return save_atomic(model.checkpoint(note="random weights, BatchNorm calibrated"), path)


def bn_crops(
    ctx, fold: str, *, batches: int = 8, batch: int = 32, size: int = 128, seed: int = 0
) -> list[torch.Tensor]:
    """Crops of the fold's training tiles (``train_images`` of the labelled folder only), shrunk
    by 2 with block means as the head reads them: ``batches`` tensors (batch, 3, size, size)."""
    import glob

    from seglib.data.tiles import load_folder

    labelled = {p.stem for p in ctx.images.iterdir()}
    stems = [s for s in train_images(ctx, fold) if s in labelled]
    _, arrays = load_folder(ctx.images, include=tuple(glob.escape(s) for s in stems))
    small = []
    for rgb in arrays:
        h, w = rgb.shape[0] // 2, rgb.shape[1] // 2
        small.append(rgb[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3)) / 255)
    out = []
    for b in range(batches):
        rng = np.random.default_rng([seed, 7, b])
        crops = []
        for _ in range(batch):
            img = small[int(rng.integers(len(small)))]
            y, x = int(rng.integers(0, img.shape[0] - size + 1)), int(rng.integers(0, img.shape[1] - size + 1))
            crops.append(img[y : y + size, x : x + size])
        out.append(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float())
    return out


def _bn_build(base: str):
    def build(ctx, fold: str) -> Path:
        path = ctx.runs / f"{base}_bn" / fold / "scene.pt"
        source = _pretrain_build(base, PRETRAIN[base])(ctx, "shared")
        stamp = {
            "source": str(source),
            "train_images": sorted(s for s in train_images(ctx, fold) if not s.startswith("extra-")),
        }
        if path.is_file() and load_checkpoint(path, kind="scene").get("adapted") == stamp:
            return path
        if not ctx.train:
            raise LotoError(f"no {path} for these training images and training is off")
        model = SceneSegmenter.from_checkpoint(source)
        calibrate_batchnorm(model.cnn, bn_crops(ctx, fold))
        return save_atomic(model.checkpoint(adapted=stamp), path)

    return build


def _flat_ucm(ctx) -> Path:
    """UC Merced's images as links in one folder, by their own file names (what the seglib trainer reads)."""
    root = scene_folder(ctx)
    folder = ctx.runs / "_ucm_flat"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(root.rglob("*.jpg")):
        link = folder / path.name
        if not link.exists():
            os.symlink(path.resolve(), link)
    return folder


def _recipe_build(name: str, overrides: dict, *, teacher: str | None = None):
    """A seglib recipe trained once on UC Merced (no Dubai tile)."""

    def build(ctx, where: str) -> Path:
        directory = ctx.runs / name / where
        over = merge(copy.deepcopy(overrides), {"data": {"synthetic": False, "data_dir": str(_flat_ucm(ctx))}})
        over = merge(over, {"train": {"checkpoint_dir": str(directory), "threads": ctx.threads, "device": ctx.device}})
        if teacher is not None:
            over = merge(over, {"distill": {"teacher_checkpoint": str(METHODS_BUILD[teacher](ctx, where))}})
        cfg = Config.from_dict(over)
        artifact = directory / ("teacher.pt" if cfg.stage == "teacher" else "student.pt")
        want = _what_decides(cfg.to_dict())
        if artifact.is_file():
            have = _what_decides(load_checkpoint(artifact)["config"])
            if have != want:
                raise LotoError(f"{artifact} was trained with another config; delete {directory} to retrain")
            return artifact
        if not ctx.train:
            raise LotoError(f"no {artifact} and training is off")
        from seglib.training.run import run

        ctx.log(f"[loto] training {name} on UC Merced into {directory}")
        run(cfg, resume=True)
        return artifact

    return build


def _what_decides(config: dict) -> dict:
    d = json.loads(json.dumps(config))
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("threads", "device", "checkpoint_dir")}
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("data_dir",)}
    d["distill"] = {k: v for k, v in d["distill"].items() if k != "teacher_checkpoint"}
    return d


UCM_DATA = {"size": 112}  # UC Merced's 256 px scenes shrunk by 2 are 128 px: 112 px crops leave room to move
METHODS_BUILD = {
    "teacher_ucm": _recipe_build(
        "teacher_ucm", merge(recipes.TEACHER_DUBAI_CPU, {"data": {"downscale": 2, **UCM_DATA}})
    ),
    "cluster_ucm": _recipe_build("cluster_ucm", merge(stage_recipes.STUDENT_CLUSTER_CPU, {"data": UCM_DATA})),
}
METHODS_BUILD["student_ucm"] = _recipe_build(
    "student_ucm", merge(recipes.STUDENT_DUBAI_CPU, {"data": UCM_DATA}), teacher="teacher_ucm"
)


def _bundled(ctx, where: str) -> Path:
    from seglib.paths import bundled_model_path

    return Path(bundled_model_path())


register(
    Method(
        "bundled",
        per_fold=False,
        build=_bundled,
        saw_folder=True,
        about="today's bundled student (trained on all 44 dev images without masks: a reference, not a transfer)",
    )
)
register(
    Method("bundled_random", kind="random", random_of="bundled", about="the bundled architecture at random weights")
)

for _name, _changes in PRETRAIN.items():
    register(
        Method(
            _name,
            per_fold=False,
            build=_pretrain_build(_name, _changes),
            about=f"SceneCNN pretrained on UC Merced's scene classes ({_changes or 'recipe'}), stride-8 map + colour",
        )
    )
register(
    Method(
        "scene_random",
        per_fold=False,
        build=_random_build,
        about="the SceneCNN at random weights (seed 0), BatchNorm calibrated on UC Merced crops",
    )
)
register(
    Method(
        "scene_random_s1",
        per_fold=False,
        build=lambda ctx, where: _random_build(ctx, where, seed=1),
        about="the SceneCNN at random weights of seed 1 (the seed noise of scene_random)",
    )
)
register(
    Method(
        "scene_bn",
        build=_bn_build("scene"),
        about="scene with BatchNorm statistics re-estimated on the fold's four training tiles (shrunk by 2)",
    )
)


def _snapshot_build(name: str):
    def build(ctx, where: str) -> Path:
        path = ctx.runs / name / "shared" / "scene.pt"
        if not path.is_file():
            raise LotoError(f"no {path}: copy there the state.pt of scene's pretraining when it reaches the step")
        return path

    return build


for _step in SNAPSHOTS:
    register(
        Method(
            f"scene_at{_step}",
            per_fold=False,
            build=_snapshot_build(f"scene_at{_step}"),
            about=f"scene's weights at step {_step} of 3200 (before the learning rate decayed)",
        )
    )
_CURVE_BASES = ("scene_50", "scene_50_s1", "scene_1x", "scene_1x_s1", "scene_4x", "scene_4x_s1", "scene_coarse")
for _base in ("scene", "scene_random", "scene_bn", "scene_s1", *(f"scene_at{s}" for s in SNAPSHOTS), *_CURVE_BASES):
    for _setting, _attrs in SETTINGS.items():
        register(
            Method(
                f"{_base}_{_setting}",
                eval_of=_base,
                per_fold=_base == "scene_bn",
                attrs=_attrs,
                about=f"{_base} with other inference settings ({_attrs})",
            )
        )
# The head reading the tiles at their own resolution (downsample 1) instead of shrunk by 2: UC Merced
# crops were seen at 0.3-0.8 m per pixel, the tiles shrunk by 2 are coarser than that.
for _base in ("scene", "scene_random", "scene_coarse", *(f"scene_at{s}" for s in SNAPSHOTS)):
    register(
        Method(
            f"{_base}_ds1",
            eval_of=_base,
            per_fold=False,
            infer={"downsample": 1},
            about=f"{_base} reading the tiles at full resolution (downsample 1)",
        )
    )
register(
    Method(
        "student_dubai_ucm",
        recipe="student_dubai_cpu",
        teacher="teacher_synthetic",
        extra_images=True,
        about="the bundled recipe with UC Merced added to the fold's four tiles (distilled from the synthetic teacher)",
    )
)
register(
    Method(
        "student_cluster_ucm",
        recipe="student_cluster_cpu",
        extra_images=True,
        about="the cluster stage (dense swapped prediction) on UC Merced plus the fold's four tiles",
    )
)
for _name, _build in METHODS_BUILD.items():
    register(
        Method(
            _name,
            per_fold=False,
            build=_build,
            about=f"the package's label-free recipe {_name} trained once on UC Merced shrunk by 2",
        )
    )
    register(
        Method(
            f"{_name}_real_head",
            eval_of=_name,
            per_fold=False,
            infer=REAL_HEAD,
            about=f"{_name} scored with the bundled student's head (half resolution, 1 iteration, prior 3)",
        )
    )

# Scale matching at inference: the CNN reads the tile (shrunk by 2, as the head reads it) resized by
# these factors, its maps brought back to the head's grid (SceneSegmenter.zoom). UC Merced's pixels
# are 0.3 m and the pretraining saw them at 0.3-0.8 m; the tiles shrunk by 2 have coarser pixels, so
# zooms above 1 bring their objects toward the sizes the CNN learned. The candidates (fixed before any
# of them was scored) straddle 1 on both sides; each at the default colour weight (3, ``_z<tag>``) and
# at 2 (``_z<tag>_c2``, the weight the folds chose at zoom 1); zoom 1 is ``scene`` / ``scene_L8c2``.
ZOOMS = {"z05": 0.5, "z075": 0.75, "z15": 1.5, "z2": 2.0, "z3": 3.0}
for _base in ("scene", "scene_random"):
    for _tag, _zoom in ZOOMS.items():
        for _suffix, _colour in (("", {}), ("_c2", {"colour_weight": 2.0})):
            register(
                Method(
                    f"{_base}_{_tag}{_suffix}",
                    eval_of=_base,
                    per_fold=False,
                    attrs={"zoom": _zoom, **_colour},
                    about=f"{_base}, the CNN reading the tile resized by {_zoom} ({_colour or 'colour weight 3'})",
                )
            )


# Fusion: the scene model's stride-8 map beside another model's learned features, one k-means
# (experiments/ucmerced/fusion.py). The other model: today's bundled student (trained on the 44 dev
# images without masks: a reference only, its twin fuses the two random twins: scene_random and the
# student architecture at random weights, seed 0), or a second scene model, `scene_coarse` (crops at
# coarser pixels; transfer-valid; its twin fuses the two calibrated random networks of seeds 0 and 1).
# Settings: the other features' weight ``_w<w>`` (1 unless named) and colour weight 2 (``_c2``; 3
# unless named).
def _fusion_build(name: str, scene: str, other: str, *, random: bool = False):
    def build(ctx, where: str) -> Path:
        from seglib.evaluation.loto.methods import fold_artifact, get_method

        from .fusion import fusion_checkpoint

        parts = [fold_artifact(get_method(m), ctx, where) for m in (scene, other)]
        path = ctx.runs / name / where / "fusion.pt"
        want = fusion_checkpoint(*parts, path, other_random_seed=0 if random else None)
        if not path.is_file() or load_checkpoint(path).get("config") != want["config"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(want, path)
        return path

    return build


# name: (scene part, other part, other part drawn at random weights, a reference)
FUSIONS = {
    "fuse_bundled": ("scene", "bundled", False, True),
    "fuse_bundled_random": ("scene_random", "bundled", True, True),
    "fuse_coarse": ("scene", "scene_coarse", False, False),
    "fuse_coarse_random": ("scene_random", "scene_random_s1", False, False),
}
FUSION_SETTINGS = {
    "w05": {"weight": 0.5},
    "w2": {"weight": 2.0},
    "c2": {"colour_weight": 2.0},
    "w05_c2": {"weight": 0.5, "colour_weight": 2.0},
    "w2_c2": {"weight": 2.0, "colour_weight": 2.0},
}
for _name, (_scene, _other, _random, _reference) in FUSIONS.items():
    register(
        Method(
            _name,
            per_fold=False,
            build=_fusion_build(_name, _scene, _other, random=_random),
            saw_folder=_reference,
            about=f"{_scene}'s stride-8 map beside the features of {_other}"
            + (" at random weights" if _random else ""),
        )
    )
    for _setting, _attrs in FUSION_SETTINGS.items():
        register(Method(f"{_name}_{_setting}", eval_of=_name, per_fold=False, attrs=_attrs, about=f"{_name}, {_attrs}"))


# A dense head learned on the frozen scene model (experiments/ucmerced/dense.py: feature
# correspondences distilled into a projection, on UC Merced crops only), and the same training on
# the random network's maps. Settings: the scene maps kept beside the projection (``_mix1``) and
# colour weight 2 (``_c2``).
def _dense_build(name: str, base: str, changes: dict):
    def build(ctx, where: str) -> Path:
        from seglib.evaluation.loto.methods import fold_artifact, get_method

        from .dense import DenseConfig, train_projection

        scene = fold_artifact(get_method(base), ctx, where)
        path = ctx.runs / name / where / "projected.pt"
        cfg = DenseConfig(**changes)
        if path.is_file():
            saved = load_checkpoint(path)["config"]
            if json.loads(json.dumps(saved["dense"])) != json.loads(json.dumps(cfg.to_dict())):
                raise LotoError(f"{path} was trained with another config; delete it to retrain")
            return path
        if not ctx.train:
            raise LotoError(f"no {path} and training is off")
        ctx.log(f"[loto] training the dense head {name} on {scene_folder(ctx)} into {path}")
        return train_projection(scene, _scenes(ctx), path, cfg, log=ctx.log)

    return build


DENSE = {"dense": ("scene", {}), "dense_random": ("scene_random", {})}
DENSE_SETTINGS = {"mix1": {"mix": 1.0}, "c2": {"colour_weight": 2.0}, "mix1_c2": {"mix": 1.0, "colour_weight": 2.0}}
for _name, (_base, _changes) in DENSE.items():
    register(
        Method(
            _name,
            per_fold=False,
            build=_dense_build(_name, _base, _changes),
            about=f"a projection of {_base}'s maps trained on UC Merced to agree where the maps do (STEGO's loss)",
        )
    )
    for _setting, _attrs in DENSE_SETTINGS.items():
        register(Method(f"{_name}_{_setting}", eval_of=_name, per_fold=False, attrs=_attrs, about=f"{_name}, {_attrs}"))
