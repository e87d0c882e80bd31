"""Archive-scale inference on dask.distributed (seglib.inference.archive): one local cluster of
two worker processes for the whole module, reached through ``--scheduler ADDRESS`` (the command
that ``--workers N`` runs on a cluster it starts itself)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dask.distributed")
rasterio = pytest.importorskip("rasterio")

from seglib.evaluation.archive_data import write_archive, write_geotiff  # noqa: E402
from seglib.inference.archive.record import MANIFEST  # noqa: E402
from seglib.predict import main  # noqa: E402

K = 4
TILE = ["--tile", "64", "--overlap", "16"]


@pytest.fixture(scope="module")
def scheduler():
    """The address of a LocalCluster of 2 single-threaded worker processes."""
    from dask.distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """40 abutting georeferenced GeoTIFF tiles of 64 px."""
    folder = tmp_path_factory.mktemp("archive")
    write_archive(folder, 40, size=64, columns=8)
    return folder


def _run(*args) -> int:
    return main([str(a) for a in args])


def _labels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.fixture(scope="module")
def dask_run(archive, scheduler, tiny_teacher_checkpoint, tmp_path_factory):
    """The arguments and the output folder of a --shared-legend run of the archive on dask."""
    out = tmp_path_factory.mktemp("dask_run")
    args = ["--input", archive, "--k", K, "--checkpoint", tiny_teacher_checkpoint, "--shared-legend", "--quiet"]
    args += ["--output", out / "dask", "--scheduler", scheduler, "--mosaic", out / "m.vrt"]
    assert _run(*args, "--save-legend", out / "legend.json") == 0
    return args, out


def test_workers_byte_identical_with_a_mosaic(archive, dask_run, tiny_teacher_checkpoint, tmp_path):
    dask_args, tmp_path = dask_run
    common = ["--input", archive, "--k", K, "--checkpoint", tiny_teacher_checkpoint, "--shared-legend", "--quiet"]
    assert _run(*common, "--output", tmp_path / "one", "--threads", "1") == 0
    saved = tmp_path / "legend.json"
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tif"))
    assert len(names) == 40
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes(), name
    summary = json.loads((tmp_path / "dask" / "seglib-run.json").read_text())
    assert summary["counts"] == {"done": 40, "skipped": 0, "failed": 0}
    assert all(r["k"] == K and r["seconds"] > 0 for r in summary["files"])
    assert json.loads(saved.read_text())["meta"]["files"] == [f"tile_{i:05d}.tif" for i in range(40)]
    # The mosaic opens in rasterio and holds every output at its place.
    with rasterio.open(tmp_path / "m.vrt") as mosaic:
        assert (mosaic.height, mosaic.width) == (5 * 64, 8 * 64)
        for name in names:
            with rasterio.open(tmp_path / "dask" / name) as src:
                window = rasterio.windows.from_bounds(*src.bounds, transform=mosaic.transform)
                assert np.array_equal(mosaic.read(1, window=window.round_offsets().round_lengths()), src.read(1))
        assert mosaic.colormap(1)[0] == rasterio.open(tmp_path / "dask" / names[0]).colormap(1)[0]
    # The same command again: everything complete, nothing redone.
    assert _run(*dask_args) == 0
    summary = json.loads((tmp_path / "dask" / "seglib-run.json").read_text())
    assert summary["counts"] == {"done": 0, "skipped": 40, "failed": 0}


def test_a_raster_split_into_blocks_matches_the_whole_pass(scheduler, tiny_teacher_checkpoint, tmp_path):
    from seglib.data.synthetic import make_tile

    rgb = (make_tile(320, seed=3).rgb * 255).round().astype(np.uint8)[:, :300]
    rgb[:20] = 0  # a nodata collar: the blocks follow the data's box, as the whole pass does
    path = write_geotiff(tmp_path / "big.tif", rgb, left=500_000.0, top=2_800_000.0)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = 0
    common = ["--input", path, "--k", K, "--checkpoint", tiny_teacher_checkpoint, *TILE, "--quiet"]
    assert _run(*common, "--output", tmp_path / "one", "--threads", "1") == 0
    assert _run(*common, "--output", tmp_path / "dask", "--scheduler", scheduler, "--block-size", 100) == 0
    blocks = sorted((tmp_path / "dask" / "big.blocks").glob("*.tif"))
    assert len(blocks) >= 3
    whole, split = _labels(tmp_path / "one" / "big.tif"), _labels(tmp_path / "dask" / "big.vrt")
    assert split.shape == whole.shape
    assert (split == whole).mean() >= 0.9999
    assert (split[:20] == 255).all()
    with rasterio.open(tmp_path / "dask" / "big.vrt") as vrt, rasterio.open(tmp_path / "one" / "big.tif") as one:
        assert vrt.transform == one.transform and vrt.crs == one.crs


def test_failures_are_isolated_and_named(archive, scheduler, tiny_teacher_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        (inputs / f"tile_{i:05d}.tif").write_bytes((archive / f"tile_{i:05d}.tif").read_bytes())
    data = (inputs / "tile_00001.tif").read_bytes()
    (inputs / "tile_00001.tif").write_bytes(data[: len(data) // 3])  # truncated
    (tmp_path / "out" / "tile_00003.gpkg").mkdir(parents=True)  # the polygons cannot be written there
    args = ["--input", inputs, "--k", K, "--checkpoint", tiny_teacher_checkpoint, "--output", tmp_path / "out"]
    code = _run(*args, "--vector", "gpkg", "--scheduler", scheduler, "--quiet", "--shared-legend")
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "3 done, 0 complete from an earlier run, 2 failed of 5" in err
    summary = json.loads((tmp_path / "out" / "seglib-run.json").read_text())
    failed = {Path(r["input"]).name: r["error"] for r in summary["files"] if r["status"] == "failed"}
    assert sorted(failed) == ["tile_00001.tif", "tile_00003.tif"]
    assert "corrupt or truncated" in failed["tile_00001.tif"]
    assert "labels written" in failed["tile_00003.tif"]
    for i in (0, 2, 4):
        assert (tmp_path / "out" / f"tile_{i:05d}.tif").is_file() and (
            tmp_path / "out" / f"tile_{i:05d}.gpkg"
        ).is_file()
    assert not list((tmp_path / "out").glob(".*tmp*"))


@pytest.mark.slow
def test_a_killed_run_finishes_the_rest_on_rerun(archive, tiny_teacher_checkpoint, dask_run, tmp_path):
    """``--workers 2`` (the command's own local cluster, killed with it), against the outputs of
    the run on the module's cluster: byte-identical, so also to the single-process run's."""
    args = ["--input", archive, "--k", K, "--checkpoint", tiny_teacher_checkpoint, "--shared-legend", "--quiet"]
    args = [sys.executable, "-m", "seglib.predict", *map(str, args), "--workers", "2"]
    out = tmp_path / "out"
    proc = subprocess.Popen([*args, "--output", str(out)], start_new_session=True)
    manifest = out / MANIFEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(manifest.read_text().splitlines())
    assert 10 <= done_before < 40
    assert subprocess.run([*args, "--output", str(out)]).returncode == 0
    summary = json.loads((out / "seglib-run.json").read_text())
    assert summary["counts"]["skipped"] == done_before
    assert summary["counts"]["done"] == 40 - done_before
    refs = sorted((dask_run[1] / "dask").glob("*.tif"))  # an uninterrupted run's
    assert len(refs) == 40
    for ref in refs:
        assert ref.read_bytes() == (out / ref.name).read_bytes(), ref.name


def test_shared_fit_budget_is_bounded_and_order_free(tiny_teacher_model, archive):
    """Under the budget every cell is used (the joint fit of all windows); over it, the cut is
    the same whatever order the files come in, and a later file's threshold drops nothing that
    would have been kept."""
    from seglib.inference.budget import PositionBudget, file_sample
    from seglib.inference.legend import (
        MAX_POSITIONS,
        embed_windows,
        fit_embeddings,
        fit_positions,
        fit_sources,
    )
    from seglib.inference.windows import Tiling
    from seglib.io.rasters import open_source

    torch.set_num_threads(1)
    model, paths = tiny_teacher_model, sorted(archive.glob("*.tif"))[:6]
    tiling = Tiling(tile=64, overlap=16, fit_windows=4, fit_pixels=1 << 20, seed=0)
    whole = fit_sources(model, paths, K, tiling=tiling)
    embs = []
    for p in paths:
        with open_source(p) as src:
            windows = tiling.sample_windows(src.height, src.width, 4)
            embs += embed_windows(model, src, windows)[0]
    joint = fit_embeddings(model.head, embs, K, max_positions=MAX_POSITIONS)
    assert whole.meta["positions"] == sum(e.shape[-1] * e.shape[-2] for e in embs)
    assert np.allclose(np.sort(whole.prototypes, 0), np.sort(joint.prototypes[0].numpy(), 0), atol=1e-6)

    def fit(order, use_threshold):
        budget = PositionBudget(500, k=K, init_pool=model.head.init_pool)
        for i in order:
            threshold = budget.threshold if use_threshold else (1.0, 1.0)
            budget.add(file_sample(model, paths[i], i, k=K, tiling=tiling, positions=500, threshold=threshold))
        assert budget.cells.held <= 500
        return fit_positions(model, budget, K, seed=0, meta={})

    a, b, c = fit(range(6), True), fit([5, 2, 0, 4, 1, 3], True), fit(range(6), False)
    assert a.meta["positions"] == 500
    for other in (b, c):
        assert np.array_equal(a.prototypes, other.prototypes) and a.meta == other.meta


def test_budget_sorts_its_cells_in_place():
    """The k-means gets the kept cells in file order (then each file's own) sorted inside the
    budget's storage, the same values as a sorted copy, and the budget is empty afterwards."""
    from seglib.inference.budget import _Reservoir

    rng = np.random.default_rng(0)
    reservoir, seen = _Reservoir(300), {}
    for index in rng.permutation(40):  # files arrive in any order
        n = int(rng.integers(1, 30))
        values, keys = torch.from_numpy(rng.standard_normal((5, n), dtype=np.float32)), rng.random(n)
        order = np.sort(rng.choice(100, n, replace=False))
        reservoir.add(values, keys, int(index), order)
        seen |= {(int(index), int(o)): (key, values[:, j]) for j, (o, key) in enumerate(zip(order, keys, strict=True))}
    kept = sorted(sorted(seen, key=lambda c: seen[c][0])[:300])  # the 300 smallest keys, in file order
    expected = torch.stack([seen[c][1] for c in kept], 1)[None]
    cells = reservoir.take()
    assert cells.shape == (1, 5, 300) and cells.is_contiguous()
    assert torch.equal(cells, expected)
    assert reservoir.values is None and reservoir.take().numel() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="local workers are forked on Linux only")
def test_local_workers_start_with_the_clients_model():
    """Local workers are forked once the client has loaded the model: none loads it again (no
    torch import, no weights read per worker), and SIGTERM ends a worker as it would a spawned one."""
    import signal as signals

    from seglib.inference.archive.cluster import dask_client
    from seglib.inference.archive.tasks import worker_model

    def state():
        from seglib.inference.archive import tasks

        return (None, "cpu") in tasks._MODELS, signals.getsignal(signals.SIGTERM) == signals.SIG_DFL

    previous = signals.signal(signals.SIGTERM, lambda *_: None)  # as python -m seglib.predict installs one
    try:
        with dask_client(workers=1, preload=lambda: worker_model(None)) as client:
            assert list(client.run(state).values()) == [(True, True)]
    finally:
        signals.signal(signals.SIGTERM, previous)


def test_single_process_never_imports_dask(tiny_teacher_checkpoint, archive, tmp_path):
    code = (
        "import sys; from seglib.predict import main; "
        f"rc = main(['--input', {str(archive / 'tile_00000.tif')!r}, '--k', '3', '--output', {str(tmp_path)!r}, "
        f"'--checkpoint', {str(tiny_teacher_checkpoint)!r}, '--quiet', '--overviews', '--mosaic', "
        f"{str(tmp_path / 'm.vrt')!r}]); "
        "assert rc == 0, rc; bad = [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "m.vrt").is_file()


def test_overviews_and_vrt_input(tiny_teacher_model, archive, tmp_path):
    from seglib.inference.engine import segment_raster
    from seglib.inference.predictor import Predictor
    from seglib.inference.windows import Tiling
    from seglib.io.vrt import write_vrt

    vrt = write_vrt(tmp_path / "in.vrt", [archive / f"tile_{i:05d}.tif" for i in (0, 1, 8, 9)])
    one = tmp_path / "one.tif"
    with rasterio.open(vrt) as src:  # the same pixels as one GeoTIFF
        write_geotiff(one, np.moveaxis(src.read(), 0, -1), left=src.transform.c, top=src.transform.f)
    torch.set_num_threads(1)
    predictor = Predictor(tiny_teacher_model, K)
    a = segment_raster(vrt, tmp_path / "a.tif", predictor, tiling=Tiling(64, 16), progress=False)
    b = segment_raster(one, tmp_path / "b.tif", predictor, tiling=Tiling(64, 16), progress=False, overviews=True)
    assert np.array_equal(_labels(a), _labels(b))
    with rasterio.open(b) as src:
        assert src.overviews(1) == [] and src.height == 128  # 128 px: no overview needed
    big = tmp_path / "big.tif"
    write_geotiff(big, np.zeros((600, 520, 3), np.uint8) + 90, left=0.0, top=0.0)
    out = segment_raster(
        big, tmp_path / "c.tif", Predictor(tiny_teacher_model, 2), tiling=Tiling(256, 32), progress=False,
        overviews=True,
    )  # fmt: skip
    with rasterio.open(out) as src:
        assert src.overviews(1) == [2, 4] and set(np.unique(src.read(1, out_shape=(150, 130)))) <= {0, 1}


def test_write_vrt_refuses_what_it_cannot_place(archive, tmp_path):
    from seglib.io.vrt import VrtError, write_vrt

    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", height=8, width=8, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(VrtError, match="plain.tif: not georeferenced"):
        write_vrt(tmp_path / "m.vrt", [archive / "tile_00000.tif", plain])
    other = tmp_path / "other.tif"
    with rasterio.open(archive / "tile_00001.tif") as src:
        profile = src.profile | {"crs": "EPSG:4326"}
        data = src.read()
    with rasterio.open(other, "w", **profile) as dst:
        dst.write(data)
    with pytest.raises(VrtError, match="other.tif: CRS"):
        write_vrt(tmp_path / "m.vrt", [archive / "tile_00000.tif", other])
    assert not (tmp_path / "m.vrt").exists()


def test_a_mosaic_of_png_labels_is_refused_naming_the_fix(tiny_teacher_checkpoint, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    args = ["--input", tmp_path / "in", "--k", 3, "--checkpoint", tiny_teacher_checkpoint, "--quiet"]
    assert _run(*args, "--output", tmp_path / "out", "--mosaic", tmp_path / "out" / "m.vrt") == 1
    err = capsys.readouterr().err
    assert "no GeoTIFF to mosaic" in err and "drop --mosaic or give GeoTIFFs" in err
    assert (tmp_path / "out" / "a.png").is_file() and not (tmp_path / "out" / "m.vrt").exists()


def test_inputs_by_glob(archive):
    from seglib.io.images import ImageReadError, list_inputs

    assert [p.name for p in list_inputs(archive / "tile_0000[0-2].tif")] == [f"tile_0000{i}.tif" for i in range(3)]
    with pytest.raises(ImageReadError, match="no images match"):
        list_inputs(archive / "nothing_*.tif")
