"""Run by tests/test_qgis.py under QGIS's own Python (PyQGIS, QgsApplication offscreen): QGIS's
view of seglib's outputs and of the plugin's algorithms, printed as one JSON line.

    python3 tests/qgis_session.py layer OUT.tif                  # how QGIS loads and styles a label raster
    python3 tests/qgis_session.py cancel PLUGINS IN.tif OUT.tif  # seglib:segment canceled at its first window
    python3 tests/qgis_session.py setting PLUGINS PYTHON IN.tif OUT.tif  # with the provider setting PYTHON

Not a test module (pytest does not collect it) and it imports nothing of seglib: it is the QGIS side.
"""

import json
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingFeedback, QgsRasterLayer  # noqa: E402


def start() -> QgsApplication:
    app = QgsApplication([], False)
    app.initQgis()
    return app


def layer(path: str) -> dict:
    """The layer QGIS makes of a label GeoTIFF, its default style included (a .qml beside it)."""
    lyr = QgsRasterLayer(path, "segments")
    renderer = lyr.renderer()
    classes = renderer.classes() if renderer is not None and renderer.type() == "paletted" else []
    provider = lyr.dataProvider()
    return {
        "valid": lyr.isValid(),
        "renderer": renderer.type() if renderer is not None else None,
        "classes": [
            [c.value, c.color.red(), c.color.green(), c.color.blue(), c.color.alpha(), c.label] for c in classes
        ],
        "crs": lyr.crs().authid(),
        "extent": [lyr.extent().xMinimum(), lyr.extent().yMinimum(), lyr.extent().xMaximum(), lyr.extent().yMaximum()],
        "size": [lyr.width(), lyr.height()],
        "nodata": provider.sourceNoDataValue(1) if provider.sourceHasNoDataValue(1) else None,
    }


class Recorder(QgsProcessingFeedback):
    """A feedback that keeps the console lines and errors; with ``cancel_on_progress``, it
    cancels when seglib reports its first finished window (as a user pressing Cancel)."""

    def __init__(self, cancel_on_progress=False):
        super().__init__()
        self.cancel_on_progress = cancel_on_progress
        self.console, self.errors = [], []
        self.canceled_at = None
        self.progressChanged.connect(self._progress)

    def pushConsoleInfo(self, info):
        self.console.append(info)

    def reportError(self, error, fatalError=False):
        self.errors.append(error)

    def _progress(self, value):
        if self.cancel_on_progress and value > 0 and self.canceled_at is None:
            self.canceled_at = value
            self.cancel()


def load_plugin(plugins: str):
    """Processing, then the plugin as QGIS loads one: classFactory, then initProcessing. Keep the
    plugin object alive while its algorithms run (QGIS keeps it too)."""
    sys.path.insert(0, os.path.join(QgsApplication.pkgDataPath(), "python", "plugins"))  # Processing itself
    sys.path.insert(0, plugins)
    from processing.core.Processing import Processing

    Processing.initialize()
    import seglib_qgis

    plugin = seglib_qgis.classFactory(None)
    plugin.initProcessing()
    return plugin


def cancel(plugins: str, source: str, output: str) -> dict:
    """Run seglib:segment as the Processing toolbox does, Cancel pressed at its first window."""
    plugin = load_plugin(plugins)  # noqa: F841 (kept alive)
    algorithm = QgsApplication.processingRegistry().algorithmById("seglib:segment").create()
    feedback, context = Recorder(cancel_on_progress=True), QgsProcessingContext()
    start_time = time.perf_counter()
    # As the toolbox runs it: exceptions are caught and reported to the feedback (what the dialog shows).
    _, ok = algorithm.run({"INPUT": source, "K": 4, "OUTPUT": output}, context, feedback)
    return {
        "ok": bool(ok),
        "errors": feedback.errors,
        "canceled_at": feedback.canceled_at,
        "seconds": time.perf_counter() - start_time,
        "console": feedback.console,
    }


def setting(plugins: str, python: str, source: str, output: str) -> dict:
    """The provider's setting 'Python with seglib' (Settings > Options > Processing > Providers)
    set to ``python``: which Python seglib:segment then runs, as its error or log says."""
    plugin = load_plugin(plugins)  # noqa: F841 (kept alive)
    from processing.core.ProcessingConfig import ProcessingConfig

    ProcessingConfig.setSettingValue("SEGLIB_PYTHON", python)
    algorithm = QgsApplication.processingRegistry().algorithmById("seglib:segment").create()
    feedback = Recorder()
    _, ok = algorithm.run({"INPUT": source, "K": 4, "OUTPUT": output}, QgsProcessingContext(), feedback)
    ProcessingConfig.setSettingValue("SEGLIB_PYTHON", "")
    return {"ok": bool(ok), "errors": feedback.errors}


def main(argv):
    app = start()
    try:
        if argv[0] == "layer":
            result = layer(argv[1])
        elif argv[0] == "cancel":
            result = cancel(*argv[1:4])
        elif argv[0] == "setting":
            result = setting(*argv[1:5])
        else:
            raise SystemExit(f"unknown command {argv[0]!r}")
    finally:
        app.exitQgis()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
