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


def _tiny_methods(context):
    """A tiny scene model and its random twin registered as protocol methods (trained now)."""
    from experiments.ucmerced import methods as ucm
    from seglib.evaluation.loto import Method, register

    register(Method("test_tiny", per_fold=False, build=ucm._pretrain_build("test_scene_tiny", TINY)))
    register(Method("test_tiny_random", per_fold=False, build=ucm._random_build))
    return context


def test_zoom_methods_label_the_whole_tile_and_zoom_1_is_the_model_itself(context):
    """The scale-matching methods: the study's candidates are the scene models with only the zoom
    (and colour weight) changed; a zoomed model labels every pixel of an odd-sized tile, and at
    zoom 1 it gives the unzoomed model's labels exactly."""
    from experiments.ucmerced import methods as ucm
    from seglib.evaluation.loto import Method, register
    from seglib.evaluation.loto.methods import fold_model
    from seglib.inference.predictor import Predictor

    for base in ("scene", "scene_random"):
        for tag, zoom in ucm.ZOOMS.items():
            assert get_method(f"{base}_{tag}").eval_of == base and get_method(f"{base}_{tag}").attrs == {"zoom": zoom}
            assert get_method(f"{base}_{tag}_c2").attrs == {"zoom": zoom, "colour_weight": 2.0}
    _tiny_methods(context)
    rgb = np.random.default_rng(0).random((70, 90, 3)).astype(np.float32)
    labels = {}
    for zoom in (1.0, 0.5, 1.5, 3.0):
        register(Method(f"test_tiny_zoom{zoom}", eval_of="test_tiny", per_fold=False, attrs={"zoom": zoom}))
        model = fold_model(get_method(f"test_tiny_zoom{zoom}"), context, "t1")
        assert model.zoom == zoom
        labels[zoom] = Predictor.of(model, 3).labels(rgb)
        assert labels[zoom].shape == (70, 90) and set(np.unique(labels[zoom])) <= {0, 1, 2}
    plain = Predictor.of(fold_model(get_method("test_tiny"), context, "t1"), 3).labels(rgb)
    assert np.array_equal(labels[1.0], plain)
    assert not np.array_equal(labels[3.0], plain)


def test_a_fusion_is_its_two_models_and_refuses_a_changed_part(context, tmp_path):
    """weight 0 is the scene model alone; weight 1 adds the other model's channels, scored
    beside them; the random twin draws the other model's weights afresh; a part whose file
    changed after the fusion was written is refused."""
    from experiments.ucmerced import methods as ucm
    from experiments.ucmerced.fusion import FusedSegmenter
    from seglib.checkpoint import CheckpointError
    from seglib.models import load_model, random_init_like

    _tiny_methods(context)
    fused_path = ucm._fusion_build("test_fuse", "test_tiny", "test_tiny_random")(context, "shared")
    twin_path = ucm._fusion_build("test_fuse_random", "test_tiny_random", "test_tiny", random=True)(context, "shared")
    fused, twin = load_model(fused_path), load_model(twin_path)
    assert isinstance(fused, FusedSegmenter)
    scene = load_model(context.runs / "test_scene_tiny" / "shared" / "scene.pt")
    x = torch.rand(1, 3, 64, 64)
    alone = scene.features(x)
    both = fused.features(x)
    extra = fused.other.features(x).shape[1]  # the random twin's full-size scene network
    assert both.shape[1] == alone.shape[1] + extra and torch.equal(both[:, : alone.shape[1]], alone)
    fused.weight = 0.0
    assert torch.equal(fused(x, 3)["probs"], scene(x, 3)["probs"])
    random_part = load_model(context.runs / "scene_random" / "shared" / "scene.pt").cnn.stages[0][0][0].weight
    assert torch.equal(twin.scene.cnn.stages[0][0][0].weight, random_part)
    drawn = twin.other.cnn.stages[0][0][0].weight  # the tiny trained model's weights drawn afresh (seed 0)
    assert drawn.shape == scene.cnn.stages[0][0][0].weight.shape
    assert not torch.equal(drawn, scene.cnn.stages[0][0][0].weight)
    assert torch.equal(drawn, random_init_like(scene).cnn.stages[0][0][0].weight)
    # the part changes: the fusion is refused until written again
    part = context.runs / "scene_random" / "shared" / "scene.pt"
    state = torch.load(part, weights_only=True)
    state["note"] = "changed"
    torch.save(state, part)
    with pytest.raises(CheckpointError, match="changed"):
        load_model(fused_path)
    load_model(ucm._fusion_build("test_fuse", "test_tiny", "test_tiny_random")(context, "shared"))


def test_the_dense_loss_rewards_projections_that_keep_the_maps_correspondences():
    from experiments.ucmerced.dense import stego_loss

    torch.manual_seed(0)
    f = torch.randn(6, 8, 40)
    partner = {"self": torch.arange(6), "knn": torch.roll(torch.arange(6), 1), "random": torch.roll(torch.arange(6), 3)}
    faithful, _ = stego_loss(f, f.clone(), partner)
    scrambled, _ = stego_loss(f, f[..., torch.randperm(40)], partner)
    constant, _ = stego_loss(f, torch.ones(6, 8, 40), partner)  # everything alike: no information
    assert faithful < scrambled and faithful < constant


def test_the_dense_head_trains_on_scenes_alone_and_labels_whole_tiles(context):
    """The dense method reads only the scene folder (the labelled images are unreadable here), its
    checkpoint loads as a segmenter over the frozen scene model, and a changed scene model is refused."""
    from experiments.ucmerced import methods as ucm
    from experiments.ucmerced.dense import ProjectedSegmenter
    from seglib.checkpoint import CheckpointError
    from seglib.evaluation.loto import Method, register
    from seglib.evaluation.loto.methods import fold_model
    from seglib.inference.predictor import Predictor
    from seglib.models import load_model

    _tiny_methods(context)
    build = ucm._dense_build("test_dense", "test_tiny", {"steps": 3, "batch": 6, "size": 32, "samples": 16, "dim": 8})
    register(Method("test_dense", per_fold=False, build=build))
    register(Method("test_dense_mix1", eval_of="test_dense", per_fold=False, attrs={"mix": 1.0}))
    model = fold_model(get_method("test_dense"), context, "t1")
    assert isinstance(model, ProjectedSegmenter) and model.mix == 0.0
    rgb = np.random.default_rng(0).random((40, 56, 3)).astype(np.float32)
    assert Predictor.of(model, 3).labels(rgb).shape == (40, 56)
    mixed = fold_model(get_method("test_dense_mix1"), context, "t1")
    x = torch.rand(1, 3, 64, 64)
    assert mixed.features(x).shape[1] == model.features(x).shape[1] + model.scene.features(x).shape[1]
    state = load_model(context.runs / "test_scene_tiny" / "shared" / "scene.pt")
    untrained = load_model(context.runs / "test_dense" / "shared" / "projected.pt")
    assert untrained.scene.cnn.stages[0][0][0].weight.equal(state.cnn.stages[0][0][0].weight)
    part = context.runs / "test_scene_tiny" / "shared" / "scene.pt"
    saved = torch.load(part, weights_only=True)
    saved["note"] = "changed"
    torch.save(saved, part)
    with pytest.raises(CheckpointError, match="changed"):
        load_model(context.runs / "test_dense" / "shared" / "projected.pt")


def test_the_pixel_probe_reads_each_cells_centre_and_scores_the_classes_present():
    from experiments.ucmerced.pixel_probe import cell_labels, image_miou

    gt = np.zeros((16, 24), np.uint8)
    gt[4, 4], gt[4, 12], gt[12, 20] = 1, 2, 255  # the centres of cells (0, 0), (0, 1), (1, 2) of side 8
    assert cell_labels(gt, (2, 3), 8).tolist() == [1, 2, 0, 0, 0, 255]
    truth = np.array([0, 0, 1, 1, 5, 255])
    assert image_miou(truth, truth) == 1.0
    assert image_miou(np.array([0, 0, 1, 0, 3, 3]), truth) == pytest.approx((2 / 3 + 1 / 2) / 2)  # 5, 255 ignored
    assert image_miou(np.zeros(3, int), np.array([1, 5, 5])) is None  # one class: not scored
