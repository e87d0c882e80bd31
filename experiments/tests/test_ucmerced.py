"""The UC Merced study's methods (experiments/ucmerced): its transfer models never read an image
of the labelled folder, and the protocol knows which of its methods did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglib.evaluation.loto.methods import FoldContext, LotoError, get_method, is_reference, trains_on_folder

TINY = {"steps": 2, "batch": 6, "size": 32, "widths": (8, 8, 16, 16), "depths": (1, 1, 1, 1), "checkpoint_every": 1}


@pytest.fixture
def context(tmp_path):
    """A labelled folder whose images cannot be read (any read fails loudly) and a scene folder
    of three classes x 20 readable scenes as the run's extra images."""
    images = tmp_path / "dubai" / "images"
    images.mkdir(parents=True)
    for tile in ("t1", "t2"):
        for i in range(2):
            (images / f"img{i}{tile}.png").write_bytes(b"not an image: a transfer model must not read it")
    scenes = tmp_path / "ucm" / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("forest", "harbor", "runway")):
        (scenes / name).mkdir(parents=True)
        for i in range(20):
            rgb = (rng.random((48, 48, 3)) * (60 + 60 * c)).astype(np.uint8)
            Image.fromarray(rgb).save(scenes / name / f"{name}{i:02d}.png")
    tiles = {"t1": ["img0t1", "img1t1"], "t2": ["img0t2", "img1t2"]}
    return FoldContext(
        images=images, runs=tmp_path / "runs", tiles=tiles, extra_images=scenes.parent, log=lambda m: None
    )


def test_the_transfer_models_train_on_the_scene_folder_alone(context):
    from experiments.ucmerced import methods as ucm
    from seglib.models import load_model
    from seglib.models.scene import SceneSegmenter

    context.train = False  # --no-train: nothing is trained, the missing model is named
    with pytest.raises(LotoError, match="training is off"):
        ucm._random_build(context, "shared")
    with pytest.raises(LotoError, match="training is off"):
        ucm._pretrain_build("test_scene_tiny", TINY)(context, "shared")
    context.train = True
    trained = ucm._pretrain_build("test_scene_tiny", TINY)(context, "shared")
    random_twin = ucm._random_build(context, "shared")
    for path in (trained, random_twin):
        assert isinstance(load_model(path), SceneSegmenter)
    a, b = load_model(trained).cnn.stages[0][0][0].weight, load_model(random_twin).cnn.stages[0][0][0].weight
    assert not torch.equal(a, b)


def test_the_protocol_knows_which_study_methods_saw_the_labelled_folder():
    import experiments.ucmerced.methods  # noqa: F401  (registers the study's methods)

    names = ["scene", "scene_random", "scene_L816", "scene_1x_s1", "scene_coarse", "teacher_ucm", "student_ucm"]
    for name in names:
        assert not trains_on_folder(get_method(name)), name  # valid in a transfer run
    for name in ("scene_bn", "scene_bn_L8", "student_dubai_ucm", "student_cluster_ucm"):
        assert trains_on_folder(get_method(name)) and not is_reference(get_method(name)), name  # refused
    for name in ("bundled", "bundled_random"):
        assert trains_on_folder(get_method(name)) and is_reference(get_method(name)), name  # shown, marked


RESULTS = Path(__file__).resolve().parents[1] / "ucmerced"


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json") if "per_image" in p.read_text()))
def test_committed_protocol_results_score_each_image_once_and_transfer_only_unseen_models(name):
    """The committed transfer and leave-one-tile-out results of the study (docs/protocols.md):
    every method scores the same images once each, in its own tile's fold, the pooled mean is
    their mean, and a transfer result holds no method that trained on the labelled folder
    except the references it lists."""
    import experiments.ucmerced.methods  # noqa: F401  (registers the study's methods)
    from seglib.evaluation.loto import folds as F

    result = json.loads((RESULTS / name).read_text())
    owner = {image: fold for fold, images in result["protocol"]["folds"].items() for image in images}
    scored = {r["image"] for r in result["per_image"]["rgb_kmeans"]}
    assert scored <= owner.keys()
    for method, rows in result["per_image"].items():
        assert sorted(r["image"] for r in rows) == sorted(scored), method
        assert all(owner[r["image"]] == r["tile"] == F.tile_of(r["image"]) for r in rows), method
        assert result["methods"][method]["all"]["miou"] == pytest.approx(np.mean([r["miou"] for r in rows]))
    if result["protocol"].get("transfer"):
        for method in result["methods"]:
            m = get_method(method)
            assert not trains_on_folder(m) or is_reference(m), f"{method} trained on the scored folder"


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("probe*.json")))
def test_committed_probe_results_read_only_the_held_out_fold(name):
    """The probe read fold 0 alone (the fold scene-class pretraining leaves out): 420 scenes, and
    where the JSON lists them, 20 of each of the 21 classes, the 1st, 6th, 11th ... of each
    class in file-name order."""
    result = json.loads((RESULTS / name).read_text())
    assert result["fold"] == 0 and result["images"] == 420 and result["chance"] == pytest.approx(1 / 21)
    if "names" not in result:  # written before the probe listed the scenes it read
        return
    assert len(result["names"]) == 420
    by_class: dict[str, list[str]] = {}
    for n in result["names"]:
        by_class.setdefault(n.split("/")[0], []).append(n.split("/")[1])
    assert len(by_class) == 21 and all(len(v) == 20 for v in by_class.values())
    for cls, files in by_class.items():  # UC Merced's files are <class>00 ... <class>99
        assert sorted(int(f[len(cls) : -4]) for f in files) == list(range(0, 100, 5)), cls
