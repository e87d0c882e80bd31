"""Adaptation to the input (``seglib.inference.adapt``, ``segment(..., adapt_steps=N)``, ``predict --adapt N``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglib.inference.adapt import adapt, sample_windows
from seglib.io.rasters import ArraySource


@pytest.fixture(scope="module")
def student():
    from seglib.models import load_model

    return load_model(None)  # the bundled student: BatchNorm, half resolution


@pytest.fixture(scope="module")
def image():
    from seglib.io.images import read_image
    from seglib.paths import SAMPLE_IMAGES

    rgb, _ = read_image(sorted(SAMPLE_IMAGES.glob("*.jpg"))[0])
    return rgb[:320, :400]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_adapt_trains_a_copy_and_keeps_normalisation_statistics(student, image, one_thread):
    before = _state(student)
    adapted = adapt(student, ArraySource(image), steps=3, crop=64, batch=2, progress=False)
    after = adapted.state_dict()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the input model is untouched
    moved = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in moved)  # weights moved
    assert not [k for k in moved if "running_" in k]  # BatchNorm statistics did not
    assert not adapted.training
    labels = adapted(torch.rand(1, 3, 64, 64), 3)["probs"].argmax(1)
    assert labels.shape == (1, 64, 64)
    assert adapt(student, ArraySource(image), steps=0) is student
    with pytest.raises(ValueError, match="0 or more"):
        adapt(student, ArraySource(image), steps=-1)


def test_adapt_stops_at_the_time_bound(student, image, one_thread):
    calls = []
    model = type(student)(student.config).eval()  # a throwaway copy: the fixture stays clean
    model.load_state_dict(student.state_dict())
    original = model.features

    def counting(rgb):
        calls.append(rgb.shape[0])
        return original(rgb)

    model.features = counting  # instance attribute: the copy inside adapt calls it too
    adapt(model, ArraySource(image), steps=50, crop=64, batch=2, max_seconds=1e-9, progress=False)
    assert len(calls) == 2  # the prototype initialisation and one step, not 50


def test_windows_are_sampled_inside_and_padded_when_the_image_is_small():
    rng = np.random.default_rng(0)
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    crops = sample_windows(ArraySource(img), 3, 16, rng)
    assert crops.shape == (3, 3, 16, 16) and float(crops.max()) <= 1.0
    small = sample_windows(ArraySource(img), 1, 32, rng)
    assert small.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(small[0, :, :20, :30].permute(1, 2, 0).numpy() * 255, img, atol=1e-3)


def test_segment_and_predict_take_adaptation_steps(student, image, tmp_path, one_thread):
    import seglib
    from seglib.io.outputs import write_png
    from seglib.predict import main

    labels = seglib.segment(image, 4, student, adapt_steps=2)
    assert labels.shape == image.shape[:2] and labels.max() < 4
    with pytest.raises(ValueError, match="adapt_steps"):
        seglib.segment(image, 4, student, adapt_steps=-2)
    write_png(image, tmp_path / "in.png")
    assert (
        main(["--input", str(tmp_path / "in.png"), "--k", "4", "--output", str(tmp_path / "out"), "--adapt", "2"]) == 0
    )
    assert (tmp_path / "out" / "in.png").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(tmp_path / "in.png"), "--k", "4", "--output", str(tmp_path / "o"), "--adapt", "-1"])
    assert exc.value.code == 2
    # Clusters shared between files were fitted on unadapted features: refused before any work.
    shared = ["--input", str(tmp_path / "in.png"), "--k", "4", "--output", str(tmp_path / "s"), "--shared-legend"]
    assert main([*shared, "--adapt", "2"]) == 2
    assert not (tmp_path / "s" / "in.png").exists()
