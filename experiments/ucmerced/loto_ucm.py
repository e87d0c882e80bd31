"""Leave-one-tile-out with UC Merced: scene-trained models per fold, beside the protocol's rows.

    python experiments/ucmerced/loto_ucm.py --data ../shared/data/dubai_aerial_dev \
        --ucm ../shared/data/ucmerced_landuse --scene scene=runs/ucm/scene_16x_s0/model.pt \
        --settings L8,L4816 --adapt none,bn --baseline runs/loto_ucm/base.json --out RESULT.json

A SceneCNN trained on UC Merced alone has seen no Dubai tile, so one model serves every fold.
With ``--adapt bn`` each fold's copy re-estimates its BatchNorm statistics on crops of the
fold's four training tiles (images only, shrunk by 2 as the head reads them); the held-out
tile's images are never read (``fold_training_images`` lists what is, and a test checks it).
Head settings (feature levels, colour weight) are chosen inside the folds (``nested_choice``).
``--baseline`` merges the per-image rows of a ``python -m seglib.loto`` result (RGB k-means, the
bundled recipe per fold, its architecture at random weights) run on the same images, so that
every paired difference compares the same 44 images.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cached_score, load_dev  # noqa: E402
from probe import load_scene_cnn, random_scene_cnn  # noqa: E402
from scenes import load_scenes  # noqa: E402
from segmenter import SceneSegmenter, bundled_head, calibrate_bn  # noqa: E402
from transfer import parse_setting  # noqa: E402

from seglib.data.tiles import load_folder  # noqa: E402
from seglib.loto.folds import group_by_tile, nested_choice, paired_difference, summarize  # noqa: E402


def fold_training_images(images: Path, fold: str) -> list[str]:
    """Stems of the labelled folder's images a fold's model may read: every tile but ``fold``."""
    from seglib.io import list_images

    tiles = group_by_tile([p.stem for p in list_images(images)])
    if fold not in tiles:
        raise ValueError(f"unknown fold {fold!r}; the tiles are {', '.join(tiles)}")
    return [n for t, names in tiles.items() if t != fold for n in names]


def tile_crops(images: Path, stems: list[str], *, batches: int = 8, batch: int = 32, size: int = 128, seed: int = 0, downscale: int = 2):
    """Random ``size`` crops of the named images, shrunk by ``downscale`` (block means) first."""
    _, arrays = load_folder(images, include=tuple(glob.escape(s) for s in stems))
    small = []
    for rgb in arrays:
        h, w = rgb.shape[0] // downscale, rgb.shape[1] // downscale
        small.append(rgb[: h * downscale, : w * downscale].reshape(h, downscale, w, downscale, 3).mean((1, 3)) / 255)
    out = []
    for b in range(batches):
        rng = np.random.default_rng([seed, 7, b])
        crops = []
        for _ in range(batch):
            img = small[int(rng.integers(len(small)))]
            y = int(rng.integers(0, img.shape[0] - size + 1))
            x = int(rng.integers(0, img.shape[1] - size + 1))
            crops.append(img[y : y + size, x : x + size])
        out.append(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--ucm", required=True)
    p.add_argument("--scene", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--settings", default="L8")
    p.add_argument("--adapt", default="none", help="comma-separated: none | bn")
    p.add_argument("--baseline", action="append", default=[], help="JSON of python -m seglib.loto (per-image rows merged)")
    p.add_argument("--folds", default="")
    p.add_argument("--cache", default="runs/ucm/loto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data)
    all_data = load_dev(data_dir)
    folds = [f for f in args.folds.split(",") if f] or sorted(set(all_data[2]), key=lambda t: int(t[1:]))
    settings = {s: parse_setting(s) for s in args.settings.split(",") if s}
    adapts = [a for a in args.adapt.split(",") if a]
    head = bundled_head()
    scenes = load_scenes(args.ucm)
    rows: dict[str, list] = {}
    for item in args.baseline:
        saved = json.loads(Path(item).read_text())
        for name, r in saved["per_image"].items():
            rows.setdefault(name, [])
            rows[name] += [x for x in r if x["tile"] in folds]
    groups: dict[str, list[str]] = {}
    nets = {}
    for item in args.scene:
        name, _, path = item.partition("=")
        a = torch.load(path, weights_only=False)["args"]
        nets[name] = load_scene_cnn(path)
        nets[f"random_{a['widths'].replace(',', '-')}_{a['depths'].replace(',', '-')}"] = random_scene_cnn(scenes, widths=a["widths"], depths=a["depths"])
    for fold in folds:
        keep = [i for i, t in enumerate(all_data[2]) if t == fold]
        fold_data = tuple([x[i] for i in keep] for x in all_data)
        crops = None
        for net_name, net in nets.items():
            for adapt in adapts:
                if adapt == "bn":
                    crops = crops or tile_crops(data_dir / "images", fold_training_images(data_dir / "images", fold))
                    fnet = calibrate_bn(copy.deepcopy(net), crops)
                elif adapt == "none":
                    fnet = net
                else:
                    raise SystemExit(f"unknown --adapt {adapt!r}")
                for sname, change in settings.items():
                    label = f"{net_name}+{adapt}/{sname}"
                    model = SceneSegmenter(fnet, head).with_settings(**change)
                    r = cached_score(Path(args.cache) / fold, label.replace("/", "__"), model, fold_data, settings={"setting": sname, "adapt": adapt})
                    rows.setdefault(label, []).extend(r)
                    if label not in groups.setdefault(f"{net_name}+{adapt}", []):
                        groups[f"{net_name}+{adapt}"].append(label)
    nested = {g: nested_choice({n: rows[n] for n in names}) for g, names in groups.items()}
    for g, sel in nested.items():
        rows[f"{g}/nested"] = [r for t, c in sel["choices"].items() for r in rows[c["method"]] if r["tile"] == t]
    comparisons = {}
    base_names = [n for n in ("student_random", "student_dubai", "rgb_kmeans") if n in rows]
    for g in nested:
        for b in base_names + [f"{o}/nested" for o in nested if o != g]:
            comparisons[f"{g}/nested - {b}"] = paired_difference(rows[f"{g}/nested"], rows[b])
    table = {label: summarize(r, ("miou",)) for label, r in rows.items()}
    print(f"{'method':<44}" + "".join(f"{t:>8}" for t in folds) + f"{'all':>8}")
    for label, s in table.items():
        print(f"{label:<44}" + "".join(f"{s['folds'].get(t, {}).get('miou', float('nan')):>8.3f}" for t in folds) + f"{s['all']['miou']:>8.3f}")
    for g, sel in nested.items():
        print(f"nested {g}: {sel['nested']:.3f} picks " + ", ".join(f"{t}:{c['method'].split('/')[1]}" for t, c in sel["choices"].items()))
    for label, c in comparisons.items():
        print(f"{label}: {c['mean']:+.3f} ({c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}; better on {c['images_better']}/{c['n']})")
    if args.out:
        result = {
            "command": "python experiments/ucmerced/loto_ucm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
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
