"""The procedural tiles: seeded, labelled, varied, and not separable by colour alone."""

import numpy as np
import pytest

from seglib.data.synthetic import eval_set, make_tile, tile_seed


def test_same_seed_same_tile_and_sizes():
    a = make_tile(64, seed=5)
    b = make_tile(64, seed=5)
    c = make_tile(64, seed=6)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.rgb, c.rgb)
    assert a.rgb.shape == (64, 64, 3) and a.rgb.dtype == np.float32
    assert a.labels.shape == (64, 64)
    assert 0.0 <= a.rgb.min() and a.rgb.max() <= 1.0


@pytest.mark.parametrize("size", [0, 30, -4])
def test_bad_size_is_rejected(size):
    with pytest.raises(ValueError, match="multiple of 4"):
        make_tile(size, seed=0)


def test_labels_are_dense_and_class_counts_vary():
    counts = set()
    for i in range(30):
        t = make_tile(128, seed=tile_seed(0, i))
        ids = np.unique(t.labels)
        assert list(ids) == list(range(t.n_classes))  # every id present
        assert len(t.textures) == len(t.kinds) == t.n_classes
        counts.add(t.n_classes)
    assert min(counts) == 2 and max(counts) >= 6


def test_layouts_include_roads_and_buildings():
    kinds = set()
    for i in range(20):
        kinds.update(make_tile(128, seed=tile_seed(1, i)).kinds)
    assert {"region", "road", "building"} <= kinds


def test_colour_twins_exist():
    """Some class pairs share the mean colour and differ only in texture."""
    twins = 0
    for t in eval_set(16, 128, seed=123):
        means = np.stack([t.rgb[t.labels == c].mean(0) for c in range(t.n_classes)])
        for i in range(t.n_classes):
            for j in range(i + 1, t.n_classes):
                if np.abs(means[i] - means[j]).max() < 0.03 and t.textures[i] != t.textures[j]:
                    twins += 1
    assert twins >= 3


def test_eval_set_is_fixed_and_disjoint_from_training():
    a = eval_set(2, 64, seed=123)
    b = eval_set(2, 64, seed=123)
    assert np.array_equal(a[1].rgb, b[1].rgb)
    train = make_tile(64, seed=tile_seed(123, 1, "train"))
    assert not np.array_equal(a[1].rgb, train.rgb)
