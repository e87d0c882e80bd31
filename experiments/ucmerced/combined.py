"""A folder of links: the labelled split's images beside every UC Merced scene, for training
seglib recipes "on the fold's four tiles plus UC Merced" with the unchanged protocol.

    python experiments/ucmerced/combined.py --data ../shared/data/dubai_aerial_dev \
        --ucm ../shared/data/ucmerced_landuse --out runs/ucm/dubai_ucm_images

The scene links are named ``ucm_<class>_<NN>.jpg``: no tile id (the protocol's ``t<T>`` at the
end of a stem), so they are never a fold and never scored, and every fold model trains on them
beside the four training tiles (the held-out tile is left out by ``data.exclude`` as always).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def build(data: Path, ucm: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted((data / "images").iterdir()):
        link = out / path.name
        if not link.exists():
            os.symlink(path.resolve(), link)
        count += 1
    root = ucm / "images" if (ucm / "images").is_dir() else ucm
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(cls.iterdir()):
            number = path.stem[len(cls.name) :]
            link = out / f"ucm_{cls.name}_{number}{path.suffix}"
            if not link.exists():
                os.symlink(path.resolve(), link)
            count += 1
    return count


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--ucm", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    print(build(Path(a.data), Path(a.ucm), Path(a.out)), "links in", a.out)
