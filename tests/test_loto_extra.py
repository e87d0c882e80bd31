"""Protocol extensions: images added to every fold's training (``extra_images``), methods that
build their own fold models (``Method.build``), and transfer runs (``transfer``): the held-out
tile never reaches training, extra images are never scored, and a transfer run refuses any
model that trained on the labelled folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_labelled_tiles
from PIL import Image

from seglib.checkpoint import save_atomic
from seglib.evaluation.loto import run_protocol
from seglib.evaluation.loto.folds import tile_of
from seglib.evaluation.loto.methods import METHODS, LotoError, Method, link_training_images, register, train_images
from seglib.models.scene import SceneModelConfig, SceneSegmenter

TILES = ("t1", "t2")
TINY_SCENE = {"widths": (8, 8, 16, 16), "depths": (1, 1, 1, 1), "classes": 2}


@pytest.fixture
def folders(tmp_path):
    images, masks, extra = tmp_path / "images", tmp_path / "masks", tmp_path / "extra" / "images"
    write_labelled_tiles(images, masks, TILES)
    for cls in ("forest", "harbor"):
        (extra / cls).mkdir(parents=True)
        for i in range(2):  # names that would read as tiles if they were not renamed ("...t01")
            Image.fromarray(np.full((64, 64, 3), 60 * i + 40, np.uint8)).save(extra / cls / f"{cls}t0{i}.png")
    return images, masks, extra.parent


def test_extra_images_join_every_fold_but_are_never_a_fold(folders, tmp_path):
    images, _, extra = folders
    folder = link_training_images(images, extra, tmp_path / "runs", r"t(\d+)$")
    names = sorted(p.stem for p in folder.iterdir() if not p.name.startswith("."))
    extras = [n for n in names if n.startswith("extra-")]
    assert len(extras) == 4 and all(tile_of(n) is None for n in extras)
    assert link_training_images(images, extra, tmp_path / "runs", r"t(\d+)$") == folder  # same inputs, same folder


def test_build_methods_see_only_the_training_tiles_and_transfer_refuses_per_fold(folders, tmp_path, one_thread):
    images, masks, extra = folders
    seen: dict[str, list[str]] = {}

    def per_fold(ctx, fold):
        seen[fold] = train_images(ctx, fold, extra=True)
        assert ctx.extra_images == extra
        path = ctx.runs / "test_scene_fold" / fold / "scene.pt"
        if not path.is_file():
            save_atomic(
                SceneSegmenter(SceneModelConfig(**TINY_SCENE)).eval().checkpoint(),
                path,
            )
        return path

    def shared(ctx, fold):
        assert fold == "shared"
        path = ctx.runs / "test_scene_shared" / fold / "scene.pt"
        save_atomic(
            SceneSegmenter(SceneModelConfig(**TINY_SCENE)).eval().checkpoint(),
            path,
        )
        return path

    made = [
        register(Method("test_scene_fold", build=per_fold, extra_images=True)),
        register(Method("test_scene_shared", per_fold=False, build=shared)),
        register(
            Method("test_scene_shared_L4", eval_of="test_scene_shared", per_fold=False, attrs={"levels": {"s4": 1.0}})
        ),
        register(Method("test_scene_seen", per_fold=False, build=shared, saw_folder=True)),
        register(Method("test_scene_seen_random", kind="random", random_of="test_scene_seen")),
    ]
    try:
        kw = dict(images=images, masks=masks, runs=tmp_path / "runs", ignore=(), threads=1, log=lambda m: None)
        result = run_protocol(methods=["rgb_kmeans", "test_scene_fold"], extra_images=extra, boundary=False, **kw)
        for fold in TILES:
            held = {f"img0{fold}", f"img1{fold}"}
            assert not held & set(seen[fold])
            assert sum(n.startswith("extra-") for n in seen[fold]) == 4  # every extra image, every fold
        scored = {r["image"] for r in result["per_image"]["test_scene_fold"]}
        assert scored == {f"img{i}{t}" for t in TILES for i in range(2)}  # extra images are never scored
        assert "boundary_f1" not in result["per_image"]["rgb_kmeans"][0]
        assert result["protocol"]["extra_images"] == str(extra)
        with pytest.raises(LotoError, match="none of the methods trains on extra images"):
            run_protocol(methods=["rgb_kmeans", "student_dubai"], extra_images=extra, **kw)
        with pytest.raises(LotoError, match="transfer run"):
            run_protocol(methods=["rgb_kmeans", "test_scene_fold"], transfer=True, extra_images=extra, **kw)
        with pytest.raises(LotoError, match="student_dubai"):
            run_protocol(methods=["student_dubai"], transfer=True, **kw)
        out = run_protocol(
            methods=["rgb_kmeans", "test_scene_shared", "test_scene_shared_L4"], transfer=True, boundary=False, **kw
        )
        assert out["protocol"]["transfer"] and out["methods"]["test_scene_shared"]["all"]["n"] == 4
        assert out["protocol"]["references"] == []
        # a model trained on the folder outside the protocol (the bundled student) is shown, marked
        seen = run_protocol(methods=["test_scene_seen", "test_scene_seen_random"], transfer=True, boundary=False, **kw)
        assert seen["protocol"]["references"] == ["test_scene_seen", "test_scene_seen_random"]
        # --no-train: a build that trains nothing (its model lives outside the runs folder) still scores
        outside = save_atomic(SceneSegmenter(SceneModelConfig(**TINY_SCENE)).eval().checkpoint(), tmp_path / "b.pt")
        made.append(register(Method("test_outside", per_fold=False, build=lambda ctx, fold: outside)))
        kw["runs"] = tmp_path / "fresh_runs"
        assert run_protocol(methods=["test_outside"], train=False, boundary=False, **kw)["methods"]["test_outside"]
        json.dumps(out)  # the result is plain JSON
    finally:
        for m in made:
            METHODS.pop(m.name, None)


def test_a_recipe_trains_on_the_extra_images_only_when_it_asks(folders, tmp_path):
    from seglib.data.tiles import FolderBatches
    from seglib.evaluation.loto.methods import FoldContext, _resolved, get_method

    images, _, extra = folders
    tiles = {t: [f"img0{t}", f"img1{t}"] for t in TILES}
    ctx = FoldContext(images=images, runs=tmp_path / "runs", tiles=tiles, extra_images=extra)
    ctx.train_dir = link_training_images(images, extra, ctx.runs, r"t(\d+)$")
    plain = get_method("student_dubai")
    with_extra = register(
        Method("test_dubai_extra", recipe="student_dubai_cpu", teacher="teacher_synthetic", extra_images=True)
    )
    try:
        for method, extras in ((plain, 0), (with_extra, 4)):
            cfg = _resolved(method, ctx, "t1", None)
            names = FolderBatches(cfg.data.data_dir, size=32, exclude=tuple(cfg.data.exclude)).names
            assert not {"img0t1", "img1t1"} & set(names)
            assert {"img0t2", "img1t2"} <= set(names)
            assert sum(n.startswith("extra-") for n in names) == extras
            assert sorted(names) == sorted(train_images(ctx, "t1", method.extra_images))
    finally:
        METHODS.pop("test_dubai_extra", None)
