"""What a GIS analyst needs next: one legend for many images, stable ids, a legend file,
polygons, and K chosen without labels."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from seglib.evaluation.scores import dataset_confusion
from seglib.inference.engine import fit_source_clusters
from seglib.inference.kselect import AUTO_RULE, check_k_range, choose_k, k_statistics, label_agreement, pick_k
from seglib.inference.legend import (
    LegendFileError,
    embed_windows,
    fit_embeddings,
    fit_sources,
    load_legend,
    model_fingerprint,
)
from seglib.inference.predictor import Predictor
from seglib.inference.windows import Tiling
from seglib.io.rasters import ArraySource
from seglib.models.head import Clusters, brightness_order

rasterio = pytest.importorskip("rasterio")
fiona = pytest.importorskip("fiona")
from scipy import ndimage  # noqa: E402
from test_raster import LocalTeacher, smooth_image, tiny_teacher, write_geotiff  # noqa: E402

from seglib.inference.vector import MinArea, parse_min_area, polygonize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FIT = Tiling(128, 32, fit_pixels=4 << 20)


def blocks(colours, size: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 (size, size, 3): a 4x4 grid of flat squares coloured from ``colours``."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(len(colours), size=(4, 4))
    grid[0, : len(colours)] = np.arange(len(colours))  # every colour present
    cell = size // 4
    return np.asarray(colours, np.uint8)[np.kron(grid, np.ones((cell, cell), int))]


# ----------------------------------------------------------------------------- shared clusters


def test_joint_fit_over_windows_is_the_models_grouped_fit():
    """fit_embeddings over windows embedded one at a time == model.fit_clusters on the batch."""
    model, img = tiny_teacher(), smooth_image(256, seed=3)
    model.head.size_prior = 3.0
    source = ArraySource(img)
    ref = fit_source_clusters(Predictor(model, 5), source, tiling=Tiling(128, 32))
    windows = Tiling(128, 32, fit_windows=16, fit_pixels=4 << 20, seed=0).sample_windows(256, 256, 4)
    embs, _ = embed_windows(model, source, windows)
    fit = fit_embeddings(model.head, embs, 5)
    out = Clusters(fit.prototypes, fit.bias).ordered()
    torch.testing.assert_close(out.prototypes, ref.prototypes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.bias, ref.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.numeric
def test_shared_legend_gives_one_colour_one_label_in_every_image():
    """Two images with the same four colours in different layouts (and one without the
    darkest): with shared clusters each colour gets the same label in every image, and labels
    follow brightness (0 = darkest)."""
    model = LocalTeacher()
    colours = [(20, 30, 40), (90, 160, 60), (170, 150, 120), (240, 240, 230)]
    a, b = blocks(colours, seed=1), blocks(colours[1:], seed=2)
    fitted = fit_sources(model, [ArraySource(a), ArraySource(b)], 4, tiling=FIT)
    assert fitted.k == 4 and fitted.bias is None
    assert np.all(np.diff(fitted.colours.sum(1)) > 0)  # the stable order: darkest first
    clusters = fitted.head_clusters()
    for img, present in ((a, colours), (b, colours[1:])):
        probs = Predictor(model, 4, clusters=clusters).probs(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
        labels = probs[0].argmax(0).numpy()
        for colour in present:
            inside = np.all(img == colour, axis=-1)
            inside = ndimage.binary_erosion(inside, iterations=6)  # away from the guided filter's edges
            assert np.all(labels[inside] == colours.index(colour))


def test_brightness_order_is_a_function_of_the_prototypes():
    protos = torch.randn(6, 11)
    order = brightness_order(protos)
    np.testing.assert_array_equal(np.sort(order), np.arange(6))
    brightness = protos[:, -3:].sum(1).numpy()
    assert np.all(np.diff(brightness[order]) >= 0)
    shuffled = protos[torch.randperm(6)]
    np.testing.assert_array_equal(shuffled[brightness_order(shuffled)].numpy(), protos[order].numpy())


def test_clusters_file_round_trips_exactly_and_refuses_another_model_or_k(tmp_path):
    model = tiny_teacher()
    model.head.size_prior = 3.0
    fitted = fit_sources(model, [ArraySource(smooth_image(128, seed=1))], 4, tiling=FIT)
    path = fitted.save(tmp_path / "legend.json")
    data = json.loads(path.read_text())
    assert data["format"] == "seglib-clusters" and data["k"] == 4 and len(data["prototypes"]) == 4
    back = load_legend(path, model=model, k=4)
    np.testing.assert_array_equal(back.prototypes, fitted.prototypes)  # float32 through JSON, bit for bit
    np.testing.assert_array_equal(back.bias, fitted.bias)
    assert back.fingerprint == model_fingerprint(model)
    with pytest.raises(LegendFileError, match="K = 4 clusters, but K = 5"):
        load_legend(path, model=model, k=5)
    with pytest.raises(LegendFileError, match="another model"):
        load_legend(path, model=tiny_teacher(seed=1))  # same architecture, other weights
    other = tiny_teacher()
    other.head.size_prior = 1.0  # same weights, other head settings
    with pytest.raises(LegendFileError, match="another model"):
        load_legend(path, model=other)
    with pytest.raises(LegendFileError, match="another model"):
        load_legend(path, model=tiny_teacher(embed_dim=12))  # other embedding width
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(LegendFileError, match="not a seglib legend file"):
        load_legend(tmp_path / "bad.json")
    data["prototypes"][0][0] = "x"
    (tmp_path / "edit.json").write_text(json.dumps(data))
    with pytest.raises(LegendFileError, match="prototypes"):
        load_legend(tmp_path / "edit.json")


def test_fingerprint_ignores_the_device_but_not_the_weights():
    model = tiny_teacher()
    before = model_fingerprint(model)
    assert model_fingerprint(tiny_teacher()) == before  # same seed, same weights
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert model_fingerprint(model) != before


def test_dataset_confusion_sums_images_and_skips_ignored_pixels():
    preds = [np.array([[0, 1], [1, 1]]), np.array([[1, 0], [0, 0]])]
    gts = [np.array([[3, 4], [4, 255]]), np.array([[4, 3], [3, 255]])]
    matrix = dataset_confusion(preds, gts, 2, np.array([3, 4]))
    np.testing.assert_array_equal(matrix, [[3, 0], [0, 3]])


# ----------------------------------------------------------------------------- K chosen for the user


def test_k_range_is_validated():
    assert check_k_range("3..7") == (3, 7) and check_k_range((2, 16)) == (2, 16)
    for bad in ("1..5", "5..5", "2..17", "two", (4,)):
        with pytest.raises(ValueError, match="K range"):
            check_k_range(bad)


def test_k_rules_on_known_statistics():
    dist = {2: 1.0, 3: 0.5, 4: 0.45, 5: 0.44}
    stats = {
        k: {
            "distortion": d,
            "silhouette": {2: 0.3, 3: 0.6, 4: 0.4, 5: 0.2}[k],
            "calinski_harabasz": {2: 5.0, 3: 9.0, 4: 7.0, 5: 6.0}[k],
            "davies_bouldin": {2: 1.0, 3: 0.5, 4: 0.7, 5: 0.9}[k],
            "min_share": {2: 0.4, 3: 0.2, 4: 0.01, 5: 0.001}[k],
            "flip_agreement": {2: 1.0, 3: 0.97, 4: 0.8, 5: 0.7}[k],
            "gap": {2: 0.1, 3: 0.5, 4: 0.5, 5: 0.5}[k],
            "gap_sd": 0.01,
        }
        for k, d in dist.items()
    }
    stats[2]["distortion_below"] = 2.0
    assert pick_k(stats, "silhouette") == 3
    assert pick_k(stats, "calinski_harabasz") == 3
    assert pick_k(stats, "davies_bouldin") == 3
    assert pick_k(stats, "elbow", 0.8) == 3  # 0.45 / 0.5 = 0.9: the 4th cluster gains little
    assert pick_k(stats, "min_share", 0.05) == 3
    assert pick_k(stats, "flip_agreement", 0.95) == 3
    assert pick_k(stats, "gap") == 3
    with pytest.raises(ValueError, match="unknown K rule"):
        pick_k(stats, "astrology", 0.5)


@pytest.mark.numeric
def test_auto_k_follows_the_number_of_colours():
    """Flat squares of 2..6 well-separated colours. Fitted at the top of the range (K = 8, more
    clusters than colours), the statistics count one cluster per colour, with the colours' area
    shares exactly: prototypes left on one colour are one cluster, whatever the CPU's rounding
    (on an AVX2 CPU, unmerged, two colours read as K = 3). The shipped rule then picks
    round(0.8 * effective number of colours): two colours give K = 2, more colours never fewer
    clusters, every pick within one of the number of colours. The statistics of every K of the
    range are returned."""
    model = LocalTeacher()
    rule, theta = AUTO_RULE
    assert rule == "effective"  # the expected picks below are this rule's
    colours = [(30, 40, 120), (60, 170, 60), (230, 220, 200), (200, 60, 50), (120, 120, 120), (250, 200, 40)]
    picks = {}
    for n in range(2, 7):
        grid = np.random.default_rng(4).integers(n, size=(3, 3))
        grid.flat[:n] = np.arange(n)  # every colour present
        img = np.asarray(colours[:n], np.uint8)[np.kron(grid, np.ones((128, 128), int))]  # (384, 384, 3)
        picks[n], stats = choose_k(model, [ArraySource(img)], tiling=replace(FIT, tile=384), k_range=(2, 8))
        assert sorted(stats) == list(range(2, 9))
        true_shares = np.sort(np.bincount(grid.ravel()) / grid.size)[::-1]
        np.testing.assert_allclose(stats[8]["shares"], np.pad(true_shares, (0, 8 - n)), atol=1e-9)
        effective = theta * np.exp(-(true_shares * np.log(true_shares)).sum())
        assert abs(effective % 1 - 0.5) > 0.01, effective  # not on a rounding tie: the pick is exact
        assert picks[n] == max(2, round(effective)), (n, effective, picks)
    assert picks[2] == 2 and all(abs(k - n) <= 1 for n, k in picks.items()), picks
    assert list(picks.values()) == sorted(picks.values()), picks


@pytest.mark.numeric
def test_k_statistics_flip_agreement_is_one_on_a_symmetric_image():
    model = LocalTeacher()
    half = blocks([(30, 40, 120), (230, 220, 200)], size=64, seed=5)
    img = np.concatenate([half, half[:, ::-1]], 1)  # mirror-symmetric
    source = ArraySource(img)
    windows = [(0, 0, 64, 128)]
    embs, _ = embed_windows(model, source, windows)
    flipped, _ = embed_windows(model, source, windows, flip=True)
    stats = k_statistics(model.head, embs, [2], flipped=flipped)
    assert stats[2]["flip_agreement"] == pytest.approx(1.0)


def test_label_agreement_matches_ids_one_to_one():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (20, 30)).astype(np.uint8)  # uint8 labels, as the rasters hold them
    assert label_agreement(a, np.array([2, 0, 3, 1], np.uint8)[a], 4) == 1.0  # the same partition, other ids
    merged = np.where(a == 3, 2, a)  # two clusters made one: the smaller of the two disagrees
    assert label_agreement(a, merged, 4) == (a.size - min((a == 2).sum(), (a == 3).sum())) / a.size


# ----------------------------------------------------------------------------- polygons


def _components(labels: np.ndarray) -> int:
    return sum(ndimage.label(labels == v)[1] for v in np.unique(labels))  # 4-connected


def _features(path) -> tuple[list, object]:
    with fiona.open(path) as src:
        return list(src), src.crs


@pytest.mark.parametrize("min_area", [None, "3px", "2.5"])
def test_polygons_tile_the_raster_one_feature_per_segment(tmp_path, min_area):
    """GeoPackage: the input's CRS, one feature per 4-connected segment after the sieve, and
    areas that add up to the raster's (0.25 m2 pixels)."""
    rng = np.random.default_rng(0)
    labels = ndimage.zoom(rng.integers(0, 4, (12, 10)), 8, order=0).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.02] = 5  # specks for the sieve
    write_geotiff(tmp_path / "labels.tif", labels[..., None])
    area = parse_min_area(min_area) if min_area else None
    info = polygonize(tmp_path / "labels.tif", tmp_path / "seg.gpkg", min_area=area)
    features, crs = _features(tmp_path / "seg.gpkg")
    assert crs.to_epsg() == 32640
    expected = labels
    if area is not None:
        assert info["min_pixels"] == (3 if area.pixels else 10)  # 2.5 m2 / 0.25 m2
        expected = rasterio.features.sieve(labels, info["min_pixels"], connectivity=4)
        assert min(f["properties"]["pixels"] for f in features) >= info["min_pixels"]
    assert len(features) == info["features"] == _components(expected)
    total = sum(f["properties"]["area"] for f in features)
    assert abs(total - labels.size * 0.25) <= 0.25 * len(features)
    for f in features:
        assert f["properties"]["area"] == pytest.approx(f["properties"]["pixels"] * 0.25)
    assert not list(tmp_path.glob(".*tmp*"))


def test_windowed_prediction_gives_the_same_polygons_as_the_whole_raster(tmp_path):
    """A raster predicted in 128 px windows and in one piece (shared clusters): the same label
    raster, so the same polygons; segments crossing window edges are single features. The
    model double reaches 4 px around a pixel (no denoising, no guided filter), so its windows
    compute exactly what the whole raster computes (docs/inference.md measures the bundled one)."""
    from seglib.inference.engine import segment_raster

    model, k = LocalTeacher(), 4
    model.head.denoise_iters = 0
    img = smooth_image(320, seed=7)[:300, :290]
    write_geotiff(tmp_path / "in.tif", img)
    fitted = fit_source_clusters(Predictor(model, k, lane="none"), ArraySource(img), tiling=Tiling(128, 48))
    for name, tile in (("win", 128), ("whole", 320)):
        segment_raster(
            tmp_path / "in.tif",
            tmp_path / f"{name}.tif",
            Predictor(model, k, lane="none", clusters=fitted),
            tiling=Tiling(tile, 48),
        )
    polys = {}
    for name in ("win", "whole"):
        polygonize(tmp_path / f"{name}.tif", tmp_path / f"{name}.gpkg", min_area=MinArea(4, pixels=True))
        features, _ = _features(tmp_path / f"{name}.gpkg")
        polys[name] = sorted((f["properties"]["label"], f["properties"]["pixels"], str(f.geometry)) for f in features)
    with rasterio.open(tmp_path / "win.tif") as a, rasterio.open(tmp_path / "whole.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    assert polys["win"] == polys["whole"]
    # Segments wider than a window's step exist, so window edges really cut through some.
    assert max(p[1] for p in polys["win"]) > 128 * 40


def test_min_area_parsing():
    assert parse_min_area("12px") == MinArea(12.0, True)
    assert parse_min_area("50") == MinArea(50.0, False)
    assert MinArea(50.0).to_pixels(0.25) == 200 and MinArea(1.0).to_pixels(0.3) == 4
    for bad in ("-1", "ten", "nan"):
        with pytest.raises(ValueError, match="min-area"):
            parse_min_area(bad)


# ----------------------------------------------------------------------------- the command line


def _sample_geotiffs(folder, n: int = 2) -> list:
    """The first ``n`` shipped sample tiles as UTM GeoTIFFs (0.5 m pixels)."""
    from seglib.io.images import read_image
    from seglib.paths import SAMPLE_IMAGES

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sorted(SAMPLE_IMAGES.iterdir())[:n]:
        paths.append(folder / f"{src.stem}.tif")
        write_geotiff(paths[-1], read_image(src)[0])
    return paths


def _predict(capsys, *args) -> tuple[int, str]:
    from seglib.predict import main

    code = main(["--threads", "1", "--quiet", *map(str, args)])
    return code, capsys.readouterr().out


def test_predict_twice_gives_byte_identical_labels_with_a_colour_table(tmp_path, capsys):
    """The bundled model, a GeoTIFF predicted in 256 px windows: two runs write the same bytes
    (labels, legend, style); the colour table has the K labels only (mean colours by default,
    tests/test_outputs.py), the categorical palette on request, and K is a tag."""
    from seglib.viz import PALETTE

    (tif,) = _sample_geotiffs(tmp_path / "in", 1)
    for run in ("a", "b"):
        assert _predict(capsys, "--input", tif, "--k", 6, "--output", tmp_path / run, "--tile", 256)[0] == 0
    for name in (tif.name, tif.name + ".aux.xml", tif.stem + ".qml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert _predict(capsys, "--input", tif, "--k", 6, "--output", tmp_path / "c", "--tile", 256,
                    "--colours", "categorical")[0] == 0  # fmt: skip
    with rasterio.open(tmp_path / "c" / tif.name) as src:
        colormap, tags = src.colormap(1), src.tags(1)
        assert src.read(1).max() < 6
    assert [colormap[i][:3] for i in range(6)] == [tuple(c) for c in PALETTE[:6].tolist()] and len(colormap) == 6
    assert tags["seglib_k"] == "6"


def test_shared_legend_saved_reused_and_polygonised(tmp_path, capsys):
    """--shared-legend over a folder saves one legend; --legend gives a later run the same
    labels; --vector gpkg writes polygons in the input's CRS that tile the raster."""
    tifs = _sample_geotiffs(tmp_path / "in", 2)
    code, _ = _predict(capsys, "--input", tmp_path / "in", "--k", 5, "--output", tmp_path / "shared",
                       "--shared-legend", "--save-legend", tmp_path / "legend.json",
                       "--vector", "gpkg", "--min-area", "2")  # fmt: skip
    assert code == 0
    legend = json.loads((tmp_path / "legend.json").read_text())
    assert legend["k"] == 5 and legend["meta"]["files"] == [t.name for t in tifs]
    code, _ = _predict(capsys, "--input", tifs[1], "--legend", tmp_path / "legend.json", "--output", tmp_path / "later")
    assert code == 0
    assert (tmp_path / "later" / tifs[1].name).read_bytes() == (tmp_path / "shared" / tifs[1].name).read_bytes()
    for tif in tifs:
        with rasterio.open(tmp_path / "shared" / tif.name) as src:
            labels, pixel_area = src.read(1), abs(src.transform.a * src.transform.e)
        features, crs = _features(tmp_path / "shared" / f"{tif.stem}.gpkg")
        assert crs.to_epsg() == 32640
        sieved = rasterio.features.sieve(labels, 8, connectivity=4)  # 2 m2 of 0.25 m2 pixels
        assert len(features) == _components(sieved)
        assert abs(sum(f["properties"]["area"] for f in features) - labels.size * pixel_area) <= pixel_area * len(
            features
        )


def test_k_auto_reports_the_k_of_every_file(tmp_path, capsys):
    tifs = _sample_geotiffs(tmp_path / "in", 2)
    code, out = _predict(capsys, "--input", tmp_path / "in", "--k", "auto", "--output", tmp_path / "out")
    assert code == 0
    for tif in tifs:
        (line,) = [x for x in out.splitlines() if x.startswith(str(tif))]
        k = int(line.split("(K=")[1].split(" ")[0])
        assert 2 <= k <= 8 and "auto" in line
        with rasterio.open(tmp_path / "out" / tif.name) as src:
            assert src.read(1).max() < k and src.tags(1)["seglib_k"] == str(k)
    code, out = _predict(capsys, "--input", tmp_path / "in", "--k", "auto", "--shared-legend",
                         "--output", tmp_path / "one")  # fmt: skip
    assert code == 0 and "shared legend: K=" in out and "(auto, effective@0.8)" in out


# ----------------------------------------------------------------------------- the evaluations


def test_eval_shared_clusters_reports_both_fits_and_baselines(tmp_path):
    """The acceptance command on the three sample tiles: shared and per-image fits of the model
    and of RGB k-means, each with a dataset-level and a per-image Hungarian mIoU."""
    from seglib.eval import main
    from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS

    out = tmp_path / "shared.json"
    code = main(["--images", str(SAMPLE_IMAGES), "--masks", str(SAMPLE_MASKS), "--k", "4", "--ignore", "5,255",
                 "--shared-legend", "--no-random-init", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 3 and result["k"] == 4
    for method in ("model", "rgb_kmeans"):
        for mode in ("shared", "per_image"):
            scores = result[method][mode]
            assert 0 < scores["dataset_miou"] <= 1 and 0 < scores["mean_image_miou"] <= 1
