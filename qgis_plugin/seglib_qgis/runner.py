"""Runs seglib's commands in seglib's own Python, outside QGIS's process.

QGIS's process already holds its own GDAL (and NumPy): rasterio's wheel, imported into it, binds
to QGIS's GDAL through the process's global symbols while its own GDAL is loaded beside it
(docs/qgis.md has the measurement). So the plugin never imports seglib: every algorithm runs
``<python> -m seglib.<command>`` as a child process, the way QGIS drives GRASS or SAGA. The
output is then the command's output byte for byte, Cancel stops the child, and a crash in the
child cannot take QGIS down.

This module uses the standard library only (no QGIS), so the plugin's logic can be tested
without QGIS; ``feedback`` is anything with QgsProcessingFeedback's ``isCanceled``,
``pushCommandInfo`` and ``pushConsoleInfo``.

Which Python: the first of (1) the provider's setting, (2) the ``SEGLIB_PYTHON`` environment
variable, (3) the interpreter recorded by ``python -m seglib.qgis install`` in ``installed.json``
beside this file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from queue import Empty, Queue

ENV_VAR = "SEGLIB_PYTHON"
INSTALLED = Path(__file__).with_name("installed.json")

# tqdm reads its defaults from TQDM_* variables (tqdm >= 4.66): the child's progress bars become
# lines this module parses ("windows: 3/12"); with an older tqdm the default bar also holds "n/total".
PROGRESS_ENV = {"TQDM_BAR_FORMAT": "{desc}: {n}/{total}", "TQDM_MININTERVAL": "0.2", "PYTHONUNBUFFERED": "1"}
# ``python -m MODULE ARGS`` with Ctrl-C restored first: a child inherits an ignored SIGINT (QGIS
# started in the background, by nohup or a service) and a blocked one, and Python then never
# raises KeyboardInterrupt, so Cancel's interrupt would be lost and the command run to its end.
_AS_MODULE = (
    "import runpy, signal, sys; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "hasattr(signal, 'pthread_sigmask') and signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
    "del sys.argv[0]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)
PROGRESS_LINE = re.compile(
    r"^(?P<desc>[A-Za-z][\w ]*): (?:(?P<n>\d+)/(?P<total>\d+)"  # our format
    r"| *\d+%\|[^|]*\| *(?P<n2>\d+)/(?P<total2>\d+)\b.*)$"  # tqdm's default
)

# Modules the child needs (seglib's "geo" extra brings rasterio and fiona).
REQUIRED = ("seglib", "torch", "rasterio", "fiona")
_PROBE = "import importlib.util as u, json, sys; print(json.dumps([m for m in sys.argv[1:] if u.find_spec(m) is None]))"

HOW_TO_SET = (
    "run `python -m seglib.qgis install` with the Python that has seglib, or set its path in Settings > "
    "Options > Processing > Providers > seglib > 'Python with seglib', or in the environment variable SEGLIB_PYTHON"
)


class SeglibError(Exception):
    """A failure to show the user as one line (the algorithms raise it as QgsProcessingException)."""


class Canceled(SeglibError):
    def __init__(self) -> None:
        super().__init__("canceled: seglib was stopped and no output was written")


def recorded_python(installed: Path = INSTALLED) -> str | None:
    """The interpreter ``python -m seglib.qgis install`` recorded, or None."""
    try:
        return json.loads(installed.read_text())["python"] or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_python(setting: str | None = None, *, installed: Path = INSTALLED) -> tuple[str, str]:
    """``(path, where it came from)`` of the Python that runs seglib; ``SeglibError`` if none is set."""
    for value, origin in (
        (setting, "the provider setting 'Python with seglib'"),
        (os.environ.get(ENV_VAR), f"the environment variable {ENV_VAR}"),
        (recorded_python(installed), f"`python -m seglib.qgis install` ({installed})"),
    ):
        if value and value.strip():
            return value.strip(), origin
    raise SeglibError(f"QGIS does not know which Python has seglib: {HOW_TO_SET}")


_checked: set[str] = set()  # interpreters that passed check_python in this QGIS session


def check_python(python: str, origin: str = "") -> None:
    """``SeglibError`` saying what to install when ``python`` cannot run seglib's commands."""
    if python in _checked:
        return
    where = f" (from {origin})" if origin else ""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise SeglibError(f"the Python for seglib, {python}{where}, does not exist or cannot run; {HOW_TO_SET}")
    try:
        probe = subprocess.run(
            [python, "-c", _PROBE, *REQUIRED], capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir()
        )
        missing = json.loads(probe.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise SeglibError(f"could not run the Python for seglib, {python}{where}: {exc}; {HOW_TO_SET}") from None
    if "seglib" in missing:
        raise SeglibError(
            f"the Python for seglib, {python}{where}, has no seglib: install it there (in seglib's clone: "
            f"`{python} -m pip install -e '.[geo]'`, which brings PyTorch, rasterio and fiona too), or {HOW_TO_SET}"
        )
    if missing:
        raise SeglibError(
            f"the Python for seglib, {python}{where}, lacks {', '.join(missing)}: "
            f"install {'it' if len(missing) == 1 else 'them'} with `{python} -m pip install {' '.join(missing)}`"
        )
    _checked.add(python)


def one_line(stderr_lines: Sequence[str], returncode: int) -> str:
    """seglib's one-line message from a failed command's error output.

    The commands print ``error: ...`` (unusable arguments) or ``FAILED <file>: ...`` (a file
    that could not be segmented); anything else that failed ends in a traceback whose last line
    names the exception."""
    lines = [line.strip() for line in stderr_lines if line.strip() and not PROGRESS_LINE.match(line.strip())]
    for line in reversed(lines):
        failed = re.match(r"^FAILED (.+?): (.*)$", line)  # "FAILED <file>: <seglib's message>"
        if failed:
            name, message = failed.groups()
            return message if Path(name).name in message else f"{name}: {message}"
        match = re.match(r"^(?:\S*: )?error: (.*)$", line)  # ours, or argparse's "prog: error: ..."
        if match:
            return match.group(1)
    if any(line.startswith("Traceback") for line in lines):
        return f"seglib stopped with an unexpected error: {lines[-1]}"
    if lines:
        return lines[-1]
    return f"seglib exited with status {returncode} without a message"


def _read_lines(stream, kind: str, queue: Queue) -> None:
    """Put the stream's lines (ended by \\n or tqdm's \\r) on ``queue``, then ``(kind, None)``."""
    buffer = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for line in lines:
            if line.strip():
                queue.put((kind, line.decode("utf-8", "replace")))
    if buffer.strip():
        queue.put((kind, buffer.decode("utf-8", "replace")))
    queue.put((kind, None))


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the child: an interrupt first (seglib's commands then remove their temporary files),
    a kill if it has not ended after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        if os.name == "posix":
            proc.send_signal(signal.SIGINT)
        else:
            proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_command(
    python: str,
    args: Sequence[str],
    feedback,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    poll: float = 0.1,
    cwd: str | Path | None = None,
) -> list[str]:
    """Run ``python -m <args>``; the child's lines go to the feedback's console, its progress
    lines to ``progress(desc, n, total)``. Returns the stdout lines.

    Raises ``Canceled`` when the feedback is canceled (the child is stopped first) and
    ``SeglibError`` with seglib's one-line message when the command fails. The command runs in
    the temporary folder, so a ``seglib/`` folder in QGIS's working folder cannot stand in for
    the installed one: paths in ``args`` must be absolute."""
    env = {**os.environ, **PROGRESS_ENV}
    env.pop("PYTHONHOME", None)  # QGIS's bundles set these for their own Python, not seglib's
    env.pop("PYTHONPATH", None)
    feedback.pushCommandInfo(" ".join(_quote(a) for a in [python, "-m", *args]))
    command = [python, "-c", _AS_MODULE, *args]  # the same, with Ctrl-C restored (_AS_MODULE)
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window flashing up on Windows
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tempfile.gettempdir() if cwd is None else cwd,
            creationflags=flags,
        )
    except OSError as exc:
        raise SeglibError(f"could not start {python}: {exc}; {HOW_TO_SET}") from None
    queue: Queue = Queue()
    readers = [
        threading.Thread(target=_read_lines, args=(proc.stdout, "out", queue), daemon=True),
        threading.Thread(target=_read_lines, args=(proc.stderr, "err", queue), daemon=True),
    ]
    for reader in readers:
        reader.start()
    out, err, open_streams = [], [], [2]

    def take(timeout: float) -> None:
        """One line from the child, if one comes within ``timeout``: to the console or ``progress``."""
        try:
            kind, line = queue.get(timeout=timeout)
        except Empty:
            return
        if line is None:
            open_streams[0] -= 1
            return
        match = PROGRESS_LINE.match(line.strip()) if kind == "err" else None
        if match:
            if progress is not None:
                n, total = match["n"] or match["n2"], match["total"] or match["total2"]
                progress(match["desc"], int(n), int(total))
            return
        (out if kind == "out" else err).append(line)
        feedback.pushConsoleInfo(line)

    def cancel() -> Canceled:
        _stop(proc)
        deadline = time.monotonic() + 2.0
        while open_streams[0] and time.monotonic() < deadline:  # its last words ("interrupted: ...")
            take(0.1)
        return Canceled()

    try:
        while open_streams[0]:
            if feedback.isCanceled():
                raise cancel()
            take(poll)
        while proc.poll() is None:
            if feedback.isCanceled():
                raise cancel()
            time.sleep(poll)
    finally:
        if proc.poll() is None:  # an exception on the way: never leave the child running
            _stop(proc, grace=2.0)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
    if proc.returncode != 0:
        raise SeglibError(one_line(err, proc.returncode))
    return out


def _quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or not arg) else arg


@contextmanager
def staging(destination: Path) -> Iterator[Path]:
    """A private folder in the ``destination`` folder (the same file system, so moving out of it
    is a rename), removed on the way out whatever happens: output written there reaches its
    final name only when the run succeeded."""
    destination.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".seglib-", dir=destination))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def move_outputs(folder: Path, stem: str, target: Path, extra: dict[str, Path] | None = None) -> list[Path]:
    """Move the files ``<stem>.*`` that a command wrote in ``folder`` to ``target``'s name.

    ``<stem>.tif`` becomes ``target``, its companions follow it under the names GIS software
    looks for: ``<stem>.qml`` (the style) beside it as ``<target stem>.qml``, ``<stem>.tif.aux.xml``
    (colour table, attribute table) as ``<target name>.aux.xml``, so also for a ``.tiff`` target;
    ``extra`` maps a suffix (``".gpkg"``) to its own destination. Returns the files moved."""
    extra = extra or {}
    moved = []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(stem + "."))
    for path in files:
        rest = path.name[len(stem) :]  # ".tif", ".qml", ".tif.aux.xml", ...
        raster = next((s for s in (".tif", ".tiff") if rest.lower().startswith(s + ".")), None)
        if rest in extra:
            dest = extra[rest]
        elif rest == target.suffix.lower() or rest in (".tif", ".tiff"):
            dest = target
        elif raster is not None:  # a sidecar of the raster itself: ".tif.aux.xml"
            dest = target.with_name(target.name + rest[len(raster) :])
        else:
            dest = target.with_name(target.stem + rest)
        _move(path, dest)
        moved.append(dest)
    return moved


def _move(source: Path, dest: Path) -> None:
    """A rename; across file systems a copy under a temporary name beside ``dest``, then a rename,
    so ``dest`` is never a half-copied file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, dest)
    except OSError:
        tmp = dest.with_name(f".{dest.name}.seglib-tmp")
        try:
            shutil.copy2(source, tmp)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
