"""Leave-one-tile-out protocol: folds are disjoint, every scored image is scored by a model that
never saw its tile, fold models and scores are cached, and the nested choice never looks at the
held-out fold. Image selection by name (``data.include`` / ``data.exclude``) is validated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_labelled_tiles
from PIL import Image

from seglib.evaluation.loto import folds as F
from seglib.evaluation.loto.methods import METHODS, LotoError, Method, register

TILES = ("t1", "t2", "t3")


@pytest.fixture
def labelled_folder(tmp_path):
    """Two synthetic 64 px tiles with masks per source tile (names ``img<i>t<T>``), plus one
    unlabelled image of tile 3 that only training may read."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_labelled_tiles(images, masks, TILES)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(images / "extra9t3.png")
    return images, masks


@pytest.fixture
def tiny_method():
    """A teacher trained in a few steps on each fold's images, and its random-weight twin."""
    recipe = {
        "stage": "teacher",
        "model": {"encoder": {"width": 16, "depth": 1, "embed_dim": 8}},
        "data": {"size": 32, "batch_size": 2},
        "train": {"steps": 3, "warmup": 1, "checkpoint_every": 2},
    }
    made = [
        register(Method("tiny_test", recipe=recipe)),
        register(Method("tiny_test_random", kind="random", random_of="tiny_test")),
    ]
    yield recipe
    for m in made:
        METHODS.pop(m.name, None)


def _run(images, masks, runs, **kw):
    from seglib.evaluation.loto import run_protocol

    return run_protocol(
        images=images,
        masks=masks,
        runs=runs,
        methods=["rgb_kmeans", "tiny_test", "tiny_test_random"],
        ignore=(),
        threads=1,
        log=lambda msg: None,
        **kw,
    )


def test_folds_are_disjoint_and_every_image_is_scored_by_a_model_blind_to_its_tile(
    labelled_folder, tiny_method, tmp_path, one_thread
):
    from seglib.data.tiles import FolderBatches

    images, masks = labelled_folder
    runs = tmp_path / "runs"
    result = _run(images, masks, runs)
    folds = result["protocol"]["folds"]
    assert list(folds) == list(TILES)
    scored = [r["image"] for r in result["per_image"]["tiny_test"]]
    assert sorted(scored) == sorted(f"img{i}{t}" for t in TILES for i in range(2))  # each exactly once
    for method in ("rgb_kmeans", "tiny_test", "tiny_test_random"):
        assert result["methods"][method]["all"]["n"] == 6
    for tile in TILES:
        record = json.loads((runs / "tiny_test" / tile / "loto.json").read_text())
        assert record["done"]
        held = set(record["held_out"])
        assert held == {f"img0{tile}", f"img1{tile}"} | ({"extra9t3"} if tile == "t3" else set())
        assert not held & set(record["train_images"])
        assert set(record["train_images"]) | held == {p.stem for p in images.iterdir()}
        # What the training data source actually reads under the recorded config.
        seen = FolderBatches(images, size=32, exclude=tuple(record["config"]["data"]["exclude"])).names
        assert sorted(seen) == sorted(record["train_images"])
        for row in result["per_image"]["tiny_test"]:
            if row["tile"] == tile:
                assert row["image"] in held and row["image"] not in seen
    # The table has every fold and the paired comparison against the random twin.
    assert "tiny_test - tiny_test_random" in result["comparisons"]
    assert all(0.0 <= r["miou"] <= 1.0 for rows in result["per_image"].values() for r in rows)


def test_fold_models_and_scores_are_cached(labelled_folder, tiny_method, tmp_path, one_thread, monkeypatch):
    import seglib.training.run

    images, masks = labelled_folder
    runs = tmp_path / "runs"
    first = _run(images, masks, runs, folds=["t1", "t2"])
    weights = {t: (runs / "tiny_test" / t / "teacher.pt").read_bytes() for t in ("t1", "t2")}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached fold model was trained again")

    monkeypatch.setattr(seglib.training.run, "run", no_training)
    again = _run(images, masks, runs, folds=["t1", "t2"])
    assert again["per_image"] == first["per_image"]
    # Scores deleted: recomputed from the cached models, to the same numbers.
    (runs / "tiny_test" / "t1" / "scores.json").unlink()
    (runs / "tiny_test_random" / "t2" / "scores.json").unlink()
    assert _run(images, masks, runs, folds=["t1", "t2"])["per_image"] == first["per_image"]
    assert {t: (runs / "tiny_test" / t / "teacher.pt").read_bytes() for t in ("t1", "t2")} == weights
    # A killed run (no teacher.pt, no "done" yet) resumes training instead of reusing it.
    monkeypatch.undo()
    record = runs / "tiny_test" / "t1" / "loto.json"
    state = json.loads(record.read_text())
    state.pop("done")
    record.write_text(json.dumps(state))
    (runs / "tiny_test" / "t1" / "teacher.pt").unlink()
    _run(images, masks, runs, folds=["t1"])
    assert (runs / "tiny_test" / "t1" / "teacher.pt").is_file()
    # The same name with another recipe must not reuse the stale models.
    tiny_method["train"]["steps"] = 4
    with pytest.raises(LotoError, match="another config"):
        _run(images, masks, runs, folds=["t1"])


def test_a_plugin_registers_methods_of_its_own_for_the_command(labelled_folder, tmp_path, capsys):
    """``--plugin FILE`` (or a module name) imports a researcher's module first: its methods are
    listed and run like the shipped ones; a missing plugin is a usage error naming it."""
    from seglib.loto import main

    plugin = tmp_path / "my_methods.py"
    plugin.write_text(
        "from seglib.evaluation.loto import Method, register\n"
        "register(Method('my_kmeans', kind='kmeans', about='mine'))\n"
    )
    images, masks = labelled_folder
    out = tmp_path / "loto.json"
    try:
        assert main(["--plugin", str(plugin), "--list"]) == 0
        assert "my_kmeans" in capsys.readouterr().out
        args = ["--images", str(images), "--masks", str(masks), "--ignore", "", "--runs", str(tmp_path / "r")]
        assert main([*args, "--plugin", str(plugin), "--methods", "my_kmeans", "--out", str(out)]) == 0
        assert json.loads(out.read_text())["methods"]["my_kmeans"]["all"]["n"] == 6
    finally:
        METHODS.pop("my_kmeans", None)
    with pytest.raises(SystemExit) as exc:
        main(["--plugin", str(tmp_path / "missing.py"), "--list"])
    assert exc.value.code == 2 and "missing.py" in capsys.readouterr().err


def test_cli_prints_table_and_rejects_bad_arguments(labelled_folder, tmp_path, capsys):
    from seglib.loto import main

    images, masks = labelled_folder
    out = tmp_path / "loto.json"
    args = ["--images", str(images), "--masks", str(masks), "--ignore", "", "--runs", str(tmp_path / "r")]
    assert main([*args, "--methods", "rgb_kmeans", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rgb_kmeans" in printed and "t3" in printed
    assert json.loads(out.read_text())["methods"]["rgb_kmeans"]["all"]["n"] == 6
    for bad in (["--methods", "nope"], ["--methods", "rgb_kmeans", "--folds", "t9"]):
        with pytest.raises(SystemExit) as exc:
            main([*args, *bad, "--out", str(out)])
        assert exc.value.code == 2
    assert "unknown" in capsys.readouterr().err


def test_nested_choice_never_uses_the_held_out_fold():
    # Method "x" is best on t1 only, "y" on t2 and t3: the choice for t1 must come from t2/t3.
    def rows(scores):
        return [{"image": f"{t}_{i}", "tile": t, "miou": s} for t, s in scores.items() for i in range(2)]

    per_method = {"x": rows({"t1": 0.9, "t2": 0.3, "t3": 0.3}), "y": rows({"t1": 0.2, "t2": 0.5, "t3": 0.5})}
    out = F.nested_choice(per_method)
    assert out["choices"]["t1"]["method"] == "y"  # chosen on t2, t3 where y is better
    assert out["choices"]["t2"]["method"] == "x"  # on t1, t3: x 0.6 against y 0.35
    assert out["nested"] == pytest.approx(np.mean([0.2, 0.3, 0.3]))
    assert out["optimistic_method"] == "x" and out["optimistic"] == pytest.approx(0.5)
    assert out["nested"] < out["optimistic"]


def test_tiles_from_names():
    assert F.tile_of("image_part_003t5") == "t5"
    assert F.tile_of("notes") is None
    groups = F.group_by_tile(["a_t10", "b_t2", "c_t2", "readme"])
    assert groups == {"t2": ["b_t2", "c_t2"], "t10": ["a_t10"]}


def test_include_exclude_select_images_and_reject_typos(tmp_path):
    from seglib.data.select import select_images
    from seglib.data.tiles import load_folder
    from seglib.io.images import ImageReadError
    from seglib.train_distill import build_parser, config_from_args

    for name in ("a_t1", "b_t1", "a_t2"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{name}.png")
    names, _ = load_folder(tmp_path, include=("*t1",))
    assert names == ["a_t1", "b_t1"]
    names, _ = load_folder(tmp_path, include=("*t1",), exclude=("b_*",))
    assert names == ["a_t1"]
    files = sorted(tmp_path.glob("*.png"))
    with pytest.raises(ImageReadError, match="matches no image"):
        select_images(files, include=("*t9",))
    with pytest.raises(ImageReadError, match="leave no image"):
        select_images(files, include=("*t1",), exclude=("*_t1",))
    with pytest.raises(ValueError, match="list of glob patterns"):
        select_images(files, include="*t1")
    cfg = config_from_args(
        build_parser().parse_args(
            ["--data-dir", str(tmp_path), "--set", "data.include=['*t1']", "--set", "data.exclude=['b*']"]
        )
    )
    assert cfg.data.include == ("*t1",) and cfg.data.exclude == ("b*",) and not cfg.data.synthetic


def test_loto_result_reads_the_saved_result_or_recomputes_it(labelled_folder, tmp_path):
    from seglib.evaluation.loto import loto_result
    from seglib.loto import main

    images, masks = labelled_folder
    saved = tmp_path / "saved.json"
    args = ["--images", str(images), "--masks", str(masks), "--ignore", "", "--runs", str(tmp_path / "r")]
    assert main([*args, "--methods", "rgb_kmeans", "--out", str(saved)]) == 0
    assert loto_result(saved) == json.loads(saved.read_text())
    with pytest.raises(FileNotFoundError, match="python -m seglib.loto"):
        loto_result(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="images/ and masks/"):
        loto_result(saved, recompute=True)
    # a recomputation runs the saved result's methods on the data and writes where it is told
    out = tmp_path / "again.json"
    again = loto_result(saved, recompute=True, data=images.parent, runs=tmp_path / "r", out=out)
    assert list(again["methods"]) == ["rgb_kmeans"] and json.loads(out.read_text())["methods"].keys() == {"rgb_kmeans"}
    assert again["methods"]["rgb_kmeans"]["all"]["miou"] == pytest.approx(
        json.loads(saved.read_text())["methods"]["rgb_kmeans"]["all"]["miou"]
    )
