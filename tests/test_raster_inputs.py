"""Rasters a demanding GIS user feeds in (docs/bad-inputs.md, "Real-world rasters", the rows of
issue 31): valid pixels the overview misses, RGBN GeoTIFFs, RPCs, world files and .aux.xml,
JPEG 2000, band colour tags, complex and unsupported data, a header that claims terabytes, and
polygons of rasters in pixel space. Every raster is written here, the way its row describes."""

from __future__ import annotations

import logging
import resource
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from test_real_rasters import TRANSFORM, agreement, labels_of, rgb_image, run_cli, write

import seglib
from seglib.inference.engine import segment_raster
from seglib.inference.predictor import Predictor
from seglib.inference.vector import MinArea, min_area_pixels, polygonize
from seglib.inference.windows import Tiling
from seglib.io.images import ImageReadError, read_image
from seglib.io.outputs import NODATA
from seglib.io.rasters import RasterSource

rasterio = pytest.importorskip("rasterio")
fiona = pytest.importorskip("fiona")
from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.rpc import RPC  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_teacher_model):
    return tiny_teacher_model


@pytest.fixture(scope="module")
def checkpoint(tiny_teacher_checkpoint):
    return tiny_teacher_checkpoint


def segment(path, out, model, k: int = 3, alpha: str = "auto"):
    out = segment_raster(path, out, Predictor(model, k), tiling=Tiling(128, 32), progress=False, alpha=alpha)
    return labels_of(out)[0]


# ----------------------------------------------------------------------------- valid pixels


def test_thin_strip_of_valid_pixels_outside_the_main_area_is_labelled(tmp_path, model, caplog):
    """2100 x 2100 px with nodata = 0: the overview (every 3rd column) misses a 2 px wide strip
    at columns 331-332, 31 px right of the main valid area; every valid pixel is labelled, and
    the log names the box as rows-then-columns."""
    data = np.zeros((2100, 2100, 3), np.uint8)
    data[:300, :300] = np.maximum(rgb_image(300, seed=5), 1)
    data[:300, 331:333] = 150
    write(tmp_path / "strip.tif", data, nodata=0)
    with caplog.at_level(logging.INFO, logger="seglib.inference.engine"):
        labels = segment(tmp_path / "strip.tif", tmp_path / "out.tif", model)
    valid = data.any(-1)
    assert int((labels[valid] == NODATA).sum()) == 0 and (labels[~valid] == NODATA).all()
    assert any("rows 0-300, columns 0-333" in r.getMessage() for r in caplog.records)


def rgbn(size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """RGB and a NIR band with zeros (water) and a continuous range elsewhere."""
    rgb = rgb_image(size, seed=6)
    nir = (255 - rgb.mean(-1)).astype(np.uint8)
    nir[: size // 4] = 0
    return rgb, nir


def test_rgbn_geotiff_written_with_gdal_defaults_is_not_masked_by_its_nir(tmp_path, model, caplog):
    """GDAL tags band 4 of a 4-band uint8 GeoTIFF alpha by default. A NIR band there holds a
    range of values, so it is ignored, not a mask: the labels are those of the RGB alone
    (100 % here; it was 67.7 %). ``alpha="yes"`` makes it a mask; a real 0/255 alpha stays one."""
    rgb, nir = rgbn()
    write(tmp_path / "rgb.tif", rgb)
    write(tmp_path / "rgbn.tif", np.concatenate([rgb, nir[..., None]], -1))
    with rasterio.open(tmp_path / "rgbn.tif") as src:
        assert src.colorinterp[3] == ColorInterp.alpha  # as GDAL writes it
    reference = segment(tmp_path / "rgb.tif", tmp_path / "a.tif", model)
    with caplog.at_level(logging.INFO):
        labels = segment(tmp_path / "rgbn.tif", tmp_path / "b.tif", model)
    assert agreement(labels, reference) >= 0.99 and (labels != NODATA).all()
    assert any("tagged alpha but holds a range of values" in r.getMessage() for r in caplog.records)
    masked = segment(tmp_path / "rgbn.tif", tmp_path / "c.tif", model, alpha="yes")
    np.testing.assert_array_equal(masked == NODATA, nir == 0)
    alpha = np.where(nir == 0, 0, 255).astype(np.uint8)
    write(tmp_path / "rgba.tif", np.concatenate([rgb, alpha[..., None]], -1))
    np.testing.assert_array_equal(segment(tmp_path / "rgba.tif", tmp_path / "d.tif", model) == NODATA, nir == 0)
    assert (segment(tmp_path / "rgba.tif", tmp_path / "e.tif", model, alpha="no") != NODATA).all()


def test_bands_tagged_blue_green_red_are_used_as_red_green_blue(tmp_path, model, caplog):
    rgb = rgb_image(96, seed=7)
    write(tmp_path / "rgb.tif", rgb)
    with rasterio.open(tmp_path / "bgr.tif", "w", driver="GTiff", height=96, width=96, count=3, dtype="uint8",
                       crs="EPSG:32640", transform=TRANSFORM) as dst:  # fmt: skip
        dst.write(np.moveaxis(rgb[..., ::-1], -1, 0))
        dst.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    with caplog.at_level(logging.INFO):
        labels = segment(tmp_path / "bgr.tif", tmp_path / "b.tif", model)
    np.testing.assert_array_equal(labels, segment(tmp_path / "rgb.tif", tmp_path / "a.tif", model))
    assert any("bands tagged blue, green, red: used as red = band 3" in r.getMessage() for r in caplog.records)


def test_float_nodata_far_outside_the_data_gives_no_raw_warning(tmp_path, model):
    """nodata = -3.4e38 (float32's lowest, a common GIS default) in a reflectance raster: kept
    out of the stretch arithmetic (no overflow warning), labelled nodata."""
    data = (rgb_image(96, seed=8) / 255 * 0.4).astype(np.float32)
    data[:20] = -3.4e38
    write(tmp_path / "refl.tif", data, nodata=-3.4e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = segment(tmp_path / "refl.tif", tmp_path / "out.tif", model)
    assert (labels[:20] == NODATA).all() and (labels[20:] != NODATA).all()


# ----------------------------------------------------------------------------- georeferencing


def test_rpcs_are_copied_to_the_output(tmp_path, model, caplog):
    rpcs = RPC(height_off=100, height_scale=500, lat_off=25.2, lat_scale=0.05, line_den_coeff=[1] + [0] * 19,
               line_num_coeff=[0, 0, -1] + [0] * 17, line_off=48, line_scale=48, long_off=55.3, long_scale=0.05,
               samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18, samp_off=48, samp_scale=48)  # fmt: skip
    write(tmp_path / "rpc.tif", rgb_image(96), crs=None, transform=None, rpcs=rpcs)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("error", rasterio.errors.NotGeoreferencedWarning)
        out = segment_raster(tmp_path / "rpc.tif", tmp_path / "out.tif", Predictor(model, 3), progress=False)
    with rasterio.open(out) as dst:
        assert dst.rpcs is not None and dst.rpcs.to_dict() == rpcs.to_dict() | {"err_bias": -1.0, "err_rand": -1.0}
    assert not any("not georeferenced" in r.getMessage() for r in caplog.records)


def world_file(transform) -> str:
    a, b, c, d, e, f = transform[:6]
    return "\n".join(map(str, (a, d, b, e, c + a / 2, f + e / 2))) + "\n"


def aux_xml(crs: str, transform=None) -> str:
    geo = "" if transform is None else f"<GeoTransform>{', '.join(map(str, transform.to_gdal()))}</GeoTransform>"
    wkt = rasterio.crs.CRS.from_string(crs).to_wkt().replace("&", "&amp;").replace("<", "&lt;")
    return f"<PAMDataset><SRS>{wkt}</SRS>{geo}</PAMDataset>"


@pytest.mark.parametrize("kind", ["png+pgw", "png+aux.xml", "jpg+jgw+aux.xml"])
def test_world_file_and_aux_xml_georeferencing_reaches_labels_and_polygons(tmp_path, model, kind):
    """A PNG/JPEG georeferenced by a world file or an .aux.xml: the label PNG has the same
    transform and CRS (world file and .aux.xml beside it, read back with rasterio), and so do
    its polygons."""
    image = rgb_image(96, seed=9)
    suffix = ".jpg" if kind.startswith("jpg") else ".png"
    src = tmp_path / f"scene{suffix}"
    Image.fromarray(image).save(src, quality=95) if suffix == ".jpg" else Image.fromarray(image).save(src)
    if "gw" in kind:
        src.with_suffix(".jgw" if suffix == ".jpg" else ".pgw").write_text(world_file(TRANSFORM))
    if "aux.xml" in kind:
        pam = aux_xml("EPSG:32640", None if "gw" in kind else TRANSFORM)
        src.with_name(src.name + ".aux.xml").write_text(pam)
    out = segment_raster(src, tmp_path / "out" / "scene.png", Predictor(model, 3), progress=False)
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.transform == a.transform == TRANSFORM
        assert b.crs == a.crs if "aux.xml" in kind else b.crs is None
    assert (tmp_path / "out" / "scene.pgw").is_file()
    polygonize(out, tmp_path / "out" / "scene.gpkg")
    with fiona.open(tmp_path / "out" / "scene.gpkg") as layer:
        left, bottom, right, top = layer.bounds
        assert (left, top) == (TRANSFORM.c, TRANSFORM.f) and (right, bottom) == TRANSFORM @ (96, 96)
        if "aux.xml" in kind:
            assert rasterio.crs.CRS.from_wkt(layer.crs_wkt).to_epsg() == 32640
    for sidecar in ("scene.pgw", "scene.jgw", f"scene{suffix}.aux.xml"):  # no longer georeferenced:
        (tmp_path / sidecar).unlink(missing_ok=True)  # the labels lose their world file and .aux.xml
    out = segment_raster(src, tmp_path / "out" / "scene.png", Predictor(model, 3), progress=False)
    assert not (tmp_path / "out" / "scene.pgw").exists()
    with rasterio.open(out) as b:  # its .aux.xml holds the legend, no CRS any more
        assert b.crs is None and b.transform.is_identity


def test_polygons_of_an_ungeoreferenced_image_are_in_pixel_space_right_way_up(tmp_path, model, caplog):
    """No CRS, no transform: polygons in pixel coordinates with y = -row, where QGIS shows the
    raster (its extent is 0, -H to W, 0), said in a warning; --min-area is in pixels, logged."""
    Image.fromarray(rgb_image(96, seed=10)).save(tmp_path / "photo.png")
    out = segment_raster(tmp_path / "photo.png", tmp_path / "photo_labels.png", Predictor(model, 3), progress=False)
    with caplog.at_level(logging.INFO, logger="seglib.inference.vector"):
        result = polygonize(out, tmp_path / "photo.gpkg", min_area=MinArea(20))
    with fiona.open(tmp_path / "photo.gpkg") as layer:
        assert layer.bounds == (0.0, -96.0, 96.0, 0.0) and not layer.crs_wkt
    assert result["crs"] is None and result["min_pixels"] == 20
    messages = [r.getMessage() for r in caplog.records]
    assert any("pixel coordinates: x = column, y = -row" in m for m in messages)
    assert any("--min-area 20 px" in m for m in messages)


def test_min_area_in_square_degrees_is_refused_with_its_units(tmp_path, checkpoint):
    """50 on EPSG:4326 is 50 square degrees, more than the raster: refused before it is
    segmented, naming the units and the fixes (pixels, a projected CRS)."""
    with pytest.raises(ValueError, match=r"50 square degrees .*geographic CRS.*12px.*projected CRS"):
        min_area_pixels(MinArea(50), rasterio.Affine(1e-5, 0, 55, 0, -1e-5, 25), rasterio.crs.CRS.from_epsg(4326),
                        (96, 96), "geo.tif")  # fmt: skip
    n, text = min_area_pixels(MinArea(50), TRANSFORM, rasterio.crs.CRS.from_epsg(32640), (96, 96), "utm.tif")
    assert n == 200 and "50 m2 (EPSG:32640 units) = 200 px" in text
    write(tmp_path / "geo.tif", rgb_image(96), crs="EPSG:4326", transform=rasterio.Affine(1e-5, 0, 55, 0, -1e-5, 25))
    run = run_cli("--input", str(tmp_path / "geo.tif"), "--k", "3", "--output", str(tmp_path / "out"),
                  "--vector", "gpkg", "--min-area", "50", "--checkpoint", str(checkpoint))  # fmt: skip
    assert run.returncode == 1 and "square degrees" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "geo.tif").exists()  # refused before any work on it


# ----------------------------------------------------------------------------- file kinds


def test_jpeg2000_is_read_like_a_geotiff(tmp_path, model, checkpoint):
    """A lossless JPEG 2000 with a CRS: labels as GeoTIFF (out/<stem>.tif), the same CRS,
    transform and labels as the same pixels in a GeoTIFF; found in folders by the CLI."""
    image = rgb_image(96, seed=11)
    with rasterio.open(tmp_path / "s2.jp2", "w", driver="JP2OpenJPEG", height=96, width=96, count=3, dtype="uint8",
                       crs="EPSG:32640", transform=TRANSFORM, reversible=True, quality=100) as dst:  # fmt: skip
        dst.write(np.moveaxis(image, -1, 0))
    write(tmp_path / "same.tif", image)
    run = run_cli("--input", str(tmp_path), "--k", "3", "--output", str(tmp_path / "out"),
                  "--checkpoint", str(checkpoint))  # fmt: skip
    assert run.returncode == 0, run.stderr
    with rasterio.open(tmp_path / "out" / "s2.tif") as out:
        assert out.crs.to_epsg() == 32640 and out.transform == TRANSFORM
        np.testing.assert_array_equal(out.read(1), labels_of(tmp_path / "out" / "same.tif")[0])


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "complex_int16", "complex64 RGBA"])
def test_complex_rasters_are_refused_by_one_policy(tmp_path, dtype):
    count = 4 if "RGBA" in dtype else 1
    kind = dtype.split()[0]
    profile = {"crs": "EPSG:32640", "transform": TRANSFORM}
    with rasterio.open(tmp_path / "c.tif", "w", driver="GTiff", height=16, width=16, count=count, dtype=kind,
                       **profile) as dst:  # fmt: skip
        if kind != "complex_int16":  # rasterio writes no complex int16; GDAL creates the file all the same
            dst.write(np.full((count, 16, 16), 1 + 2j, kind))
    for read in (RasterSource, read_image):
        with pytest.raises(ImageReadError, match=rf"complex pixel values \({kind}\).*amplitude"):
            read(tmp_path / "c.tif")


def tiff(path, width: int, height: int, *, byte_count: int, bits: int = 8, compression: int = 1, data: bytes = b""):
    """A one-strip, one-band TIFF header written by hand (its strip at byte 8)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, compression), (262, 3, 1), (273, 4, 8),
            (277, 3, 1), (278, 4, height), (279, 4, byte_count), (284, 3, 1)]  # fmt: skip
    data = data or b"\0" * 64
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHIHH", t, k, 1, v, 0) if k == 3 else struct.pack("<HHII", t, k, 1, v) for t, k, v in tags
    )
    path.write_bytes(b"II*\0" + struct.pack("<I", 8 + len(data)) + data + ifd + b"\0\0\0\0")
    return path


def test_a_header_claiming_more_than_the_file_holds_is_refused_at_once(tmp_path, checkpoint):
    """GDAL's dos_strip_chop.tif, rebuilt: 2048 x 1,073,741,824 px (2 TiB) in one strip whose
    byte count is bogus, in a file of 200 bytes. It took 101 s, 10.8 GB and a 4.3 GB output
    before failing; now it is refused from the header, and no output is created."""
    dos = tiff(tmp_path / "dos_strip_chop.tif", 2048, 1 << 30, byte_count=0xFFFFFFF0)
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="header claims 2048 x 1073741824 px.*corrupt or truncated"):
        RasterSource(dos)
    assert time.perf_counter() - start < 5
    run = run_cli("--input", str(dos), "--k", "3", "--output", str(tmp_path / "out"), "--checkpoint", str(checkpoint))
    assert run.returncode == 1 and "FAILED" in run.stderr and "Traceback" not in run.stderr
    assert list((tmp_path / "out").iterdir()) == []
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 3 << 20  # kB: under 3 GB (torch included)


def test_valid_files_of_an_unsupported_kind_are_not_called_corrupt(tmp_path, model):
    """12-bit JPEG inside a TIFF (this GDAL build decodes 8-bit JPEG only): the message says
    what is unsupported and that the file is probably fine; no output is created."""
    j12 = tiff(tmp_path / "j12.tif", 64, 64, byte_count=200, bits=12, compression=7, data=bytes(range(200)))
    with pytest.raises(ImageReadError, match=r"12-bit JPEG compression .*cannot decode \(the file itself is prob"):
        segment_raster(j12, tmp_path / "out" / "j12.tif", Predictor(model, 3), progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------- messages


def test_warnings_about_small_images_match_the_labels_that_come_out(model, caplog):
    """7 x 5 px. The bundled student (8 px cells, stride 32) sees it padded to 32 x 32 px, 16
    cells: no warning about cells at K = 3 (it said "at most 1 label can come out", then 3
    did). The tiny teacher (4 px cells, stride 4) gets 4 cells: at K = 6 the warning makes no
    promise on the count, and the count reported afterwards is the real one."""
    image = rgb_image(16, seed=12)[:5, :7]
    for net, k, cells in ((seglib.load_model(), 3, None), (model, 6, "only 4 cells of 4 x 4 px")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            used = len(np.unique(seglib.segment(image, k, net)))
        messages = [r.getMessage() for r in caplog.records]
        assert any(cells in m for m in messages) if cells else not any("cells" in m for m in messages)
        assert not any("at most" in m for m in messages)
        counted = [m for m in messages if "labels came out" in m]
        assert all(f"only {used} of K = {k}" in m for m in counted) and (counted or used == k)


def test_sigterm_handler_is_installed_only_in_the_main_thread():
    """``main`` is callable from a worker thread (a notebook, a GUI): no signal handler there."""
    code = (
        "import threading, seglib.predict as p\n"
        "t = threading.Thread(target=p.main, args=(['--help'],)); t.start(); t.join()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "ValueError" not in done.stderr and "usage" in done.stdout
