"""The committed leave-one-tile-out results of experiments/loto: the protocol's invariants hold."""

from __future__ import annotations

import numpy as np
import pytest

from seglib.evaluation.loto import folds as F


@pytest.mark.parametrize("name", ["loto.json", "loto_curve.json", "loto_iic.json", "loto_region.json"])
def test_committed_results_score_each_image_once_in_its_own_fold(name):
    """The results experiments/LOG.md and notebook 06 show: per method, every image of the folds
    is scored exactly once, as part of the fold of its own tile, and the pooled mean is the
    image-weighted mean of those scores."""
    from seglib.evaluation.loto import loto_result

    result = loto_result(f"experiments/loto/{name}")
    folds = result["protocol"]["folds"]
    owner = {image: fold for fold, images in folds.items() for image in images}
    assert len(owner) == sum(len(v) for v in folds.values()), "a held-out image appears in two folds"
    for fold, images in folds.items():
        assert all(F.tile_of(image) == fold for image in images)
    scored = {r["image"] for r in result["per_image"]["rgb_kmeans"]}  # images with < 2 classes are skipped
    assert scored <= owner.keys() and len(scored) >= len(owner) - len(folds)
    for method, rows in result["per_image"].items():
        assert sorted(r["image"] for r in rows) == sorted(scored), method  # each image once, the same images
        assert all(owner[r["image"]] == r["tile"] for r in rows), method
        pooled = result["methods"][method]["all"]
        assert pooled["n"] == len(rows)
        assert pooled["miou"] == pytest.approx(np.mean([r["miou"] for r in rows]))
