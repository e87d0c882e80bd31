"""Command line: seglib in QGIS (docs/qgis.md).

    python -m seglib.qgis install                      # the Processing plugin into QGIS's default profile
    python -m seglib.qgis install --profile work       # into the profile "work"
    python -m seglib.qgis fit-legend --k 6 --output legend.json a.tif b.tif   # one legend for a set

``install`` copies the plugin (``seglib_qgis``: the algorithms seglib:segment, seglib:fit_legend
and seglib:segment_with_legend) into ``<profile>/python/plugins/``, enables it in the profile's
settings, and records the Python that ran it: QGIS runs seglib's commands in that Python, in a
child process, never inside QGIS's own (which has its own GDAL and NumPy). Run it again after
moving the environment or updating seglib. The profiles live where QGIS keeps them
(``QGIS_CUSTOM_CONFIG_PATH`` or ``--profiles-path`` as QGIS itself takes them).

``fit-legend`` is the command behind the plugin's "Fit a shared legend": one set of K clusters
fitted on windows sampled from every raster (``seglib.fit_legend``), saved as a legend file
for ``python -m seglib.predict --legend FILE`` or the plugin's "Segment with a shared legend".

Exit status 0, 2 for unusable arguments or files (the message says which and what to do).
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import K_MAX, K_MIN, check_k

__all__ = ["PLUGIN", "profiles_root", "profile_folder", "plugin_source", "install", "enable_plugin", "main"]

PLUGIN = "seglib_qgis"  # the plugin's folder name, its key in QGIS's [PythonPlugins] settings
PLUGIN_FILES = ("__init__.py", "metadata.txt", "plugin.py", "provider.py", "algorithms.py", "runner.py", "icon.svg")


def profiles_root(profiles_path: str | Path | None = None) -> Path:
    """The folder holding QGIS's user profiles, as QGIS finds it: ``--profiles-path``, else
    ``QGIS_CUSTOM_CONFIG_PATH``, else the platform's place for QGIS 3 (``profiles/`` below it)."""
    base = profiles_path or os.environ.get("QGIS_CUSTOM_CONFIG_PATH")
    if not base:
        if sys.platform == "win32":
            base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "QGIS" / "QGIS3"
        elif sys.platform == "darwin":
            base = Path.home() / "Library" / "Application Support" / "QGIS" / "QGIS3"
        else:
            base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "QGIS" / "QGIS3"
    return Path(base) / "profiles"


def profile_folder(root: Path, name: str | None = None) -> Path:
    """The profile ``name``, or QGIS's default one (``profiles.ini``, else "default")."""
    if name is None:
        ini = configparser.ConfigParser(interpolation=None)
        try:
            ini.read(root / "profiles.ini", encoding="utf-8")
        except configparser.Error:
            pass
        name = ini.get("core", "defaultProfile", fallback="default") or "default"
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"--profile must be a profile name (a folder under {root}), got {name!r}")
    return root / name


def plugin_source() -> Path:
    """The plugin's files: installed with seglib (package ``seglib_qgis``) or beside the package in a clone."""
    spec = importlib.util.find_spec(PLUGIN)  # finds the folder without importing it (it needs QGIS)
    candidates = list(spec.submodule_search_locations or []) if spec else []
    candidates.append(Path(__file__).resolve().parents[1] / "qgis_plugin" / PLUGIN)
    for folder in map(Path, candidates):
        if (folder / "metadata.txt").is_file():
            return folder
    raise FileNotFoundError(f"the QGIS plugin's files ({PLUGIN}/) are not installed with seglib; reinstall seglib")


def enable_plugin(settings: Path, plugin: str = PLUGIN) -> None:
    """Set ``[PythonPlugins] <plugin>=true`` in a QGIS3.ini, leaving every other line as it is
    (QGIS's own settings file: Qt's format, which a rewrite by configparser would disturb)."""
    lines = settings.read_text(encoding="utf-8").splitlines() if settings.exists() else []
    entry = f"{plugin}=true"
    start = next((i for i, line in enumerate(lines) if line.strip() == "[PythonPlugins]"), None)
    if start is None:
        lines += ([""] if lines and lines[-1].strip() else []) + ["[PythonPlugins]", entry]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        key = next((i for i in range(start + 1, end) if lines[i].split("=", 1)[0].strip() == plugin), None)
        if key is None:
            lines.insert(start + 1, entry)
        else:
            lines[key] = entry
    settings.parent.mkdir(parents=True, exist_ok=True)
    tmp = settings.with_name(f".{settings.name}.seglib-tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, settings)


def install(profile: str | None = None, profiles_path: str | Path | None = None, python: str | None = None) -> Path:
    """Copy the plugin into the profile, record ``python`` (default: this interpreter), enable it.
    Returns the installed plugin folder."""
    source = plugin_source()
    folder = profile_folder(profiles_root(profiles_path), profile)
    plugins = folder / "python" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    target = plugins / PLUGIN
    staged = Path(tempfile.mkdtemp(prefix=f".{PLUGIN}-", dir=plugins))
    try:  # a complete copy replaces the old one, never a half-written plugin
        for name in PLUGIN_FILES:
            shutil.copy2(source / name, staged / name)
        record = {
            "python": python or sys.executable,
            "seglib_version": _version(),
            "seglib": str(Path(__file__).parent),
        }
        (staged / "installed.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    enable_plugin(folder / "QGIS" / "QGIS3.ini")
    return target


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("seglib")
    except PackageNotFoundError:
        return "unknown"


def _missing(modules: tuple[str, ...] = ("torch", "rasterio", "fiona")) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _install_main(args: argparse.Namespace) -> int:
    try:
        target = install(args.profile, args.profiles_path)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"installed the QGIS plugin {PLUGIN} in {target} and enabled it")
    print(f"QGIS runs seglib in this Python, in a child process: {sys.executable}")
    print(
        "  (to use another: Settings > Options > Processing > Providers > seglib > 'Python with seglib', "
        "or SEGLIB_PYTHON=/path/to/python; run this command again after moving this environment)"
    )
    missing = _missing()
    if missing:
        print(f"warning: this Python lacks {', '.join(missing)}: `{sys.executable} -m pip install {' '.join(missing)}`")
    print("restart QGIS; then Processing Toolbox > seglib, or headless:")
    print("  QT_QPA_PLATFORM=offscreen qgis_process run seglib:segment -- INPUT=tile.tif K=6 OUTPUT=out.tif")
    print("  (Debian 12's QGIS 3.22: qgis_process.bin instead of its broken qgis_process wrapper)")
    return 0


def _k_or_auto(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return check_k(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"K must be an integer in {K_MIN}..{K_MAX} or auto, got {text!r}") from None


def _fit_legend_main(args: argparse.Namespace) -> int:
    from .inference.api import fit_legend, load_model

    if args.output.suffix.lower() != ".json":
        print(f"error: the legend file is JSON: name it *.json, got {args.output}", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.inputs if not p.is_file()]
    if missing:
        print(f"error: input not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        model = load_model(args.checkpoint)
        kwargs = {"k_range": args.k_range} if args.k_range else {}
        legend = fit_legend(args.inputs, args.k, model, **kwargs)
        legend.save(args.output)
    except (ValueError, OSError) as exc:  # bad K, checkpoint or raster: seglib's message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    auto = f" (auto, {legend.meta['k_auto']['rule']})" if args.k == "auto" else ""
    print(f"legend (K={legend.k}{auto}) of {len(args.inputs)} raster(s) -> {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seglib.qgis", description="seglib in QGIS (docs/qgis.md)")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install", help="install the Processing plugin into a QGIS profile and enable it")
    i.add_argument("--profile", default=None, help="QGIS profile name (default: QGIS's default profile)")
    i.add_argument(
        "--profiles-path",
        default=None,
        help="folder holding QGIS's profiles/ (as QGIS's --profiles-path; default: QGIS_CUSTOM_CONFIG_PATH, "
        "else the platform's QGIS3 folder)",
    )
    f = sub.add_parser("fit-legend", help="fit one legend (a legend file) on several rasters")
    f.add_argument("inputs", nargs="+", type=Path, help="the rasters (GeoTIFF, PNG, JPEG)")
    f.add_argument("--k", required=True, type=_k_or_auto, help=f"number of segments, {K_MIN}..{K_MAX}, or auto")
    f.add_argument("--output", required=True, type=Path, help="the legend file to write (*.json)")
    f.add_argument("--checkpoint", type=Path, default=None, help="teacher.pt or student.pt (default: bundled model)")
    f.add_argument("--k-range", default=None, help="range searched by --k auto, e.g. 3..10")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "install":
            return _install_main(args)
        return _fit_legend_main(args)
    except KeyboardInterrupt:
        print("interrupted: stopped, no partial output left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
