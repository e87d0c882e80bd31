"""Tables of the UC Merced study from its protocol and probe JSONs (no model is run here).

    python -m experiments.ucmerced.summarize --transfer T.json --loto L.json --probe P.json \
        --bundled-loto experiments/loto/loto.json --out DIR

Writes DIR/per_image.csv (every method's per-image mIoU), DIR/folds.csv (per-fold and pooled mIoU),
DIR/curve.json (pooled transfer mIoU and probe accuracy against pretraining steps, per seed; the
format of plot_curve.py) and DIR/summary.json: the nested choices (settings chosen inside the
folds, ``seglib.evaluation.loto.folds.nested_choice``), the paired differences between nested
choices (per image, 95 % bootstrap interval over images) and, for the leave-one-tile-out table,
the bundled recipe trained per fold read from a committed protocol result (``--bundled-loto``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from seglib.evaluation.loto.folds import nested_choice, paired_difference

# pretraining steps of the compute-curve methods (experiments/ucmerced/methods.py PRETRAIN), by seed
CURVE = {
    "0": {50: "scene_50", 200: "scene_1x", 800: "scene_4x", 3200: "scene"},
    "1": {50: "scene_50_s1", 200: "scene_1x_s1", 800: "scene_4x_s1"},
}
PROBE_NAMES = {m: m for seed in CURVE.values() for m in seed.values()}


def nested_rows(rows: dict, names: list[str]) -> tuple[dict, list[dict]]:
    """The nested choice among ``names`` and its held-out rows (each fold scored by its choice)."""
    choice = nested_choice({n: rows[n] for n in names})
    held = [r for tile, c in choice["choices"].items() for r in rows[c["method"]] if r["tile"] == tile]
    return choice, held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfer", required=True)
    p.add_argument("--loto", default="")
    p.add_argument("--probe", default="")
    p.add_argument("--more", action="append", default=[], help="more protocol JSONs whose per-image rows join")
    p.add_argument(
        "--curve-head", default="", metavar="SETTING", help="a second transfer curve: the curve methods + _SETTING"
    )
    p.add_argument("--bundled-loto", default="", help="a protocol JSON with student_dubai / student_random per fold")
    p.add_argument("--select", action="append", default=[], metavar="LABEL=M1,M2")
    p.add_argument("--pair", action="append", default=[], metavar="A:B", help="A and B: labels of --select or methods")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transfer = json.loads(Path(args.transfer).read_text())
    rows = dict(transfer["per_image"])
    if args.loto:
        for name, r in json.loads(Path(args.loto).read_text())["per_image"].items():
            rows.setdefault(name, r)
    for extra in args.more:
        for name, r in json.loads(Path(extra).read_text())["per_image"].items():
            rows.setdefault(name, r)
    if args.bundled_loto:
        committed = json.loads(Path(args.bundled_loto).read_text())["per_image"]
        for name in ("student_dubai", "student_random"):
            rows[f"{name} (committed)"] = committed[name]
    summary = {"nested": {}, "pairs": {}}
    groups = {}
    for item in args.select:
        label, _, names = item.partition("=")
        names = [n for n in names.split(",") if n in rows]
        choice, held = nested_rows(rows, names)
        summary["nested"][label] = choice
        groups[label] = held
    for item in args.pair:
        a, _, b = item.partition(":")
        ra, rb = groups.get(a, rows.get(a)), groups.get(b, rows.get(b))
        if ra is None or rb is None:
            continue
        summary["pairs"][f"{a} - {b}"] = paired_difference(ra, rb)
    tiles = list(transfer["protocol"]["folds"])
    with open(out / "folds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *tiles, "pooled", "n"])
        for name, r in {**rows, **{f"nested:{k}": v for k, v in groups.items()}}.items():
            by = {t: [x["miou"] for x in r if x["tile"] == t] for t in tiles}
            w.writerow(
                [name, *(f"{sum(v) / len(v):.4f}" if v else "" for v in by.values())]
                + [f"{sum(x['miou'] for x in r) / len(r):.4f}", len(r)]
            )
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        names = list(rows)
        images = [x["image"] for x in rows[names[0]]]
        w.writerow(["image", "tile", "k", *names])
        maps = {n: {x["image"]: x for x in rows[n]} for n in names}
        for image in images:
            first = maps[names[0]][image]
            w.writerow(
                [image, first["tile"], first["k"]]
                + [f"{maps[n][image]['miou']:.4f}" if image in maps[n] else "" for n in names]
            )
    probe = json.loads(Path(args.probe).read_text()) if args.probe else None
    curve = {"protocols": {}}
    mean = lambda r: sum(x["miou"] for x in r) / len(r)  # noqa: E731
    block = {"seeds": {}, "references": {}, "ylabel": "pooled mIoU, 44 dev images (transfer)"}
    for seed, points in CURVE.items():
        block["seeds"][seed] = [{"steps": s, "miou": mean(rows[m])} for s, m in points.items() if m in rows]
    for ref in ("scene_random", "bundled", "rgb_kmeans"):
        if ref in rows:
            block["references"][ref] = mean(rows[ref])
    curve["protocols"]["transfer"] = block
    if args.curve_head:
        suffix = f"_{args.curve_head}"
        hb = {"seeds": {}, "references": {}, "ylabel": f"pooled mIoU, 44 dev images (transfer, head {args.curve_head})"}
        for seed, points in CURVE.items():
            hb["seeds"][seed] = [
                {"steps": s, "miou": mean(rows[m + suffix])} for s, m in points.items() if m + suffix in rows
            ]
        for ref in ("scene_random", "bundled"):
            if ref + suffix in rows:
                hb["references"][ref + suffix] = mean(rows[ref + suffix])
            elif ref in rows:
                hb["references"][ref] = mean(rows[ref])
        curve["protocols"][f"transfer, head {args.curve_head}"] = hb
    if probe is not None:
        for kind in ("knn", "linear"):
            pb = {"seeds": {}, "references": {}, "ylabel": f"{kind} scene accuracy, UC Merced fold 0 (s8 map)"}
            for seed, points in CURVE.items():
                pb["seeds"][seed] = [
                    {"steps": s, "miou": probe["models"][m]["levels"]["s8"][kind]["mean"]}
                    for s, m in points.items()
                    if m in probe["models"]
                ]
            if "scene_random" in probe["models"]:
                pb["references"]["random"] = probe["models"]["scene_random"]["levels"]["s8"][kind]["mean"]
            curve["protocols"][f"probe {kind}"] = pb
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for label, c in summary["nested"].items():
        picks = ", ".join(f"{t}: {v['method']}" for t, v in c["choices"].items())
        print(f"nested {label}: {c['nested']:.4f} ({picks}); optimistic {c['optimistic_method']} {c['optimistic']:.4f}")
    for label, d in summary["pairs"].items():
        lo, hi = d["ci95"]
        print(f"{label}: {d['mean']:+.4f} (95 % {lo:+.4f} to {hi:+.4f}; better on {d['images_better']}/{d['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
