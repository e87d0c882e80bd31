"""experiments/supervised_ceiling, the label-reading diagnostic: its loss has the head's optimum, the
held-out tile never reaches training, and the untrained rows are the protocol's random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seglib.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "experiments" / "supervised_ceiling"
ASSETS = ROOT / "seglib" / "assets" / "dubai"


@pytest.fixture(scope="module")
def ceiling():
    from experiments.supervised_ceiling import ceiling

    return ceiling


def test_class_mean_loss_rewards_compact_classes_and_skips_ignored_labels(ceiling):
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    apart = torch.zeros(1, 2, 8, 8)
    apart[:, 0, :, :4] = 3.0
    apart[:, 1, :, 4:] = 3.0
    mixed = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(ceiling.class_mean_loss(apart, labels, 0.1)) < 1e-6
    assert float(ceiling.class_mean_loss(mixed, labels, 0.1)) > 0.1
    # Label 5 (ignored) on one half leaves a single scored class: nothing to learn from the crop.
    assert float(ceiling.class_mean_loss(mixed, labels * 5, 0.1)) == 0.0


def test_held_out_tile_is_scored_never_trained_and_untrained_rows_are_random_weights(ceiling, monkeypatch):
    seen = []
    real = ceiling.train_supervised

    def spy(model, pairs, **kw):
        seen.extend(rgb.shape for rgb, _ in pairs)
        return real(model, pairs, **kw)

    monkeypatch.setattr(ceiling, "train_supervised", spy)
    result = ceiling.run(ASSETS, ["t1"], steps=2, in_sample=False)
    rows = result["rows"]
    assert {r["tile"] for r in rows} == {"t1"}
    assert {r["kind"] for r in rows} == {"untrained", "supervised"}
    # Training read the two t2 images only (shrunk by the recipe's factor 2), not t1's.
    assert len(seen) == 2
    # The untrained rows score the protocol's random weights (seed 0, StudentSegmenter(config)).
    from seglib.models import random_init_like

    cfg = ceiling.recipe_config(ceiling.recipes.STUDENT_DUBAI_CPU)
    torch.manual_seed(123)
    model = random_init_like(ceiling.StudentSegmenter(ceiling.StudentModelConfig.from_config(cfg)))
    from seglib.data.tiles import load_labelled_folder

    names, tiles = load_labelled_folder(ASSETS / "images", ASSETS / "masks", include=("*t1.*",))
    again = ceiling.score(model, names, tiles, "untrained")
    assert [r["miou"] for r in again] == [r["miou"] for r in rows if r["kind"] == "untrained"]
    json.dumps(result)  # the result is plain JSON


def test_images_smaller_than_the_crop_are_refused_by_name(ceiling):
    tiny = (np.zeros((40, 300, 3), np.float32), np.zeros((40, 300), np.int64))
    with pytest.raises(ValueError, match="smaller than the 128 px crop"):
        ceiling.train_supervised(ceiling.build("student")[0], [tiny], steps=1)


def test_set_changes_the_head_it_trains_and_scores(ceiling):
    model, _ = ceiling.build("student", ceiling.parse_set(["model.encoder.colour_weight=0.5"]))
    assert model.colour_weight == 0.5
    assert ceiling.build("student")[0].colour_weight == 3.0
    with pytest.raises(ConfigError, match="did you mean 'model.encoder.colour_weight'"):
        ceiling.build("student", ceiling.parse_set(["model.encoder.colour_wieght=0.5"]))


@pytest.mark.parametrize("path", sorted(HERE.glob("supervised_ceiling*.json")), ids=lambda p: p.name)
def test_committed_ceilings_score_each_image_once_beside_its_untrained_weights(path):
    """The ceilings experiments/LOG.md quotes: each kind scores the same images once, held-out
    rows only on their own fold, the pooled means are the image means, and the bundled
    architecture's untrained rows are the protocol's student_random to the last digit."""
    result = json.loads(path.read_text())
    rows = {kind: [r for r in result["rows"] if r["kind"] == kind] for kind in ("untrained", "supervised")}
    images = sorted(r["image"] for r in rows["untrained"])
    assert len(images) == len(set(images)) == 44
    assert sorted(r["image"] for r in rows["supervised"]) == images
    for kind, kind_rows in rows.items():
        assert result[kind]["all"]["miou"] == pytest.approx(np.mean([r["miou"] for r in kind_rows]))
    if not result["in_sample"]:
        assert set(result["train_seconds"]) == {r["tile"] for r in rows["untrained"]}  # one model per fold
    if result.get("arch", "student") == "student" and not result.get("overrides"):  # written before --arch: student
        protocol = {
            r["image"]: r["miou"]
            for r in json.loads((ROOT / "experiments/loto/loto_region.json").read_text())["per_image"]["student_random"]
        }
        assert {r["image"]: r["miou"] for r in rows["untrained"]} == protocol


def test_pseudo_labels_replace_the_masks_with_the_fold_models_segmentation(ceiling, monkeypatch, tmp_path):
    import shutil

    from seglib.paths import bundled_model_path

    (tmp_path / "t1").mkdir()
    shutil.copy(bundled_model_path(), tmp_path / "t1" / "student.pt")
    seen = []

    def spy(model, pairs, **kw):
        seen.extend(labels for _, labels in pairs)
        return [0.0]

    monkeypatch.setattr(ceiling, "train_supervised", spy)
    result = ceiling.run(ASSETS, ["t1"], steps=1, in_sample=False, pseudo=tmp_path, pseudo_k=3)
    assert "student.pt at K = 3" in result["labels"]
    # What training saw is the t1 model's own segmentation of the t2 images, at 3 clusters: no mask.
    names, tiles = ceiling.load_labelled_folder(ASSETS / "images", ASSETS / "masks", include=("*t2.*",))
    model = ceiling.load_model(tmp_path / "t1" / "student.pt")
    expected = [ceiling.shrink(rgb, ceiling.Predictor(model, 3).labels(rgb) + 256, 2)[1] for rgb, _ in tiles]
    assert len(seen) == len(expected) == 2
    for got, want in zip(seen, expected, strict=True):
        np.testing.assert_array_equal(got, want)
        assert set(np.unique(got)) <= {256, 257, 258}
    with pytest.raises(ValueError, match="drop --in-sample"):
        ceiling.run(ASSETS, ["t1"], steps=1, in_sample=True, pseudo=tmp_path)
    with pytest.raises(FileNotFoundError, match="no fold model"):
        ceiling.run(ASSETS, ["t2"], steps=1, in_sample=False, pseudo=tmp_path)


def test_jitter_changes_the_colours_of_the_crops_and_nothing_else(ceiling):
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.seen = torch.nn.Conv2d(3, 2, 1), []

        def forward(self, rgb, k, **kw):
            self.seen.append(rgb.clone())
            return {"clustered": self.proj(rgb)}

    rng = np.random.default_rng(0)
    pairs = [(rng.random((160, 160, 3), dtype=np.float32), rng.integers(0, 3, (160, 160)))]
    plain, jittered = Recorder(), Recorder()
    ceiling.train_supervised(plain, pairs, steps=2, jitter=False)
    ceiling.train_supervised(jittered, pairs, steps=2, jitter=True)
    # The first step's crops are the same pixels; only jitter moves their colours, within [0, 1].
    a, b = plain.seen[0], jittered.seen[0]
    assert a.shape == b.shape and not torch.equal(a, b)
    assert float(b.min()) >= 0.0 and float(b.max()) <= 1.0
    assert float((a - b).abs().mean()) < 0.2
    # Without jitter the crops are exactly the image's pixels (some crop of some turn of it).
    src = torch.from_numpy(pairs[0][0]).permute(2, 0, 1)
    assert torch.isin(a[0].flatten(), src.flatten()).all()
