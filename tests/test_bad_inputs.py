"""One test per row of docs/bad-inputs.md: every odd input either fails with a message that
names the problem and the fix, or is converted by a documented, logged policy."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

import seglib
from seglib.data.synthetic import make_tile
from seglib.inference.engine import segment_raster
from seglib.inference.predictor import Predictor
from seglib.inference.windows import Tiling
from seglib.io.images import ImageReadError, read_image

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 2700000.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_teacher_model):
    return tiny_teacher_model


@pytest.fixture(scope="module")
def checkpoint(tiny_teacher_checkpoint):
    return tiny_teacher_checkpoint


def rgb_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return (make_tile(-(-max(h, w) // 4) * 4, seed=seed).rgb[:h, :w] * 255).round().astype(np.uint8)


def write_geotiff(path, bands: np.ndarray, **profile) -> None:
    h, w, c = bands.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=h, width=w, count=c, dtype=bands.dtype, crs="EPSG:32640", transform=TRANSFORM,
        **profile,
    ) as dst:  # fmt: skip
        dst.write(np.moveaxis(bands, -1, 0))


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "seglib.predict", "--threads", "1", "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


# ----------------------------------------------------------------------------- band layout


def test_wrong_band_count(tmp_path, model):
    write_geotiff(tmp_path / "five.tif", np.zeros((16, 16, 5), np.uint16))
    with pytest.raises(ImageReadError, match=r"five.tif: 5 bands.*gdal_translate -b 3 -b 2 -b 1"):
        read_image(tmp_path / "five.tif")
    with pytest.raises(ImageReadError, match="5 bands"):
        segment_raster(tmp_path / "five.tif", tmp_path / "out.tif", Predictor(model, 3), progress=False)
    with pytest.raises(ValueError, match=r"3 channels.*image\[\.\.\., \[r, g, b\]\]"):
        seglib.segment(np.zeros((16, 16, 5), np.uint8), 3, model)


def test_grayscale(tmp_path, model, caplog):
    grey = rgb_image()[..., 1]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    write_geotiff(tmp_path / "grey.tif", grey[..., None])
    with caplog.at_level(logging.INFO):
        rgb, notes = read_image(tmp_path / "grey.png")
        segment_raster(
            tmp_path / "grey.tif", tmp_path / "out.tif", Predictor(model, 3), tiling=Tiling(64, 16), progress=False
        )
    assert rgb.shape == (48, 64, 3) and (rgb == grey[..., None]).all()
    assert notes == ["grayscale: replicated to 3 channels"]
    assert sum("grayscale: replicated" in r.getMessage() for r in caplog.records) == 2  # PNG and GeoTIFF
    for arr in (grey, grey[..., None]):
        with pytest.raises(ValueError, match=r"grayscale.*np\.repeat"):
            seglib.segment(arr, 3, model)


def test_rgba(tmp_path, model, caplog):
    """RGB + NIR: band 4 ignored. (An alpha band is a mask: tests/test_real_rasters.py.)"""
    rgba = np.concatenate([rgb_image(), np.full((48, 64, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    write_geotiff(tmp_path / "rgbn.tif", rgba, photometric="RGB")  # band 4 undefined: NIR, not alpha
    with caplog.at_level(logging.INFO):
        rgb, notes = read_image(tmp_path / "rgba.png")
        segment_raster(
            tmp_path / "rgbn.tif", tmp_path / "out.tif", Predictor(model, 3), tiling=Tiling(64, 16), progress=False
        )
    np.testing.assert_array_equal(rgb, rgba[..., :3])
    assert "band 4 (alpha or NIR) ignored" in notes[0]
    assert any("rgbn.tif: 4 bands" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"drop alpha.*image\[\.\.\., :3\]"):
        seglib.segment(rgba, 3, model)


def test_16bit(tmp_path, model, caplog):
    data = (rgb_image().astype(np.uint16) * 200 + 1000)[..., :3]
    Image.fromarray(data[..., 0]).save(tmp_path / "grey16.png")  # Pillow writes mode I;16
    write_geotiff(tmp_path / "rgb16.tif", data)
    with caplog.at_level(logging.INFO):
        png, notes = read_image(tmp_path / "grey16.png")
        out = segment_raster(
            tmp_path / "rgb16.tif", tmp_path / "out.tif", Predictor(model, 3), tiling=Tiling(64, 16), progress=False
        )
    assert png.dtype == np.uint8 and png.min() == 0 and png.max() == 255
    assert any("stretched per band from the 2nd-98th percentile" in n for n in notes)
    assert any("percentile of an overview" in r.getMessage() for r in caplog.records)  # one stretch for all windows
    with rasterio.open(out) as dst:
        assert dst.read(1).max() < 3
    with pytest.raises(ValueError, match=r"16-bit.*to_uint8_rgb"):
        seglib.segment(data, 3, model)


# ----------------------------------------------------------------------------- files and folders


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "cut.tif"])
def test_corrupt_file(tmp_path, model, name):
    path = tmp_path / name
    if name.endswith(".tif"):
        write_geotiff(path, np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
    truncate(path)
    with pytest.raises(ImageReadError, match=rf"{name}: cannot decode.*corrupt or truncated"):
        if name.endswith(".tif"):
            segment_raster(path, tmp_path / "out.tif", Predictor(model, 3), tiling=Tiling(64, 16), progress=False)
        else:
            read_image(path)


def test_corrupt_file_in_a_folder_is_reported_and_skipped(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(rgb_image()).save(src / "a_good.png")
    Image.fromarray(rgb_image(seed=1)).save(src / "b_bad.jpg")
    truncate(src / "b_bad.jpg")
    Image.fromarray(rgb_image(seed=2)).save(src / "c_good.png")
    run = run_cli("--input", str(src), "--k", "3", "--output", str(tmp_path / "out"), "--checkpoint", str(checkpoint))
    assert run.returncode == 1
    assert "FAILED" in run.stderr and "b_bad.jpg" in run.stderr and "1 of 3 file(s) failed" in run.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a_good.png", "c_good.png"]
    assert not list((tmp_path / "out").glob("b_bad*"))  # nothing of the failed file, not even its legend
    single = run_cli("--input", str(src / "b_bad.jpg"), "--k", "3", "--output", str(tmp_path / "o2"),
                     "--checkpoint", str(checkpoint))  # fmt: skip
    assert single.returncode == 1 and "b_bad.jpg: cannot decode" in single.stderr


def test_empty_folder(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    run = run_cli("--input", str(tmp_path / "empty"), "--k", "3", "--output", str(tmp_path / "out"))
    assert run.returncode == 2
    assert "no images in" in run.stderr and ".png" in run.stderr
    assert not (tmp_path / "out").exists()


def test_image_smaller_than_a_tile(tmp_path, model):
    small = rgb_image(20, 30)
    labels = seglib.segment(small, 4, model)  # default tile 1024
    assert labels.shape == (20, 30) and labels.max() < 4
    write_geotiff(tmp_path / "small.tif", small)
    out = segment_raster(tmp_path / "small.tif", tmp_path / "out.tif", Predictor(model, 4), progress=False)
    with rasterio.open(out) as dst:
        assert (dst.height, dst.width) == (20, 30)
    assert seglib.segment(small[:1, :1], 2, model).shape == (1, 1)  # a single pixel still works


# ----------------------------------------------------------------------------- K


def test_k_out_of_range(tmp_path, model):
    for k in (0, 1, 17):
        with pytest.raises(ValueError, match=r"K must be in 2\.\.16"):
            seglib.segment(rgb_image(), k, model)
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb_image()).save(tmp_path / "in" / "a.png")
    run = run_cli("--input", str(tmp_path / "in"), "--k", "17", "--output", str(tmp_path / "out"))
    assert run.returncode == 2 and "K must be in 2..16" in run.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_k_not_an_integer(tmp_path, model):
    for k in (2.5, "4", True, None):
        with pytest.raises(ValueError, match=r"K must be an integer in 2\.\.16"):
            seglib.segment(rgb_image(), k, model)
    assert seglib.segment(rgb_image(), np.int64(3), model).max() < 3  # NumPy integers are fine
    run = run_cli("--input", str(tmp_path), "--k", "four", "--output", str(tmp_path / "out"))
    assert run.returncode == 2 and "K must be an integer in 2..16, got 'four'" in run.stderr


# ----------------------------------------------------------------------------- pixel values


def test_float_outside_unit_range(model):
    with pytest.raises(ValueError, match=r"\[0, 1\].*image / 255"):
        seglib.segment(rgb_image().astype(np.float32), 3, model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        seglib.segment(rgb_image().astype(np.float64) / 255 - 0.1, 3, model)


def test_nan_or_inf_pixels(tmp_path, model, caplog):
    for bad in (np.nan, np.inf):
        img = rgb_image().astype(np.float32) / 255
        img[5, 7, 1] = bad
        with pytest.raises(ValueError, match=r"NaN or inf.*np\.nan_to_num"):
            seglib.segment(img, 3, model)
    img[5, 7, 1] = np.nan
    labels = seglib.segment(img, 3, model, mask=np.isfinite(img).all(-1))  # or mark them as nodata
    assert labels[5, 7] == 255 and (np.delete(labels.ravel(), 5 * 64 + 7) < 3).all()
    write_geotiff(tmp_path / "nan.tif", img)  # a float raster with a missing pixel: nodata
    with caplog.at_level(logging.INFO):
        segment_raster(
            tmp_path / "nan.tif", tmp_path / "out.tif", Predictor(model, 3), tiling=Tiling(64, 16), progress=False
        )
    assert any("NaN/inf pixels: nodata" in r.getMessage() for r in caplog.records)
    with rasterio.open(tmp_path / "out.tif") as dst:
        out = dst.read(1)
    assert dst.nodata == 255 and out[5, 7] == 255 and (out < 3).sum() == out.size - 1


@pytest.mark.parametrize("h,w", [(37, 53), (1, 9), (63, 4)])
def test_size_not_divisible_by_the_stride(model, h, w):
    labels, probs = seglib.segment(rgb_image(h, w), 3, model, return_probs=True)
    assert labels.shape == (h, w) and probs.shape == (3, h, w)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)


# ----------------------------------------------------------------------------- array shape and type


@pytest.mark.parametrize(
    "bad,match",
    [
        ([[[0, 0, 0]]], r"NumPy array.*np\.asarray"),
        (torch.zeros(8, 8, 3), r"NumPy array.*numpy\(\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"shape \(H, W, 3\).*4 dimensions"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.zeros((3, 32, 32), np.uint8), r"channel-first.*np\.moveaxis"),
        (np.zeros((8, 8, 2), np.uint8), r"grayscale \+ alpha"),
        (np.zeros((8, 8, 3), np.int64), r"dtype int64.*uint8"),
        (np.zeros((8, 8, 3), bool), "dtype bool"),
    ],
)
def test_array_shape_and_dtype(model, bad, match):
    with pytest.raises(ValueError, match=match):
        seglib.segment(bad, 3, model)


def test_unusable_arguments_fail_before_any_work(tmp_path, model):
    with pytest.raises(ValueError, match="overlap"):
        seglib.segment(rgb_image(), 3, model, tile=64, overlap=40)
    with pytest.raises(ValueError, match="lane"):
        seglib.segment(rgb_image(), 3, model, lane="smooth")
    (tmp_path / "a.bmp").write_bytes(b"BM")
    run = run_cli("--input", str(tmp_path / "a.bmp"), "--k", "3", "--output", str(tmp_path / "out"),
                  "--checkpoint", str(tmp_path / "missing.pt"))  # fmt: skip
    assert run.returncode == 2 and "unsupported file type '.bmp'" in run.stderr
    (tmp_path / "a.png").write_bytes(b"")
    run = run_cli("--input", str(tmp_path / "a.png"), "--k", "3", "--output", str(tmp_path / "out"),
                  "--checkpoint", str(tmp_path / "missing.pt"))  # fmt: skip
    assert run.returncode == 2 and "checkpoint not found" in run.stderr


# ----------------------------------------------------------------------------- GIS outputs


def test_unknown_vector_format(tmp_path, checkpoint):
    Image.fromarray(rgb_image()).save(tmp_path / "a.png")
    run = run_cli("--input", str(tmp_path / "a.png"), "--k", "3", "--output", str(tmp_path / "out"),
                  "--checkpoint", str(checkpoint), "--vector", "shp")  # fmt: skip
    assert run.returncode == 2 and "unknown vector format 'shp'; choose one of gpkg, geojson, fgb" in run.stderr
    run = run_cli("--input", str(tmp_path / "a.png"), "--k", "3", "--output", str(tmp_path / "out"),
                  "--checkpoint", str(checkpoint), "--min-area", "5")  # fmt: skip
    assert run.returncode == 2 and "--min-area sieves the polygons of --vector" in run.stderr
    assert not (tmp_path / "out").exists()


def test_clusters_file_of_another_model_or_k(tmp_path, model, checkpoint):
    """A legend file is refused, before any image is read, for another K (exit 2, 'drop --k')
    or another model (the bundled one here)."""
    Image.fromarray(rgb_image()).save(tmp_path / "a.png")
    seglib.fit_legend([rgb_image(seed=1)], 4, model).save(tmp_path / "legend.json")
    common = ["--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]
    run = run_cli(*common, "--legend", str(tmp_path / "legend.json"), "--k", "5", "--checkpoint", str(checkpoint))
    assert run.returncode == 2 and "K = 4 clusters, but K = 5 was asked for; drop --k" in run.stderr
    run = run_cli(*common, "--legend", str(tmp_path / "legend.json"))  # the bundled model
    assert run.returncode == 2 and "fitted with another model" in run.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="fitted with another model"):
        seglib.segment(rgb_image(), model=seglib.load_model(), legend=tmp_path / "legend.json")
    run = run_cli(*common, "--legend", str(tmp_path / "legend.json"), "--checkpoint", str(checkpoint))
    assert run.returncode == 0, run.stderr  # the model it was made with: fine, K from the file
    assert Image.open(tmp_path / "out" / "a.png").getextrema()[1] < 4


def test_k_range_for_auto(tmp_path, model):
    for bad in ("1..5", "6..6", "2..17", "two"):
        with pytest.raises(ValueError, match="K range"):
            seglib.segment(rgb_image(), "auto", model, k_range=bad)
    run = run_cli("--input", str(tmp_path), "--k", "auto", "--k-range", "9..3", "--output", str(tmp_path / "out"))
    assert run.returncode == 2 and "K range for auto must satisfy 2 <= lo < hi <= 16, got 9..3" in run.stderr
    Image.fromarray(rgb_image()).save(tmp_path / "a.png")
    run = run_cli("--input", str(tmp_path), "--k", "auto", "--legend", "x.json", "--output", str(tmp_path / "out"))
    assert run.returncode == 2 and "with --legend the file's K is used" in run.stderr
