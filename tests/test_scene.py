"""Scene folders, the scene model, its pretraining (resume bit for bit) and the representation probe."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglib.checkpoint import CheckpointError, save_atomic
from seglib.data.scenes import load_scenes, random_crops
from seglib.evaluation.probe import cross_validate, knn_predict, linear_predict, probe_features, stratified_splits
from seglib.io.images import ImageReadError
from seglib.models import load_model, random_init_like
from seglib.models.scene import SceneModelConfig, SceneSegmenter, calibrate_batchnorm
from seglib.training.scene import ScenePretrainConfig, pretrain

TINY = {"widths": (8, 8, 16, 16), "depths": (1, 1, 1, 1)}


def _scene(kind: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Three textures a small CNN tells apart: noise, stripes, a checkerboard (random colours)."""
    yy, xx = np.mgrid[:size, :size]
    if kind == 0:
        pattern = rng.random((size, size))
    elif kind == 1:
        pattern = ((xx + rng.integers(8)) // 4 % 2).astype(float)
    else:
        pattern = ((xx // 6 + yy // 6) % 2).astype(float)
    colour = rng.uniform(0.2, 0.8, 3)
    return (np.clip(pattern[..., None] * 0.5 + colour * 0.5, 0, 1) * 255).astype(np.uint8)


def make_scene_folder(root: Path, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for kind, name in enumerate(("noise", "stripes", "checker")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_scene(kind, rng)).save(root / name / f"{name}{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    return make_scene_folder(tmp_path_factory.mktemp("scenes") / "images")


def test_folds_are_stratified_by_name_order(scene_dir):
    scenes = load_scenes(scene_dir.parent)  # the images/ level is looked through
    assert scenes.classes == ["checker", "noise", "stripes"]
    assert len(scenes) == 30
    for c in range(3):
        folds = scenes.folds[scenes.labels == c]
        assert folds.tolist() == [i % 5 for i in range(10)]  # i-th image of a class -> fold i % 5
    held = scenes.fold(0)
    assert set(held.folds.tolist()) == {0} and len(held) == 6
    assert 0 not in scenes.without_fold(0).folds


def test_scene_folder_refuses_a_flat_folder(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="one sub-folder per"):
        load_scenes(tmp_path)


def test_random_crops_zoom_and_determinism():
    img = np.arange(200 * 160 * 3, dtype=np.uint32).reshape(200, 160, 3).astype(np.uint8)
    x, boxes = random_crops([img] * 16, np.random.default_rng(3), size=32, zoom=(0.25, 0.5), jitter=0.0)
    assert x.shape == (16, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    sides = boxes[:, 2]
    assert (sides >= 64).all() and (sides <= 128).all()  # side = size / zoom for zoom in [0.25, 0.5]
    assert (boxes[:, 0] + sides <= 200).all() and (boxes[:, 1] + sides <= 160).all()
    again, _ = random_crops([img] * 16, np.random.default_rng(3), size=32, zoom=(0.25, 0.5), jitter=0.0)
    assert torch.equal(x, again)
    # a zoom the image cannot give is clipped to the whole shorter side
    _, wide = random_crops([img], np.random.default_rng(0), size=32, zoom=(0.1, 0.1))
    assert wide[0, 2] == 160


def test_scene_segmenter_contract_and_checkpoint(tmp_path):
    torch.manual_seed(1)  # random_init_like draws seed 0
    model = SceneSegmenter(SceneModelConfig(**TINY, classes=3, levels={"s8": 1.0, "cls": 0.5})).eval()
    x = torch.rand(2, 3, 64, 96)
    out = model(x, 4)
    assert out["probs"].shape == (2, 4, 64, 96)
    assert torch.allclose(out["probs"].sum(1), torch.ones(2, 64, 96), atol=1e-5)
    assert out["embeddings"].shape[1] == model.embed_dim  # 16 (s8) + 3 classes + 3 colour
    path = save_atomic(model.checkpoint(), tmp_path / "scene.pt")
    loaded = load_model(path)
    assert isinstance(loaded, SceneSegmenter)
    assert torch.equal(loaded(x, 4)["probs"], out["probs"])
    twin = random_init_like(loaded)
    assert twin.config == loaded.config and not torch.equal(
        twin.cnn.stages[0][0][0].weight, model.cnn.stages[0][0][0].weight
    )
    other = model.with_settings(levels={"s4": 1.0}, size_prior=0.0)
    assert other.config.head.size_prior == 0.0 and torch.equal(other.cnn.fc.weight, model.cnn.fc.weight)
    with pytest.raises(ValueError, match="levels"):
        model.with_settings(levels={"s32": 1.0})


def test_calibrate_batchnorm_matches_the_data():
    torch.manual_seed(0)
    model = SceneSegmenter(SceneModelConfig(**TINY, classes=3))
    batches = [torch.rand(4, 3, 32, 32) * 0.5 + 0.25 for _ in range(3)]
    calibrate_batchnorm(model.cnn, batches)
    bn = model.cnn.stages[0][0][1]
    with torch.no_grad():
        conv = model.cnn.stages[0][0][0]((torch.cat(batches) - 0.5) / 0.25)
    assert torch.allclose(bn.running_mean, conv.mean((0, 2, 3)), atol=1e-5)
    assert not model.cnn.training


def _cfg(scene_dir, out, **over):
    base = dict(data_dir=str(scene_dir), out_dir=str(out), steps=4, batch=6, size=32, zoom=(0.5, 1.0), **TINY)
    return ScenePretrainConfig(**{**base, "checkpoint_every": 2, "eval_every": 2, **over})


def test_pretrain_resumes_bit_for_bit(scene_dir, tmp_path):
    straight = pretrain(_cfg(scene_dir, tmp_path / "a"))

    def killed(step, loss):
        if step == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(scene_dir, tmp_path / "b"), progress=killed)
    assert not (tmp_path / "b" / "scene.pt").exists()
    at_step_2 = load_model(tmp_path / "b" / "state.pt")  # a killed run's last state is a model too
    assert isinstance(at_step_2, SceneSegmenter) and not at_step_2.training
    resumed = pretrain(_cfg(scene_dir, tmp_path / "b"))
    a, b = load_model(straight["model"]), load_model(resumed["model"])
    for (name, p), q in zip(a.cnn.state_dict().items(), b.cnn.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert straight["history"] == resumed["history"]
    with pytest.raises(CheckpointError, match="other settings"):
        pretrain(_cfg(scene_dir, tmp_path / "b", lr=1e-3))


def test_pretrain_never_reads_the_holdout_fold(scene_dir, tmp_path, monkeypatch):
    import seglib.training.scene as scene_training

    scenes = load_scenes(scene_dir)
    held = {id(img) for img, f in zip(scenes.images, scenes.folds, strict=True) if f == 1}
    seen = []
    real = scene_training.random_crops

    def spy(images, rng, **kw):
        seen.extend(id(img) for img in images)
        return real(images, rng, **kw)

    monkeypatch.setattr(scene_training, "random_crops", spy)
    pretrain(_cfg(scene_dir, tmp_path / "h", holdout=1, steps=6), scenes=scenes)
    assert seen and not held & set(seen)


@pytest.mark.numeric
def test_probe_beats_chance_on_separable_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    centres = rng.normal(size=(4, 12)) * 3
    features = centres[labels] + rng.normal(size=(60, 12))
    noise = rng.normal(size=(60, 12))
    good = probe_features({"x": features}, labels, k=5)["x"]
    assert good["knn"]["mean"] > 0.9 and good["linear"]["mean"] > 0.9
    bad = cross_validate(noise, labels, lambda a, b, c: knn_predict(a, b, c, k=5))
    assert bad["mean"] < 0.5  # chance is 0.25
    assert np.bincount(stratified_splits(labels), minlength=5).tolist() == [12] * 5
    pred = linear_predict(features[:40], labels[:40], features[40:])
    assert pred.shape == (20,)


def _two_class_folder(root, per_class: int = 100, same: bool = False):
    """Stripes against noise (``same``: noise in both folders, so the class names mean nothing)."""
    rng = np.random.default_rng(5)
    for c, name in enumerate(("a_class", "b_class")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_scene(0 if same else c, rng)).save(root / name / f"{name}{i:02d}.png")
    return root


def _probe(tmp_path, data, model_path, fold: int = 0) -> dict:
    from seglib.probe import main

    out = tmp_path / f"probe_{data.name}_{fold}.json"
    assert (
        main(
            [
                "--data",
                str(data),
                "--model",
                f"m={model_path}",
                "--fold",
                str(fold),
                "--size",
                "48",
                "--k",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


@pytest.mark.numeric
def test_probe_command_separates_an_easy_two_class_set(tmp_path, one_thread):
    """End to end through ``python -m seglib.probe``: pooled features of a scene model at random
    weights tell stripes from noise, and do not on a set whose two folders hold the same kind."""
    torch.manual_seed(0)
    path = save_atomic(SceneSegmenter(SceneModelConfig(**TINY, classes=2)).eval().checkpoint(), tmp_path / "r.pt")
    easy = _probe(tmp_path, _two_class_folder(tmp_path / "easy"), path)
    meaningless = _probe(tmp_path, _two_class_folder(tmp_path / "same", same=True), path)
    assert easy["images"] == 40 and easy["chance"] == 0.5  # fold 0: 20 of each class's 100
    accuracies = lambda r: [s[p]["mean"] for s in r["models"]["m"]["levels"].values() for p in ("knn", "linear")]  # noqa: E731
    assert min(accuracies(easy)) >= 0.8  # every map, both probes (measured 0.85-0.97)
    assert max(accuracies(meaningless)) <= 0.7  # chance 0.5 (measured 0.30-0.55)


def test_the_probe_scores_only_the_fold_pretraining_never_read(scene_dir, tmp_path, monkeypatch, one_thread):
    """``python -m seglib.pretrain --holdout 1`` and ``python -m seglib.probe --fold 1`` agree on
    the unseen scenes without sharing state: the probe reads exactly fold 1, class-stratified,
    and training drew none of them."""
    import seglib.training.scene as scene_training
    from seglib.pretrain import main as pretrain_main

    seen: list[str] = []
    real = scene_training.random_crops
    scenes = load_scenes(scene_dir)
    name_of = {img.tobytes(): name for img, name in zip(scenes.images, scenes.names, strict=True)}

    def spy(images, rng, **kw):
        seen.extend(name_of[img.tobytes()] for img in images)
        return real(images, rng, **kw)

    monkeypatch.setattr(scene_training, "random_crops", spy)
    out = tmp_path / "run"
    args = ["--data", str(scene_dir), "--out", str(out), "--holdout", "1", "--steps", "6", "--batch", "6"]
    args += ["--size", "32", "--widths", "8,8,16,16", "--depths", "1,1,1,1", "--checkpoint-every", "3"]
    assert pretrain_main(args) == 0
    probed = _probe(tmp_path, scene_dir, out / "scene.pt", fold=1)
    assert sorted(probed["names"]) == sorted(scenes.fold(1).names)
    assert (
        len(probed["names"]) == 6
        and sorted(n.split("/")[0] for n in probed["names"]) == ["checker"] * 2 + ["noise"] * 2 + ["stripes"] * 2
    )
    assert seen and not set(seen) & set(probed["names"])
    assert set(seen) <= set(scenes.without_fold(1).names)


def test_commands_refuse_bad_scene_input_with_a_message(tmp_path, capsys):
    from seglib.pretrain import main as pretrain_main
    from seglib.probe import main as probe_main

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    assert pretrain_main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "one sub-folder per" in capsys.readouterr().err
    folder = make_scene_folder(tmp_path / "scenes", per_class=5)
    assert probe_main(["--data", str(folder), "--model", "m=bundled", "--fold", "7"]) == 2
    assert "--fold 7" in capsys.readouterr().err
    assert probe_main(["--data", str(folder), "--model", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


UCM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucmerced_landuse"


@pytest.mark.slow
@pytest.mark.skipif(not UCM.is_dir(), reason="../shared/data/ucmerced_landuse is not beside the repository")
def test_uc_merced_reads_as_21_classes_in_five_stratified_folds():
    scenes = load_scenes(UCM)
    assert len(scenes) == 2100 and len(scenes.classes) == 21
    assert np.bincount(scenes.labels).tolist() == [100] * 21
    for f in range(5):
        assert np.bincount(scenes.labels[scenes.folds == f], minlength=21).tolist() == [20] * 21
    assert min(min(img.shape[:2]) for img in scenes.images) >= 240


def test_zoom_resizes_what_the_cnn_reads_not_the_grid_the_head_clusters(monkeypatch):
    torch.manual_seed(2)
    config = SceneModelConfig(**TINY, classes=3, levels={"s8": 1.0, "cls": 0.5}, downsample=1)
    model = SceneSegmenter(config).eval()
    x = torch.rand(1, 3, 64, 96)
    same = model.with_settings(zoom=1.0)
    assert torch.equal(same(x, 3)["probs"], model(x, 3)["probs"])  # zoom 1: the model as it was
    seen = []
    monkeypatch.setattr(model.cnn, "pyramid", lambda rgb, f=model.cnn.pyramid: seen.append(rgb.shape) or f(rgb))
    for zoom, read in ((2.0, (128, 192)), (1.5, (96, 144)), (0.5, (32, 48))):
        model.zoom = zoom  # what a protocol's Method.attrs sets
        out = model(x, 3)
        assert seen[-1][-2:] == read  # the CNN read the image resized by the zoom ...
        assert out["probs"].shape == (1, 3, 64, 96)  # ... labels and head keep the image's grid
        assert out["features"].shape[-2:] == (16, 24) and torch.isfinite(out["features"]).all()
    assert not torch.equal(out["features"], same(x, 3)["features"])
    with pytest.raises(ValueError, match="zoom"):
        model.with_settings(zoom=0.0)
