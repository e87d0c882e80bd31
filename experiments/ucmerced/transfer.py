"""Transfer protocol: models trained without any Dubai image, scored on all labelled dev images.

    python experiments/ucmerced/transfer.py --data ../shared/data/dubai_aerial_dev \
        --ucm ../shared/data/ucmerced_landuse --scene scene=runs/ucm/scene_16x_s0/model.pt \
        --settings L8,L4816 --out experiments/results/transfer.json

Rows, all in one run on the same images (K = classes present, 5/255 ignored, Hungarian mIoU):
``rgb_kmeans``; ``bundled`` (today's bundled student) and ``bundled_random`` (its architecture
at random weights, as ``student_random`` in the leave-one-tile-out protocol); for every
``--scene NAME=PATH`` the SceneCNN under the bundled head at each of ``--settings`` (which
feature levels, colour weight) as ``NAME/SETTING``, and the same SceneCNN architecture at
random weights (BatchNorm calibrated on UC Merced crops) as ``random/SETTING``. ``--seglib
NAME=PATH`` adds a seglib teacher/student checkpoint (e.g. one trained on UC Merced without
labels) scored with the bundled student's head.

A setting is chosen inside the tiles (``nested_choice``: for tile t the setting best on the
other four tiles' images, scored on t), for trained and random weights alike; no setting is
chosen on all 44 images. Per-image scores are cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cached_score, load_dev  # noqa: E402
from probe import load_scene_cnn, random_scene_cnn  # noqa: E402
from scenes import load_scenes  # noqa: E402
from segmenter import SceneSegmenter, bundled_head  # noqa: E402

from seglib.loto.folds import nested_choice, paired_difference, summarize  # noqa: E402

LEVEL_NAMES = {"4": "s4", "8": "s8", "16": "s16", "k": "cls"}


def parse_setting(text: str) -> dict:
    """``L4816c2`` -> levels s4, s8, s16 (equal weights), colour weight 2; ``d1``: downsample 1;
    ``k``: the scene classifier's posteriors at every stride-16 cell (square roots)."""
    m = re.fullmatch(r"L((?:4|8|16|k)+)(?:c([\d.]+))?(?:d([12]))?", text)
    if not m:
        raise SystemExit(f"bad setting {text!r}: expected e.g. L8, L4816, L816c2, L8d1")
    levels = {LEVEL_NAMES[v]: 1.0 for v in re.findall(r"16|4|8|k", m.group(1))}
    out = {"levels": levels}
    if m.group(2):
        out["colour_weight"] = float(m.group(2))
    if m.group(3):
        out["downsample"] = int(m.group(3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--ucm", required=True, help="UC Merced folder (BatchNorm calibration of the random weights)")
    p.add_argument("--scene", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--seglib", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--settings", default="L8")
    p.add_argument("--tiles", default="", help="only these tiles (screening)")
    p.add_argument("--cache", default="runs/ucm/transfer")
    p.add_argument("--boundary", action="store_true", help="also boundary F1 (slow)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dev(args.data, [t for t in args.tiles.split(",") if t] or None)
    cache = Path(args.cache)
    rows: dict[str, list] = {}
    tag = "_b" if args.boundary else ""

    def run(label, model, settings):
        rows[label] = cached_score(cache, label.replace("/", "__") + tag, model, data, settings=settings | {"boundary": args.boundary})

    from seglib.models import load_model, random_init_like

    run("rgb_kmeans", None, {})
    bundled = load_model()
    run("bundled", bundled, {})
    run("bundled_random", random_init_like(bundled), {})
    for item in args.seglib:
        name, _, path = item.partition("=")
        run(name, load_model(path), {"infer": {"downsample": 2, "iters": 1, "size_prior": 3.0}})
    settings = {s: parse_setting(s) for s in args.settings.split(",") if s}
    head = bundled_head()
    scenes = None
    groups: dict[str, list[str]] = {}
    for item in args.scene:
        name, _, path = item.partition("=")
        cnn = load_scene_cnn(path)
        if scenes is None:
            scenes = load_scenes(args.ucm)
        a = torch.load(path, weights_only=False)["args"]
        rand = random_scene_cnn(scenes, widths=a["widths"], depths=a["depths"])
        rand_name = f"random_{a['widths'].replace(',', '-')}_{a['depths'].replace(',', '-')}"
        for sname, change in settings.items():
            for label, net in ((f"{name}/{sname}", cnn), (f"{rand_name}/{sname}", rand)):
                if label in rows:
                    continue
                run(label, SceneSegmenter(net, head).with_settings(**change), {"setting": sname})
                groups.setdefault(label.split("/")[0], []).append(label)
    nested = {g: nested_choice({n: rows[n] for n in names}) for g, names in groups.items()}
    comparisons = {}

    def compare(a, b, ra, rb):
        comparisons[f"{a} - {b}"] = paired_difference(ra, rb)

    for g, sel in nested.items():
        held = [r for t, c in sel["choices"].items() for r in rows[c["method"]] if r["tile"] == t]
        rows[f"{g}/nested"] = held
    for item in args.scene:
        name = item.partition("=")[0]
        a = torch.load(item.partition("=")[2], weights_only=False)["args"]
        rand_name = f"random_{a['widths'].replace(',', '-')}_{a['depths'].replace(',', '-')}"
        for b in (f"{rand_name}/nested", "bundled_random", "bundled", "rgb_kmeans"):
            compare(f"{name}/nested", b, rows[f"{name}/nested"], rows[b])
        for sname in settings:
            compare(f"{name}/{sname}", f"{rand_name}/{sname}", rows[f"{name}/{sname}"], rows[f"{rand_name}/{sname}"])
    for item in args.seglib:
        name = item.partition("=")[0]
        for b in ("bundled_random", "bundled"):
            compare(name, b, rows[name], rows[b])
    compare("bundled", "bundled_random", rows["bundled"], rows["bundled_random"])
    table = {label: summarize(r, ("miou",)) for label, r in rows.items()}
    tiles = sorted({r["tile"] for r in rows["rgb_kmeans"]}, key=lambda t: int(t[1:]))
    print(f"{'method':<40}" + "".join(f"{t:>8}" for t in tiles) + f"{'all':>8}")
    for label, s in table.items():
        print(f"{label:<40}" + "".join(f"{s['folds'][t]['miou']:>8.3f}" for t in tiles) + f"{s['all']['miou']:>8.3f}")
    for g, sel in nested.items():
        print(f"nested {g}: {sel['nested']:.3f} picks " + ", ".join(f"{t}:{c['method'].split('/')[1]}" for t, c in sel["choices"].items()))
    for label, c in comparisons.items():
        print(f"{label}: {c['mean']:+.3f} ({c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}; better on {c['images_better']}/{c['n']})")
    if args.out:
        result = {
            "command": "python experiments/ucmerced/transfer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "table": table,
            "nested": nested,
            "comparisons": comparisons,
            "per_image": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
