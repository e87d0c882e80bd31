"""The UC Merced study's methods (experiments/ucmerced): its transfer models never read an image
of the labelled folder, and the protocol knows which of its methods did."""

from __future__ import annotations

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
