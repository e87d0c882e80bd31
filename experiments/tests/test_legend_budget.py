"""The legend-budget study (experiments/legend_budget): its reference is the fit on every cell."""

from __future__ import annotations

import json


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
