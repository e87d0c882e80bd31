"""Draw the compute curve (pooled mIoU against training steps, one line per seed and protocol).

    python -m experiments.ucmerced.plot_curve experiments/ucmerced/curve.json experiments/ucmerced/curve.png

CURVE.json: {"protocols": {name: {"seeds": {seed: [{"steps", "miou"}, ...]}, "references": {name: miou}}}}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, dst: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = json.loads(Path(src).read_text())
    fig, axes = plt.subplots(1, len(curve["protocols"]), figsize=(5 * len(curve["protocols"]), 3.6), squeeze=False)
    for ax, (protocol, block) in zip(axes[0], curve["protocols"].items(), strict=True):
        for seed, points in block["seeds"].items():
            steps = [p["steps"] for p in points]
            ax.plot(steps, [p["miou"] for p in points], "o-", label=f"seed {seed}")
        for name, value in block.get("references", {}).items():
            ax.axhline(value, ls="--", lw=1, color="grey")
            ax.text(ax.get_xlim()[0], value, f" {name}", va="bottom", fontsize=8, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pretraining steps (batch 48; each its own schedule)")
        ax.set_ylabel(block.get("ylabel", "mIoU, 44 dev images"), fontsize=8)
        ax.set_title(protocol)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
