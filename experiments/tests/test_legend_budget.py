"""The legend-budget study (experiments/legend_budget): its agreement score and its reference."""

from __future__ import annotations

import json

import numpy as np


def test_agreement_matches_clusters_one_to_one():
    from experiments.legend_budget.study import agreement

    rng = np.random.default_rng(0)
    a = [rng.integers(0, 4, (20, 30)), rng.integers(0, 4, (7, 9))]
    renamed = [np.array([2, 0, 3, 1])[x] for x in a]
    assert agreement(a, renamed, 4) == 1.0  # the same partition under other ids
    merged = [np.where(x == 3, 2, x) for x in a]  # two clusters made one: their smaller half disagrees
    n = sum(x.size for x in a)
    lost = min(sum(int((x == 2).sum()) for x in a), sum(int((x == 3).sum()) for x in a))
    assert agreement(a, merged, 4) == (n - lost) / n


def test_a_budget_above_every_cell_is_the_reference(tmp_path):
    from experiments.legend_budget.study import main
    from seglib.paths import SAMPLE_IMAGES, SAMPLES

    out = tmp_path / "budget.json"
    code = main(["--scenes", str(SAMPLE_IMAGES), "--dev", str(SAMPLES), "--budgets", "1000", "1048576",
                 "--seeds", "0", "1", "--k", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    by_budget = result["ucmerced"]["by_k"]["3"]["budgets"]
    assert by_budget["1048576"]["to_all_cells"]["each"][0] == 1.0  # seed 0 with every cell: the reference itself
    assert result["ucmerced"]["by_k"]["3"]["all_cells"] > 1000  # so the small budget really subsampled
    dev = result["dubai_dev"]
    assert dev["model"]["1000"]["cells"] == 1000 and dev["images"] == 3
    assert all(0 < s <= 1 for b in dev["model"].values() for s in b["dataset_miou"])
