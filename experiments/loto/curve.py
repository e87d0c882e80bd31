"""Draw loto_curve.png, the compute curve of the bundled recipe under leave-one-tile-out, from
the protocol result loto_curve.json beside it (experiments/LOG.md, "Compute curve" has the commands).

    python -m experiments.loto.curve                # read loto_curve.json, write loto_curve.png
    python -m experiments.loto.curve --json R.json --out F.png

Points: the pooled (image-weighted) mIoU of each seed at 1x, 4x and 16x the steps (94, 375 and
1500 steps: 16x is ``student_dubai``, the bundled recipe), the per-fold values thin; horizontal
lines: the same architecture at random weights and RGB k-means, scored in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (steps, {seed: method}) of the curve; seed 0 of 16x is the bundled recipe itself.
CURVE = [
    (94, {0: "student_dubai_16th", 1: "student_dubai_16th@x1s1"}),
    (375, {0: "student_dubai_4th", 1: "student_dubai_4th@x1s1"}),
    (1500, {0: "student_dubai", 1: "student_dubai@x1s1"}),
]


def points(result: dict) -> list[dict]:
    """One row per (steps, seed) present in ``result``: pooled and per-fold mIoU."""
    rows = []
    for steps, by_seed in CURVE:
        for seed, name in by_seed.items():
            m = result["methods"].get(name)
            if m is None:
                continue
            folds = {f: v["miou"] for f, v in m["folds"].items()}
            rows.append({"steps": steps, "seed": seed, "method": name, "all": m["all"]["miou"], "folds": folds})
    return rows


def draw(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = points(result)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {0: "tab:blue", 1: "tab:orange"}
    for seed in (0, 1):
        mine = [r for r in rows if r["seed"] == seed]
        if not mine:
            continue
        ax.plot([r["steps"] for r in mine], [r["all"] for r in mine], "o-", color=colours[seed], label=f"seed {seed}")
        for fold in mine[0]["folds"]:
            ys = [r["folds"].get(fold) for r in mine]
            ax.plot([r["steps"] for r in mine], ys, "-", color=colours[seed], alpha=0.15, lw=1)
    for name, style, label in (
        ("student_random", "--", "same architecture, random weights"),
        ("rgb_kmeans", ":", "RGB k-means"),
    ):
        if name in result["methods"]:
            ax.axhline(result["methods"][name]["all"]["miou"], ls=style, color="grey", label=label)
    folds = list(result["protocol"]["folds"])
    n = next(iter(result["methods"].values()))["all"]["n"]  # scored images (one-class images are skipped)
    ax.set_xscale("log")
    ax.set_xticks([s for s, _ in CURVE], ["1x (94)", "4x (375)", "16x (1500)"])
    ax.set(
        xlabel="training steps of the bundled student recipe",
        ylabel="mIoU, held-out tile (K = classes present)",
        title=f"leave-one-tile-out, folds {', '.join(folds)} ({n} images); thin: per fold",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=str(HERE / "loto_curve.json"))
    p.add_argument("--out", default=str(HERE / "loto_curve.png"))
    args = p.parse_args()
    draw(json.loads(Path(args.json).read_text()), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
