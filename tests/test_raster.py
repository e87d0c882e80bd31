"""Windowed segmentation of rasters: layout, blending, georeferencing, agreement, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seglib.config import ModelConfig
from seglib.data.synthetic import make_tile
from seglib.inference.engine import fit_source_clusters, segment_raster, segment_source
from seglib.inference.predictor import Predictor, to_tensor
from seglib.inference.windows import Tiling, axis_weights, axis_windows, check_tiling
from seglib.io.images import ImageReadError
from seglib.io.rasters import ArraySource, RasterSource
from seglib.models.teacher import MonolithicSegmenter
from seglib.viz import match_labels

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402
from conftest import ROOT  # noqa: E402

CRS = "EPSG:32640"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 2700000.0)  # UTM 40N, 0.5 m pixels


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_teacher(seed: int = 0, **encoder) -> MonolithicSegmenter:
    cfg = ModelConfig()
    cfg.encoder.width, cfg.encoder.depth, cfg.encoder.embed_dim = 16, 1, 8
    for key, value in encoder.items():
        setattr(cfg.encoder, key, value)
    torch.manual_seed(seed)
    return MonolithicSegmenter(cfg).eval()


class LocalTeacher(MonolithicSegmenter):
    """The tiny teacher with embeddings that depend only on a pixel's neighbourhood.

    The real encoder normalises with statistics of its whole input (the per-image mean in
    ``standardize`` and in the colour channels, GroupNorm), so a window's embeddings shift with
    what else the window holds. This double keeps the real head and refinement lanes but embeds
    with a stride-4 conv and absolute colour, so the test isolates the windowing machinery.
    """

    def __init__(self):
        cfg = ModelConfig()
        cfg.encoder.width, cfg.encoder.depth, cfg.encoder.embed_dim = 16, 1, 8
        super().__init__(cfg)
        torch.manual_seed(0)
        self.local = nn.Conv2d(3, 8, 4, stride=4)
        self.eval()

    def embed(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.local(rgb - 0.5)  # (B, 8, H/4, W/4)
        colour = F.avg_pool2d(rgb, 4) * self.colour_weight  # (B, 3, H/4, W/4)
        return torch.cat([F.normalize(features, dim=1), colour], 1), features


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    return (make_tile(size, seed=seed).rgb * 255).round().astype(np.uint8)


def write_geotiff(path, bands: np.ndarray, **profile) -> None:
    """bands (H, W, C) -> GeoTIFF with the test CRS and transform."""
    h, w, c = bands.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=h,
        width=w,
        count=c,
        dtype=bands.dtype,
        crs=CRS,
        transform=TRANSFORM,
        **profile,
    ) as dst:
        dst.write(np.moveaxis(bands, -1, 0))


def collect(
    model, source, k, tiling: Tiling, *, clusters=None, probs_out=None
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Labels (H, W) of the windowed path, and the (y, rows) chunks in the order written."""
    labels = np.full((source.height, source.width), 255, np.uint8)
    chunks = []

    def write_rows(y, rows):
        labels[y : y + rows.shape[0]] = rows
        chunks.append((y, rows.shape[0]))

    predictor = Predictor(model, k, clusters=clusters)
    segment_source(predictor, source, write_rows=write_rows, tiling=tiling, probs_out=probs_out)
    return labels, chunks


def fit(model, source, k, tiling: Tiling):
    return fit_source_clusters(Predictor(model, k), source, tiling=tiling)


def whole_probs(model, img, k, clusters):
    return Predictor(model, k, clusters=clusters).probs(to_tensor(img))


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("size", [1, 37, 64, 65, 300, 1000, 4099])
@pytest.mark.parametrize("tile,overlap,multiple", [(64, 16, 4), (128, 0, 16), (256, 64, 4)])
def test_windows_cover_the_axis_with_the_requested_overlap(size, tile, overlap, multiple):
    starts, length = axis_windows(size, tile, overlap, multiple)
    assert length == min(tile, size)
    assert starts[0] == 0 and size <= starts[-1] + length < size + multiple  # the last may stick out
    assert all(s % multiple == 0 for s in starts)  # aligned with the whole-image pixel grid
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert b > a and a + length - b >= overlap  # no gap, at least the overlap


def test_blend_weights_are_a_smooth_partition_of_unity():
    size = 1000
    starts, length = axis_windows(size, 256, 64, 4)
    weights = axis_weights(starts, length, size)
    total, best = np.zeros(starts[-1] + length), np.zeros(starts[-1] + length)
    for s, w in zip(starts, weights, strict=True):
        assert (w >= 0).all() and (w <= 1 + 1e-6).all()
        total[s : s + length] += w
        best[s : s + length] = np.maximum(best[s : s + length], w)
    np.testing.assert_allclose(total[:size], 1, atol=1e-6)
    assert (best[:size] >= 0.5).all()  # every pixel has a window in which it counts
    # A window's weight falls gradually (no seam): neighbouring pixels differ by a small step
    # (the cosine ramp spans the middle third of the overlap).
    assert max(np.abs(np.diff(w)).max() for w in weights) < 0.1
    # ... and is zero on the outer third of each overlap, where the CNN sees the window's padding
    inner = weights[1]
    assert (inner[:21] == 0).all() and (inner[-21:] == 0).all() and (inner[length // 2] == 1)


def test_tiling_is_validated_and_rounded_to_the_stride():
    assert check_tiling(100, 16, 16) == 112
    with pytest.raises(ValueError, match="overlap"):
        check_tiling(256, 200, 4)
    with pytest.raises(ValueError, match="tile must be at least"):
        check_tiling(32, 0, 16)


# ----------------------------------------------------------------------------- reading


def test_16bit_stretch_is_the_same_in_every_window():
    rng = np.random.default_rng(0)
    # A brightness ramp: per-window percentiles would map the same value to different bytes.
    ramp = np.linspace(1000, 30000, 256)[None, :, None] + rng.normal(0, 50, (128, 256, 3))
    src = ArraySource(ramp.astype(np.uint16))
    left, right = src.read(0, 0, 128, 160), src.read(0, 96, 128, 160)
    np.testing.assert_array_equal(left[:, 96:], right[:, :64])  # the shared columns agree
    assert any("percentile" in note for note in src.stretch.notes)
    assert left.dtype == np.uint8 and left[..., 0].min() == 0 and right[..., 0].max() == 255


def test_raster_source_reads_windows_and_rejects_five_bands(tmp_path):
    img = smooth_image(64)
    write_geotiff(tmp_path / "rgb.tif", img)
    with RasterSource(tmp_path / "rgb.tif") as src:
        assert (src.height, src.width) == (64, 64)
        np.testing.assert_array_equal(src.read(8, 4, 16, 32), img[8:24, 4:36])
    write_geotiff(tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ImageReadError, match="5 bands"):
        RasterSource(tmp_path / "five.tif")


# ----------------------------------------------------------------------------- segmentation


def test_geotiff_output_keeps_crs_transform_and_size(tmp_path):
    img = smooth_image(160, seed=3)[:150, :130]  # not a multiple of the stride or the tile
    write_geotiff(tmp_path / "in.tif", img, tiled=True, blockxsize=64, blockysize=64)
    out = segment_raster(
        tmp_path / "in.tif", tmp_path / "out" / "labels.tif", Predictor(tiny_teacher(), 4), tiling=Tiling(64, 16)
    )
    with rasterio.open(tmp_path / "in.tif") as a, rasterio.open(out) as b:
        assert b.crs == a.crs and b.crs.to_epsg() == 32640
        assert b.transform == a.transform
        assert (b.width, b.height, b.count, b.dtypes[0]) == (a.width, a.height, 1, "uint8")
        labels = b.read(1)
    assert labels.max() < 4
    assert not list((tmp_path / "out").glob(".*tmp"))  # the temporary file was renamed


@pytest.mark.numeric
@pytest.mark.parametrize("size_prior", [0.0, 3.0])
def test_windowed_labels_match_whole_image_labels(size_prior):
    """With shared clusters, a window-consistent model gives the same labels windowed (192 px
    windows, at least 64 px overlap) as in one piece, up to a few boundary pixels; with a size
    prior, its offsets are measured once on the fitting sample and shared too."""
    model, img, k = LocalTeacher(), smooth_image(448, seed=1), 5
    model.head.size_prior = size_prior
    source = ArraySource(img)
    protos = fit(model, source, k, Tiling(192, 64))
    assert (protos.bias is None) == (size_prior == 0)
    windowed, chunks = collect(model, source, k, Tiling(192, 64), clusters=protos)
    whole = whole_probs(model, img, k, protos)[0].argmax(0).numpy()
    assert len(axis_windows(448, 192, 64, 4)[0]) >= 3  # really a grid of windows
    agreement = (match_labels(windowed, whole) == whole).mean()
    assert agreement >= 0.99, agreement
    assert (windowed == whole).mean() >= 0.99  # shared prototypes: the ids agree without matching


# The bundled student runs at half resolution, so its windows need twice the overlap in pixels
# of a full-resolution model for the same margin: its denoising alone reaches 64 px on each side
# (docs/inference.md).
@pytest.mark.numeric
@pytest.mark.parametrize("tile,overlap", [(320, 128), (512, 128)])
def test_bundled_model_windowed_labels_match_whole_image_labels(tile, overlap):
    """The shipped student on a real sample tile: windows (off-grid last windows included, as
    the tile does not divide the image) agree with the one-piece result on >= 99 % of pixels."""
    import seglib
    from seglib.io.images import read_image
    from seglib.paths import SAMPLE_IMAGES

    model = seglib.load_model()
    img, _ = read_image(sorted(SAMPLE_IMAGES.iterdir())[0])  # 797 x 644
    source, k = ArraySource(img), 6
    protos = fit(model, source, k, Tiling(tile, overlap))
    assert protos.bias is not None and protos.bias.shape == (1, k)  # the bundled size prior
    windowed, _ = collect(model, source, k, Tiling(tile, overlap), clusters=protos)
    whole = whole_probs(model, img, k, protos)[0].argmax(0).numpy()
    assert (windowed == whole).mean() >= 0.99


def test_single_window_equals_the_whole_image_path():
    """An image within one tile goes through the model exactly once: identical probabilities."""
    model, img = tiny_teacher(), smooth_image(96, seed=2)
    source = ArraySource(img)
    protos = fit(model, source, 3, Tiling(128, 16))
    probs = np.zeros((3, 96, 96), np.float32)
    predictor = Predictor(model, 3, clusters=protos)
    segment_source(predictor, source, write_rows=lambda y, r: None, tiling=Tiling(128, 16), probs_out=probs)
    whole = whole_probs(model, img, 3, protos)[0].numpy()
    np.testing.assert_allclose(probs, whole, atol=1e-5)


def test_rows_are_written_once_in_order_and_probabilities_sum_to_one():
    model, img, k = tiny_teacher(), smooth_image(256, seed=4)[:200, :230], 3
    source = ArraySource(img)
    probs = np.zeros((k, 200, 230), np.float32)
    labels, chunks = collect(model, source, k, Tiling(96, 24), probs_out=probs)
    starts = [y for y, _ in chunks]
    assert starts == sorted(starts) and sum(n for _, n in chunks) == 200  # every row exactly once
    assert max(n for _, n in chunks) <= 96  # never more than a tile of rows in flight
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_clusters_come_from_a_seeded_bounded_sample():
    model, img = tiny_teacher(), smooth_image(256, seed=5)
    seen = []
    original = model.fit_clusters

    def spy(rgb, k, **kw):
        seen.append(rgb.shape)
        return original(rgb, k, **kw)

    model.fit_clusters = spy
    a = fit(model, ArraySource(img), 4, Tiling(64, 16, fit_windows=5, seed=1))
    b = fit(model, ArraySource(img), 4, Tiling(64, 16, fit_windows=5, seed=1))
    assert seen[0] == (5, 3, 64, 64)  # 5 of the 25 windows, at the tile size
    torch.testing.assert_close(a.prototypes, b.prototypes)


def test_truncated_geotiff_fails_with_its_name_and_leaves_no_output(tmp_path):
    rng = np.random.default_rng(0)
    write_geotiff(tmp_path / "big.tif", rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), compress="deflate")
    data = (tmp_path / "big.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.tif"):
        segment_raster(
            tmp_path / "cut.tif", tmp_path / "out.tif", Predictor(tiny_teacher(), 3), tiling=Tiling(128, 16),
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out.tif").exists()
    assert not list(tmp_path.glob(".*tmp"))


# ----------------------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    from seglib.config import ModelConfig
    from seglib.models.teacher import MonolithicSegmenter
    from seglib.inference.engine import segment_raster
    from seglib.inference.predictor import Predictor
    from seglib.inference.windows import Tiling

    def peak_mib():
        # VmHWM is this process image's peak RSS. ru_maxrss would do on a fresh interpreter, but
        # Linux carries it over fork + exec, so a child of pytest starts at pytest's size.
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = ModelConfig()
    cfg.encoder.width, cfg.encoder.depth, cfg.encoder.embed_dim = 16, 1, 8
    torch.manual_seed(0)
    model = MonolithicSegmenter(cfg).eval()
    src, dst, k, tile, overlap, fit = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    before, start = peak_mib(), time.time()
    segment_raster(src, dst, Predictor(model, k), tiling=Tiling(tile, overlap, fit_windows=fit), progress=False)
    print(json.dumps({"before_mib": before, "peak_mib": peak_mib(), "seconds": time.time() - start}))
    """
)


def write_large_geotiff(path, size: int) -> None:
    """A size x size RGB GeoTIFF written 512 rows at a time (never whole in memory)."""
    from rasterio.windows import Window

    block = smooth_image(512, seed=7)
    with rasterio.open(
        path, "w", driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs=CRS, transform=TRANSFORM,
        tiled=True, blockxsize=256, blockysize=256, compress="deflate",
    ) as dst:  # fmt: skip
        for y in range(0, size, 512):
            rows = np.tile(block, (1, size // 512, 1))[: min(512, size - y)]
            dst.write(np.moveaxis(rows, -1, 0), window=Window(0, y, size, rows.shape[0]))


def measure(tmp_path, size: int, k: int, tile: int, overlap: int, fit_windows: int) -> dict:
    """Peak RSS (MiB) of segment_raster on a size x size raster, in a fresh process."""
    src, dst = tmp_path / f"in{size}.tif", tmp_path / f"out{size}.tif"
    write_large_geotiff(src, size)
    args = [str(v) for v in (src, dst, k, tile, overlap, fit_windows)]
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    with rasterio.open(dst) as out:
        assert (out.width, out.height) == (size, size)
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    return {**stats, "added_mib": stats["peak_mib"] - stats["before_mib"]}


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_tile_not_the_raster(tmp_path):
    """4096 x 4096 RGB, K=4, 512 px tiles, prototypes fitted on 4 windows: the windowed run
    adds less memory than the whole raster's float32 RGB + K probabilities alone would take
    (448 MiB), and little more than for a raster 4 times smaller: under 30 % of the 336 MiB
    by which that whole-raster bound grows (what does grow: GDAL's block cache, capped at
    ``GDAL_CACHE_MB``, holds more of the larger raster's blocks, and the blended overlap rows
    are twice as wide)."""
    k, tile, overlap, fit = 4, 512, 64, 4
    small = measure(tmp_path, 2048, k, tile, overlap, fit)
    large = measure(tmp_path, 4096, k, tile, overlap, fit)
    whole_mib = 4096 * 4096 * (3 + k) * 4 / 2**20
    print(f"\n2048 px: {small}\n4096 px: {large}\nwhole-raster lower bound: {whole_mib:.0f} MiB")
    assert large["added_mib"] < 0.6 * whole_mib
    assert large["added_mib"] - small["added_mib"] < 0.3 * (whole_mib - whole_mib / 4)


# ----------------------------------------------------------------------------- labels without full-resolution maps


def _bilinear(p: torch.Tensor, size: tuple[int, int], channels_last: bool) -> torch.Tensor:
    x = p[None].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("f", [2, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_window_probs_regions_are_the_whole_upsampling(f, channels_last):
    """``WindowProbs`` at 1/f resolution: every region's probabilities are the whole window's
    bilinear upsampling there (borders included; bit for bit for the fast lane's channels-last maps and powers of
    two), and its
    labels that upsampling's argmax, although only the blocks at label edges are interpolated."""
    from seglib.inference.blend import WindowProbs
    from seglib.inference.predictor import argmax_labels

    gen = torch.Generator().manual_seed(f)
    k, h, w = 5, 23, 31
    # Smooth maps with large regions, plus a few single-cell specks: uniform blocks and edges.
    low = F.interpolate(torch.rand(1, k, 5, 7, generator=gen) * 4, size=(h, w), mode="bilinear")[0]
    low[:, 10, 10] += 3 * torch.rand(k, generator=gen)
    probs = low.softmax(0)
    if channels_last:
        probs = probs[None].contiguous(memory_format=torch.channels_last)[0]
    size = (h * f, w * f)
    whole = _bilinear(probs, size, channels_last)
    window = WindowProbs(probs, size)
    assert window.f == f
    for ys, xs in [
        (slice(0, size[0]), slice(0, size[1])),
        (slice(0, 7), slice(3, size[1])),
        (slice(f + 1, size[0] - 2), slice(size[1] - 9, size[1])),
        (slice(size[0] // 2, size[0] // 2 + 5), slice(size[1] // 3, size[1] // 2)),
    ]:
        if channels_last and not f & (f - 1):  # the fast lane's layout and factors: bit for bit
            assert torch.equal(window.probs(ys, xs), whole[:, ys, xs])
        else:  # 1/f inexact, or the channels-first kernel's vector lanes: the last bit may differ
            torch.testing.assert_close(window.probs(ys, xs), whole[:, ys, xs], atol=1e-6, rtol=0)
        expected = argmax_labels(whole[:, ys, xs])
        labels = window.labels(ys, xs)
        assert labels.shape == expected.shape
        # Blocks at label edges are interpolated as a matrix product: the same weights, rounded
        # in another order, so only exact near-ties could differ.
        assert (labels == expected).mean() >= 0.999
    full = window.labels(slice(0, size[0]), slice(0, size[1]))
    assert (full == argmax_labels(whole)).mean() >= 0.999


def test_window_probs_at_full_or_odd_resolution_is_upsampled_as_the_model_would():
    from seglib.inference.blend import WindowProbs
    from seglib.inference.predictor import argmax_labels

    probs = torch.rand(3, 10, 12).softmax(0)
    same = WindowProbs(probs, (10, 12))
    assert same.f == 1 and torch.equal(same.probs(slice(2, 5), slice(0, 12)), probs[:, 2:5])
    odd = WindowProbs(probs, (25, 30))  # not an integer factor: upsampled whole, at once
    whole = _bilinear(probs, (25, 30), False)
    assert odd.f == 1 and torch.equal(odd.probs(slice(0, 25), slice(0, 30)), whole)
    np.testing.assert_array_equal(odd.labels(slice(3, 9), slice(4, 30)), argmax_labels(whole[:, 3:9, 4:30]))


@pytest.mark.parametrize("size,tile,overlap", [(1000, 256, 64), (700, 320, 128), (200, 256, 32)])
def test_axis_plan_cells_take_weight_from_the_windows_that_have_it(size, tile, overlap):
    """The cells partition the axis; a window adds to a cell exactly where its weight is not
    zero; a cell with one contributor has weight 1 from it; the last contributor is the last
    window (in order) with weight there; every window with weight somewhere covers those cells."""
    from seglib.inference.windows import axis_plan

    starts, length = axis_windows(size, tile, overlap, 16)
    weights, cuts, cells, sole, last = axis_plan(starts, length, size)
    assert cuts[0] == 0 and cuts[-1] == size and cuts == sorted(set(cuts))
    for i in range(len(cuts) - 1):
        a, b = cuts[i], cuts[i + 1]
        having = [r for r, s in enumerate(starts) if s <= a and b <= s + length and weights[r][a - s : b - s].any()]
        assert having == [r for r in range(len(starts)) if i in cells[r]] and having
        assert last[i] == having[-1]
        for r in having:  # constant kind over the cell: all one, or no zero inside
            v = weights[r][a - starts[r] : b - starts[r]]
            assert (v == 1).all() or (v > 0).all()
        if sole[i] is not None:
            assert having == [sole[i]] and (weights[sole[i]][a - starts[sole[i]] : b - starts[sole[i]]] == 1).all()
        total = sum(weights[r][a - starts[r] : b - starts[r]] for r in having)
        np.testing.assert_allclose(total, 1, atol=1e-6)
    if len(starts) > 1:  # outer thirds of the overlaps: some window adds nothing to a cell it covers
        covered = sum(1 for r, s in enumerate(starts) for i in range(len(cuts) - 1) if s <= cuts[i] < s + length)
        assert covered > sum(len(c) for c in cells)


def test_labels_only_pass_gives_the_labels_of_the_full_probability_pass():
    """The bundled student on a real sample tile, windowed: the labels-only pass (probabilities
    kept at the fast lane's 1/4 resolution, zero-weight thirds skipped) writes the labels of
    the pass that builds the full-resolution blended probabilities, pixel for pixel."""
    import seglib
    from seglib.io.images import read_image
    from seglib.paths import SAMPLE_IMAGES

    model = seglib.load_model()
    img, _ = read_image(sorted(SAMPLE_IMAGES.iterdir())[1])
    source, k = ArraySource(img), 6
    protos = fit(model, source, k, Tiling(320, 128))
    labels, _ = collect(model, source, k, Tiling(320, 128), clusters=protos)
    probs = np.zeros((k, *img.shape[:2]), np.float32)
    with_probs, _ = collect(model, source, k, Tiling(320, 128), clusters=protos, probs_out=probs)
    np.testing.assert_array_equal(with_probs, probs.argmax(0))
    assert (labels == with_probs).mean() >= 0.9999, (labels != with_probs).sum()


def test_fit_windows_reuse_their_embeddings_with_the_same_labels(monkeypatch):
    """The windows sampled for the fit are labelled from the embeddings the fit computed (the
    encoder runs once per window): the labels equal those of a pass that encodes them again."""
    import seglib
    import seglib.inference.engine as engine
    from seglib.io.images import read_image
    from seglib.paths import SAMPLE_IMAGES

    model = seglib.load_model()
    img, _ = read_image(sorted(SAMPLE_IMAGES.iterdir())[0])
    source, k = ArraySource(img), 6
    encoded = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda rgb: encoded.append(rgb.shape[0]) or embed(rgb))
    kept, _ = collect(model, source, k, Tiling(320, 128, fit_windows=3))
    n_windows = len(axis_windows(img.shape[0], 320, 128, 32)[0]) * len(axis_windows(img.shape[1], 320, 128, 32)[0])
    assert encoded[0] == 3 and sum(encoded) == n_windows  # the fit batch, then the other windows
    fit = engine._fit

    def fit_without_embeddings(*args, **kwargs):
        clusters, windows = fit(*args, **kwargs)
        return clusters, {key: (rgb, valid, None) for key, (rgb, valid, _) in windows.items()}

    monkeypatch.setattr(engine, "_fit", fit_without_embeddings)
    encoded.clear()
    again, _ = collect(model, source, k, Tiling(320, 128, fit_windows=3))
    assert sum(encoded) == n_windows + 3  # the fit windows encoded twice
    np.testing.assert_array_equal(kept, again)
