"""The study behind --k auto's rule (experiments/k_auto): its folds hold out whole tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_k_auto_study_folds_are_leave_one_tile_out(tmp_path):
    from experiments.k_auto.study import main
    from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS

    out = tmp_path / "k_auto.json"
    code = main(["--images", str(SAMPLE_IMAGES), "--masks", str(SAMPLE_MASKS), "--ignore", "5,255",
                 "--k-range", "2..5", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    groups = sorted(r["group"] for r in result["per_image"])
    assert groups == ["1", "2", "2"]  # image_part_002t1, 003t2, 005t2
    for fold in result["folds"]:
        test = [r for r in result["per_image"] if r["group"] == fold["held_out"]]
        assert fold["n_images"] == len(test)
        picks = fold["rule_test"]["picks"]
        assert picks == [r["picks"][fold["rule"]] for r in test]  # the fold's rule, applied to unseen tiles
        assert fold["naive_test"]["exact"] == np.mean([r["n_classes"] == 6 for r in test])
    assert set(result["held_out"]) == {"rule", "constant", "naive", "oracle"}
