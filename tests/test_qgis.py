"""seglib inside QGIS (issue 29): the install command, the plugin's runner, and the plugin in a
real QGIS, headless (``qgis_process.bin`` and PyQGIS with ``QgsApplication`` offscreen).

The QGIS tests need QGIS (Debian: ``apt-get install qgis python3-qgis``): without it they are
skipped with the reason; with ``SEGLIB_REQUIRE_QGIS=1`` (CI sets it) a missing QGIS fails them.
``SEGLIB_QGIS_PROCESS`` / ``SEGLIB_QGIS_PYTHON`` point at another QGIS (conda-forge's).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from seglib import qgis as seglib_qgis

rasterio = pytest.importorskip("rasterio")

PLUGIN_DIR = ROOT / "qgis_plugin" / "seglib_qgis"
SESSION = ROOT / "tests" / "qgis_session.py"
ASSET = ROOT / "seglib" / "assets" / "dubai" / "images" / "image_part_002t1.jpg"
ALGORITHMS = ("seglib:segment", "seglib:fit_legend", "seglib:segment_with_legend")


def _runner():
    """The plugin's runner module (standard library only: it imports without QGIS)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seglib_qgis_runner", PLUGIN_DIR / "runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _runner()


# --------------------------------------------------------------------------- test rasters
def write_geotiff(path: Path, rgb: np.ndarray, *, x0: float = 300000.0, y0: float = 2780000.0, res: float = 0.5):
    """(H, W, C) uint8 -> a GeoTIFF in UTM 40N (Dubai) with the given origin and pixel size."""
    from rasterio.transform import from_origin

    h, w, c = rgb.shape
    profile = dict(driver="GTiff", width=w, height=h, count=c, dtype="uint8", crs="EPSG:32640")
    with rasterio.open(path, "w", transform=from_origin(x0, y0, res, res), **profile) as dst:
        dst.write(np.moveaxis(rgb, -1, 0))
    return path


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> dict[str, Path]:
    """Two small real tiles (crops of the bundled Dubai image, different places and transforms),
    a 2-band raster, and a 4096 px one for Cancel (at 2048 px, 9 windows, the run sometimes ended
    before the interrupt reached it: 3 of 16 runs here)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiles")
    image = np.asarray(Image.open(ASSET).convert("RGB"))
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), np.ones((128, 128, 1), np.uint8))
    return {
        "a": write_geotiff(folder / "a.tif", image[:192, :256]),
        "b": write_geotiff(folder / "b.tif", image[256:448, 400:656], x0=300200.0, y0=2779870.0, res=0.6),
        "two_band": write_geotiff(folder / "two_band.tif", image[:64, :64, :2]),
        "big": write_geotiff(folder / "big.tif", blocks),
    }


def read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), {"crs": src.crs, "transform": src.transform, "shape": src.shape, "nodata": src.nodata}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A seglib command as a user types it, in this environment's Python."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done


# --------------------------------------------------------------------------- install (no QGIS needed)
def test_install_copies_enables_and_records_python(tmp_path):
    settings = tmp_path / "profiles" / "work" / "QGIS" / "QGIS3.ini"
    settings.parent.mkdir(parents=True)
    before = "[General]\nlocale=fr\n\n[PythonPlugins]\nother=true\nseglib_qgis=false\n\n[UI]\nsize=@Size(3 4)\n"
    settings.write_text(before)
    (tmp_path / "profiles" / "profiles.ini").write_text("[core]\ndefaultProfile=work\n")

    target = seglib_qgis.install(profiles_path=tmp_path)  # the default profile: "work", from profiles.ini

    assert target == tmp_path / "profiles" / "work" / "python" / "plugins" / "seglib_qgis"
    for name in seglib_qgis.PLUGIN_FILES:
        assert (target / name).read_bytes() == (PLUGIN_DIR / name).read_bytes()
    assert json.loads((target / "installed.json").read_text())["python"] == sys.executable
    assert runner.recorded_python(target / "installed.json") == sys.executable
    after = settings.read_text()
    assert "seglib_qgis=true" in after and "seglib_qgis=false" not in after
    for line in ("locale=fr", "other=true", "size=@Size(3 4)", "[UI]"):  # QGIS's other settings untouched
        assert line in after
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_install_command_profile_flag_and_bad_names(tmp_path):
    done = cli("seglib.qgis", "install", "--profile", "gis", "--profiles-path", str(tmp_path))
    assert "enabled" in done.stdout and sys.executable in done.stdout
    assert (tmp_path / "profiles" / "gis" / "python" / "plugins" / "seglib_qgis" / "metadata.txt").is_file()
    assert "seglib_qgis=true" in (tmp_path / "profiles" / "gis" / "QGIS" / "QGIS3.ini").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "seglib.qgis", "install", "--profile", "../x", "--profiles-path", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--profile must be a profile name" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_fit_legend_refuses_bad_arguments(tmp_path, tiles):
    assert seglib_qgis.main(["fit-legend", str(tiles["a"]), "--k", "4", "--output", str(tmp_path / "l.txt")]) == 2
    assert seglib_qgis.main(["fit-legend", str(tmp_path / "none.tif"), "--k", "4", "--output", "l.json"]) == 2
    assert (
        seglib_qgis.main(["fit-legend", str(tiles["two_band"]), "--k", "4", "--output", str(tmp_path / "l.json")]) == 2
    )
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- the runner (no QGIS needed)
class Feedback:
    """QgsProcessingFeedback's few methods the runner uses; cancels at window ``cancel_at``."""

    def __init__(self, cancel_at: int | None = None):
        self.cancel_at, self.canceled, self.console, self.progress = cancel_at, False, [], []

    def isCanceled(self):  # noqa: N802 (QGIS's names)
        return self.canceled

    def pushConsoleInfo(self, line):  # noqa: N802
        self.console.append(line)

    def pushCommandInfo(self, line):  # noqa: N802
        pass

    def on_progress(self, desc, n, total):
        self.progress.append((desc, n, total))
        if self.cancel_at is not None and n >= self.cancel_at:
            self.canceled = True


FAKE_COMMAND = """
import sys, time
from tqdm import tqdm
mode = sys.argv[1]
try:
    for _ in tqdm(range(10), desc="windows"):
        time.sleep(0.3 if mode == "slow" else 0.0)
except KeyboardInterrupt:
    print("interrupted: stopped, no partial output left", file=sys.stderr)
    sys.exit(130)
print("done")
if mode == "fail":
    print("FAILED /data/x.tif: /data/x.tif: 2 bands, but seglib needs RGB", file=sys.stderr)
    sys.exit(1)
if mode == "crash":
    raise ValueError("boom")
"""


@pytest.fixture
def fake_command(tmp_path):
    """Runs a stand-in for a seglib command: ``runner.run_command(python, [name, mode], feedback, cwd=...)``."""
    (tmp_path / "fake_command.py").write_text(FAKE_COMMAND)

    def run(mode, feedback, **kwargs):  # `python -m fake_command` finds it in its working folder
        return runner.run_command(sys.executable, ["fake_command", mode], feedback, cwd=tmp_path, **kwargs)

    return run


def test_runner_progress_then_cancel_interrupts_the_command(fake_command):
    feedback = Feedback(cancel_at=2)
    with pytest.raises(runner.Canceled, match="no output was written"):
        fake_command("slow", feedback, progress=feedback.on_progress)
    # Stopped, not run to its end: no wall-clock bound (a loaded machine can take seconds to start
    # the child's Python), the command's own account instead.
    assert feedback.progress[0] == ("windows", 0, 10) and 2 <= feedback.progress[-1][1] < 10
    assert "interrupted: stopped, no partial output left" in feedback.console  # it got the interrupt, and said so
    assert "done" not in feedback.console


def test_runner_cancel_interrupts_even_when_qgis_ignores_ctrl_c(fake_command):
    """QGIS started with SIGINT ignored (in the background, by nohup): its children inherit that,
    and the interrupt Cancel sends must still stop the command."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        feedback = Feedback(cancel_at=2)
        with pytest.raises(runner.Canceled):
            fake_command("slow", feedback, progress=feedback.on_progress)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "interrupted: stopped, no partial output left" in feedback.console
    assert feedback.progress[-1][1] < 10 and "done" not in feedback.console


def test_runner_reports_seglibs_one_line_message(fake_command):
    feedback = Feedback()
    assert fake_command("fast", feedback) == ["done"]
    with pytest.raises(runner.SeglibError) as failed:
        fake_command("fail", Feedback())
    assert str(failed.value) == "/data/x.tif: 2 bands, but seglib needs RGB"  # the file named once
    with pytest.raises(runner.SeglibError) as crashed:
        fake_command("crash", Feedback())
    assert str(crashed.value) == "seglib stopped with an unexpected error: ValueError: boom"
    assert "Traceback" not in str(crashed.value)


def test_runner_finds_the_python_in_order(tmp_path, monkeypatch):
    installed = tmp_path / "installed.json"
    monkeypatch.delenv(runner.ENV_VAR, raising=False)
    with pytest.raises(runner.SeglibError, match="python -m seglib.qgis install"):
        runner.find_python("", installed=installed)
    installed.write_text(json.dumps({"python": "/recorded/python"}))
    assert runner.find_python("", installed=installed)[0] == "/recorded/python"
    monkeypatch.setenv(runner.ENV_VAR, "/env/python")
    assert runner.find_python(None, installed=installed)[0] == "/env/python"
    assert runner.find_python(" /setting/python ", installed=installed)[0] == "/setting/python"


def test_runner_check_python_says_what_to_install(monkeypatch):
    monkeypatch.setattr(runner, "REQUIRED", ("json", "no_such_module_for_seglib"))
    with pytest.raises(runner.SeglibError) as missing:
        runner.check_python(sys.executable)
    assert f"`{sys.executable} -m pip install no_such_module_for_seglib`" in str(missing.value)
    with pytest.raises(runner.SeglibError, match="does not exist"):
        runner.check_python("/no/such/python")


def test_staging_is_removed_and_outputs_moved_by_name(tmp_path):
    with pytest.raises(RuntimeError), runner.staging(tmp_path) as folder:
        (folder / "tile.tif").write_bytes(b"partial")
        raise RuntimeError("the command failed")
    assert not list(tmp_path.iterdir())
    with runner.staging(tmp_path) as folder:
        for name in ("tile.tif", "tile.qml", "tile.tif.aux.xml", "tile.gpkg", "tile2.tif"):
            (folder / name).write_text(name)
        moved = runner.move_outputs(folder, "tile", tmp_path / "out.tif", {".gpkg": tmp_path / "v" / "poly.gpkg"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.qml", "out.tif", "out.tif.aux.xml", "v"]
    assert (tmp_path / "out.tif").read_text() == "tile.tif" and (tmp_path / "v" / "poly.gpkg").is_file()
    assert len(moved) == 4  # tile2.tif is another input's
    with runner.staging(tmp_path / "t") as folder:  # a .tiff OUTPUT: GDAL reads <name>.tiff.aux.xml
        for name in ("tile.tif", "tile.qml", "tile.tif.aux.xml"):
            (folder / name).write_text(name)
        runner.move_outputs(folder, "tile", tmp_path / "t" / "out.tiff")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["out.qml", "out.tiff", "out.tiff.aux.xml"]


# --------------------------------------------------------------------------- a real QGIS
def _qgis_python() -> str | None:
    candidates = [os.environ.get("SEGLIB_QGIS_PYTHON"), "/usr/bin/python3"]
    for python in filter(None, candidates):
        if Path(python).is_file():
            probe = subprocess.run([python, "-c", "import qgis.core"], capture_output=True)
            if probe.returncode == 0:
                return python
    return None


class QGIS:
    """A headless QGIS with a private settings folder and the plugin installed by seglib's command."""

    def __init__(self, process: str, python: str, config: Path):
        self.process, self.python, self.config = process, python, config
        self.env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(config), "QT_QPA_PLATFORM": "offscreen"}
        self.env.pop(runner.ENV_VAR, None)
        self.plugins = config / "profiles" / "default" / "python" / "plugins"

    def run(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.process, *args], capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd, timeout=600
        )

    def algorithm(
        self, name: str, cwd: Path | None = None, env: dict | None = None, **params
    ) -> subprocess.CompletedProcess:
        args = ["run", name, "--"]
        for key, value in params.items():
            for item in value if isinstance(value, list) else [value]:
                args.append(f"{key}={item}")
        return self.run(*args, env=env, cwd=cwd)

    def session(self, *args: str) -> dict:
        done = subprocess.run(
            [self.python, str(SESSION), *args], capture_output=True, text=True, env=self.env, timeout=600
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def qgis(tmp_path_factory) -> QGIS:
    process = os.environ.get("SEGLIB_QGIS_PROCESS") or shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    python = _qgis_python()
    if not process or not python:
        reason = (
            "QGIS is not installed (no qgis_process.bin, or no Python with qgis.core): "
            "apt-get install qgis python3-qgis (docs/qgis.md) to run the QGIS tests"
        )
        if os.environ.get("SEGLIB_REQUIRE_QGIS") == "1":
            pytest.fail(f"SEGLIB_REQUIRE_QGIS=1 but {reason}")
        pytest.skip(reason)
    config = tmp_path_factory.mktemp("qgis-config")
    q = QGIS(process, python, config)
    done = subprocess.run(
        [sys.executable, "-m", "seglib.qgis", "install"], capture_output=True, text=True, env=q.env
    )  # as a user installs it: QGIS's default profile, found through QGIS_CUSTOM_CONFIG_PATH
    assert done.returncode == 0, done.stderr
    assert (q.plugins / "seglib_qgis" / "installed.json").is_file()
    return q


slow = pytest.mark.slow  # QGIS starts in seconds, and every run loads seglib's model


@slow
def test_qgis_lists_the_algorithms_with_help(qgis):
    listing = qgis.run("list")
    assert listing.returncode == 0, listing.stderr
    for algorithm in ALGORITHMS:
        assert algorithm in listing.stdout
    helped = qgis.run("help", "seglib:segment")
    assert helped.returncode == 0, helped.stderr
    for text in ("Segment raster", "INPUT", "K:", "CLUSTERS", "POLYGONS", "MIN_AREA", "square map units", "GeoTIFF"):
        assert text in helped.stdout


@pytest.fixture(scope="module")
def segmented(qgis, tiles, tmp_path_factory) -> Path:
    """The issue's acceptance command, run in the input's folder: `qgis_process run seglib:segment
    -- INPUT=a.tif K=6 OUTPUT=.../out.tif`; returns the folder holding out.tif."""
    folder = tmp_path_factory.mktemp("segmented")
    done = qgis.algorithm("seglib:segment", cwd=tiles["a"].parent, INPUT="a.tif", K=6, OUTPUT=folder / "out.tif")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return folder


@slow
def test_qgis_segment_is_the_cli_byte_for_byte(segmented, tiles):
    """The input's CRS, transform and K labels, and the file `python -m seglib.predict` writes
    with the same settings, byte for byte."""
    labels, meta = read(segmented / "out.tif")
    _, source = read(tiles["a"])
    assert (meta["crs"], meta["transform"], meta["shape"]) == (source["crs"], source["transform"], source["shape"])
    assert set(np.unique(labels).tolist()) == set(range(6))
    cli("seglib.predict", "--input", str(tiles["a"]), "--k", "6", "--output", str(segmented / "cli"))
    assert (segmented / "out.tif").read_bytes() == (segmented / "cli" / "a.tif").read_bytes()
    for ours, theirs in (("out.qml", "a.qml"), ("out.tif.aux.xml", "a.tif.aux.xml")):  # the legend came along
        assert (segmented / ours).read_bytes() == (segmented / "cli" / theirs).read_bytes()
    assert not [p for p in segmented.iterdir() if p.name.startswith(".")]  # no staging folder left


@slow
def test_qgis_loads_the_output_paletted_in_seglibs_colours(qgis, segmented):
    """The layer QGIS makes of it: paletted through the style that came with it (out.qml), the K
    classes of seglib's colour table, named as the attribute table names them, 255 as nodata."""
    from seglib.io.sidecars import read_attribute_table

    assert (segmented / "out.qml").is_file() and (segmented / "out.tif.aux.xml").is_file()
    layer = qgis.session("layer", str(segmented / "out.tif"))
    assert layer["valid"] and layer["renderer"] == "paletted" and layer["crs"] == "EPSG:32640"
    assert layer["size"] == [256, 192] and layer["nodata"] == 255
    with rasterio.open(segmented / "out.tif") as src:
        table = src.colormap(1)
    assert sorted(table) == list(range(6))  # K entries; nodata (255) outside them
    rows = read_attribute_table(segmented / "out.tif")
    assert [c[0] for c in layer["classes"]] == [r["value"] for r in rows] == list(range(6))
    for (value, *rgba, label), row in zip(layer["classes"], rows, strict=True):
        assert tuple(rgba) == tuple(table[value]) and label == row["class"]


@slow
def test_qgis_segment_with_polygons_and_lane(qgis, tiles, tmp_path):
    done = qgis.algorithm(
        "seglib:segment",
        INPUT=tiles["b"],
        K=5,
        LANE=3,  # none
        OUTPUT=tmp_path / "seg.tif",
        POLYGONS=tmp_path / "poly.gpkg",
        MIN_AREA=2.5,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cli("seglib.predict", "--input", str(tiles["b"]), "--k", "5", "--lane", "none", "--output", str(tmp_path / "cli"),
        "--vector", "gpkg", "--min-area", "2.5")  # fmt: skip
    assert (tmp_path / "seg.tif").read_bytes() == (tmp_path / "cli" / "b.tif").read_bytes()
    import fiona

    def polygons(path):
        with fiona.open(path) as src:
            return src.crs_wkt, sorted((f["properties"]["label"], round(f["properties"]["area"], 3)) for f in src)

    ours, theirs = polygons(tmp_path / "poly.gpkg"), polygons(tmp_path / "cli" / "b.gpkg")
    assert ours == theirs and len(ours[1]) > 1
    assert min(area for _, area in ours[1]) >= 2.5  # the sieve in map units (0.36 m2 pixels)


@slow
def test_qgis_shared_legend_gives_the_clis_labels(qgis, tiles, tmp_path):
    """Fit a shared legend + Segment with a shared legend = the CLI with the same legend file,
    and the legend is the CLI's own --shared-legend fit of the same files."""
    legend = tmp_path / "legend.json"
    inputs = [tiles["a"], tiles["b"]]
    fit = qgis.algorithm("seglib:fit_legend", INPUTS=inputs, K=4, OUTPUT=legend)
    assert fit.returncode == 0, fit.stdout + fit.stderr
    run = qgis.algorithm("seglib:segment_with_legend", INPUTS=inputs, CLUSTERS=legend, OUTPUT_FOLDER=tmp_path / "q")
    assert run.returncode == 0, run.stdout + run.stderr

    folder = tmp_path / "inputs"
    folder.mkdir()
    for path in inputs:
        shutil.copy(path, folder / path.name)
    cli("seglib.predict", "--input", str(folder), "--legend", str(legend), "--output", str(tmp_path / "cli"))
    cli("seglib.predict", "--input", str(folder), "--k", "4", "--shared-legend", "--save-legend",
        str(tmp_path / "cli_legend.json"), "--output", str(tmp_path / "cli_shared"))  # fmt: skip
    assert json.loads(legend.read_text()) == json.loads((tmp_path / "cli_legend.json").read_text())
    for path in inputs:
        ours = tmp_path / "q" / path.name
        assert ours.read_bytes() == (tmp_path / "cli" / path.name).read_bytes()
        labels, meta = read(ours)
        assert meta["transform"] == read(path)[1]["transform"]
        assert set(np.unique(labels).tolist()) <= set(range(4))
    names = ["a.qml", "a.tif", "a.tif.aux.xml", "b.qml", "b.tif", "b.tif.aux.xml"]  # the labels and their legend
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == names


@slow
def test_qgis_cancel_leaves_nothing(qgis, tiles, tmp_path):
    """Cancel pressed at seglib's first reported window: seglib is interrupted, nothing is left.

    Every attempt must be canceled and leave nothing; seglib's own "interrupted" line must come in
    one of three: in the full suite the console sometimes came back without the child's last line
    (the plugin's outcome was right in every such run). A possible cause, since fixed: the interrupt
    lands as the windowed pass starts its reader thread, and a reader left running crashed the
    child at exit (``tests/test_raster_pipeline.py``); not reproduced here either way."""
    consoles = []
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        out.mkdir()
        result = qgis.session("cancel", str(qgis.plugins), str(tiles["big"]), str(out / "big_segments.tif"))
        assert not result["ok"] and result["canceled_at"] is not None and result["canceled_at"] < 100
        assert any("canceled" in e and "no output" in e for e in result["errors"]), result
        assert list(out.iterdir()) == []  # no output, no temporary file, no staging folder
        consoles.append(result["console"])
        if "interrupted: stopped, no partial output left" in result["console"]:  # it was stopped mid-run
            return
    raise AssertionError(f"seglib never said it was interrupted: {consoles}")


@slow
def test_qgis_provider_setting_chooses_the_python(qgis, tiles, tmp_path):
    """Settings > Options > Processing > Providers > seglib > 'Python with seglib' comes first."""
    # QGIS's own Python: it exists (the setting's file check passes) but has no seglib.
    result = qgis.session("setting", str(qgis.plugins), qgis.python, str(tiles["a"]), str(tmp_path / "o.tif"))
    assert not result["ok"]
    expected = f"{qgis.python} (from the provider setting 'Python with seglib'), has no seglib"
    assert any(expected in e for e in result["errors"]), result
    assert not list(tmp_path.iterdir())


@slow
def test_qgis_errors_are_seglibs_one_line_messages(qgis, tiles, tmp_path):
    bad = qgis.algorithm("seglib:segment", INPUT=tiles["two_band"], K=4, OUTPUT=tmp_path / "o.tif")
    text = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "2 bands, but seglib needs RGB" in text and "Traceback" not in text
    # seglib's Python without seglib (QGIS's own): a message saying what to install, not an ImportError.
    missing = qgis.algorithm(
        "seglib:segment", env={runner.ENV_VAR: qgis.python}, INPUT=tiles["a"], K=4, OUTPUT=tmp_path / "o.tif"
    )
    text = missing.stdout + missing.stderr
    assert missing.returncode != 0 and "has no seglib: install it there" in text and "pip install" in text
    assert "Traceback" not in text and "ImportError" not in text and "ModuleNotFoundError" not in text
    assert not list(tmp_path.iterdir())
