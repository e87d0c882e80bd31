"""The Python API (``seglib.segment``, ``seglib.load_model``) and the ``seglib.predict`` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

import seglib
from seglib import models, paths
from seglib.data.synthetic import make_tile
from seglib.inference import api, engine

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 2700000.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_teacher_model):
    return tiny_teacher_model


@pytest.fixture(scope="module")
def checkpoint(tiny_teacher_checkpoint):
    return tiny_teacher_checkpoint


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rgb = make_tile(-(-max(h, w) // 4) * 4, seed=seed).rgb[:h, :w]
    return (rgb * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- Python API


@pytest.mark.parametrize("h,w", [(37, 53), (64, 64), (5, 200)])
def test_segment_any_size_gives_labels_and_normalised_probs(model, h, w):
    labels, probs = seglib.segment(image(h, w), 4, model, return_probs=True)
    assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < 4
    assert probs.shape == (4, h, w) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_uint8_and_float_inputs_agree(model):
    rgb = image(48, 40, seed=1)
    np.testing.assert_array_equal(seglib.segment(rgb, 3, model), seglib.segment(rgb.astype(np.float32) / 255, 3, model))


def test_large_image_goes_through_the_windowed_path(model, monkeypatch):
    calls = []
    original = engine.segment_source
    monkeypatch.setattr(
        engine, "segment_source", lambda *a, **kw: calls.append(kw["tiling"].tile) or original(*a, **kw)
    )
    labels, probs = seglib.segment(image(150, 210, seed=2), 5, model, tile=64, overlap=16, return_probs=True)
    assert calls == [64]
    assert labels.shape == (150, 210) and labels.max() < 5
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_lane_choice_is_passed_and_checked(model):
    rgb = image(32, 32)
    none = seglib.segment(rgb, 3, model, lane="none", return_probs=True)[1]
    fast = seglib.segment(rgb, 3, model, lane="fast", return_probs=True)[1]
    assert not np.allclose(none, fast)  # the lanes really differ
    with pytest.raises(ValueError, match="lane"):
        seglib.segment(rgb, 3, model, lane="blur")


def test_load_model_restores_the_same_model(model, checkpoint):
    loaded = seglib.load_model(checkpoint)
    rgb = image(32, 48, seed=3)
    np.testing.assert_array_equal(seglib.segment(rgb, 4, loaded), seglib.segment(rgb, 4, model))
    assert not loaded.training


def test_missing_bundled_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "BUNDLED_MODEL", tmp_path / "default_student.pt")
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        seglib.load_model()
    assert seglib.segment is api.segment and seglib.load_model is api.load_model is models.load_model


@pytest.mark.numeric
def test_bundled_model_is_the_distilled_student_and_beats_rgb_kmeans_on_the_samples():
    """The shipped weights load without arguments and score what experiments/LOG.md reports on the
    three sample tiles (numbers produced by this test's code when the weights were committed)."""
    from seglib.data.tiles import load_labelled_folder
    from seglib.evaluation.scores import evaluate_tiles
    from seglib.models.student import StudentSegmenter
    from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS

    model = seglib.load_model()
    assert isinstance(model, StudentSegmenter) and not model.training
    assert paths.bundled_model_path().stat().st_size < 5e6  # "a few MB"
    names, tiles = load_labelled_folder(SAMPLE_IMAGES, SAMPLE_MASKS)
    result = evaluate_tiles(model, tiles, k="present", ignore=(5, 255), names=names)
    assert result["model"]["n_images"] == 3
    assert result["model"]["miou"] == pytest.approx(0.4090, abs=1e-3)
    assert result["rgb_kmeans"]["miou"] == pytest.approx(0.3989, abs=1e-3)


# ----------------------------------------------------------------------------- CLI


def test_cli_without_checkpoint_uses_the_bundled_model(tmp_path):
    from seglib.paths import SAMPLE_IMAGES

    source = sorted(SAMPLE_IMAGES.iterdir())[0]
    run = run_cli("--input", str(source), "--k", "5", "--output", str(tmp_path), "--threads", "1")
    assert run.returncode == 0, run.stderr
    labels = np.asarray(Image.open(tmp_path / f"{source.stem}.png"))
    assert labels.shape == np.asarray(Image.open(source)).shape[:2]
    assert len(np.unique(labels)) == 5


@pytest.mark.numeric
def test_eval_cli_scores_the_bundled_model_beside_rgb_kmeans_with_its_own_head_settings(tmp_path):
    """``python -m seglib.eval`` on the sample tiles by the data README's convention: the
    bundled model with the head settings stored in it (1 iteration, size prior 3), the same
    model with ``--iters 3`` and with ``--size-prior 0``, and RGB k-means in the same run; the
    JSON report says which head settings gave the number."""

    from seglib.eval import main as eval_main
    from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS

    reports = {}
    for name, extra in (("stored", []), ("three", ["--iters", "3"]), ("no_prior", ["--size-prior", "0"])):
        out = tmp_path / f"eval_{name}.json"
        argv = ["--images", str(SAMPLE_IMAGES), "--masks", str(SAMPLE_MASKS), "--k", "present"]
        argv += ["--ignore", "5,255", "--no-random-init", "--threads", "1", "--out", str(out)]
        assert eval_main(argv + extra) == 0
        reports[name] = json.loads(out.read_text())
    stored, three, no_prior = reports["stored"], reports["three"], reports["no_prior"]
    assert (stored["head_iters"], stored["size_prior"]) == (1, 3.0)
    assert (three["head_iters"], three["size_prior"]) == (3, 3.0)
    assert (no_prior["head_iters"], no_prior["size_prior"]) == (1, 0.0)
    assert stored["n_images"] == 3 and stored["skipped"] == []
    assert stored["model"]["miou"] == pytest.approx(0.4090, abs=1e-3)  # as the Python API test
    # The same weights without the prior: the number this test pinned before the prior existed.
    assert no_prior["model"]["miou"] == pytest.approx(0.4382, abs=1e-3)
    assert stored["model"]["miou"] != three["model"]["miou"]  # the overrides reached the head
    assert stored["rgb_kmeans"] == three["rgb_kmeans"] == no_prior["rgb_kmeans"]  # the baseline ignores them
    gap = stored["model"]["miou"] - stored["rgb_kmeans"]["miou"]
    assert stored["model_minus_rgb_kmeans"] == pytest.approx(gap, abs=1e-4)


def test_eval_cli_rejects_bad_arguments_and_paths_in_one_line(tmp_path, capsys):
    from seglib.eval import main as eval_main
    from seglib.paths import SAMPLE_IMAGES

    for argv, message in [
        (["--synthetic", "--iters", "-1"], "--iters must be 0 or more"),
        (["--synthetic", "--size-prior", "-1"], "--size-prior must be 0 or more"),
        (["--synthetic", "--k", "17"], "--k: K must be in 2..16"),
        (["--images", str(SAMPLE_IMAGES)], "--images without --masks has no classes to count"),
        (["--images", str(SAMPLE_IMAGES), "--k", "4", "--k-sweep"], "--k-sweep scores against ground truth"),
        (["--synthetic", "--compare", "random_init"], "--compare random_init: a reserved name"),
        (["--synthetic", "--compare", "bundled", "--compare", "bundled"], "the same model named twice"),
    ]:
        with pytest.raises(SystemExit) as exc:
            eval_main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    missing = tmp_path / "no_masks"
    assert eval_main(["--images", str(SAMPLE_IMAGES), "--masks", str(missing), "--no-model"]) == 2
    assert capsys.readouterr().err.strip() == f"error: mask folder not found: {missing}"
    assert eval_main(["--synthetic", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: checkpoint not found")
    assert eval_main(["--synthetic", "--compare", str(tmp_path / "other.pt")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: checkpoint not found")


def test_eval_cli_compares_models_on_the_same_images_and_scores_folders_without_masks(
    tmp_path, tiny_teacher_checkpoint
):
    """--compare scores another model in the same run (its numbers equal a run of its own); a
    folder without masks gets the label-free proxies of every method at a fixed K."""
    from seglib.eval import main as eval_main
    from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS

    common = ["--images", str(SAMPLE_IMAGES), "--max-side", "128", "--threads", "1"]
    labelled = [*common, "--masks", str(SAMPLE_MASKS), "--ignore", "5,255"]
    out = {name: tmp_path / f"{name}.json" for name in ("both", "alone", "proxies")}
    assert eval_main([*labelled, "--checkpoint", str(tiny_teacher_checkpoint), "--compare", "bundled",
                      "--out", str(out["both"])]) == 0  # fmt: skip
    assert eval_main([*labelled, "--out", str(out["alone"])]) == 0  # the bundled model on its own
    both, alone = (json.loads(out[name].read_text()) for name in ("both", "alone"))
    assert both["bundled"]["miou"] == pytest.approx(alone["model"]["miou"])
    assert both["model_minus_bundled"] == pytest.approx(both["model"]["miou"] - alone["model"]["miou"], abs=2e-4)
    assert both["rgb_kmeans"] == alone["rgb_kmeans"]
    assert eval_main([*common, "--k", "4", "--compare", "bundled", "--out", str(out["proxies"])]) == 0
    proxies = json.loads(out["proxies"].read_text())
    for method in ("model", "random_init", "rgb_kmeans", "bundled"):
        assert "miou" not in proxies[method] and 0 <= proxies[method]["view_agreement"] <= 1, method
    assert {row["k"] for row in proxies["per_image"]} == {4}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "seglib.predict", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_help_documents_every_flag():
    out = run_cli("--help")
    assert out.returncode == 0
    for flag in ("--input", "--k", "--output", "--checkpoint", "--tile", "--overlap", "--lane",
                 "--preview", "--device", "--fit-windows", "--seed", "--threads", "--quiet"):  # fmt: skip
        assert flag in out.stdout, flag
    assert "--smooth" not in out.stdout  # one name per option


def test_cli_folder_of_geotiff_png_and_jpeg(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    rgb = image(100, 120, seed=4)
    with rasterio.open(
        src / "ortho.tif", "w", driver="GTiff", height=100, width=120, count=3, dtype="uint8",
        crs="EPSG:32640", transform=TRANSFORM,
    ) as dst:  # fmt: skip
        dst.write(np.moveaxis(rgb, -1, 0))
    Image.fromarray(rgb[:50, :70]).save(src / "photo.png")
    Image.fromarray(rgb[:45, :33]).save(src / "snap.jpg", quality=90)
    out = tmp_path / "out"
    run = run_cli("--input", str(src), "--k", "3", "--output", str(out), "--checkpoint", str(checkpoint),
                  "--tile", "64", "--overlap", "16", "--preview", "--threads", "1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    with rasterio.open(src / "ortho.tif") as a, rasterio.open(out / "ortho.tif") as b:
        assert (b.crs, b.transform, b.width, b.height, b.count) == (a.crs, a.transform, a.width, a.height, 1)
        assert b.dtypes[0] == "uint8" and b.read(1).max() < 3
    for name, shape in (("photo", (50, 70)), ("snap", (45, 33))):
        labels = np.asarray(Image.open(out / f"{name}.png"))
        assert labels.shape == shape and labels.dtype == np.uint8 and labels.max() < 3
        assert np.asarray(Image.open(out / f"{name}_preview.png")).shape == (*shape, 3)
    assert np.asarray(Image.open(out / "ortho_preview.png")).shape == (100, 120, 3)
    assert "ortho.tif" in run.stdout and "photo.png" in run.stdout
