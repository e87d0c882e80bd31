"""The Processing provider "seglib": its algorithms and its one setting, the Python with seglib."""

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import FitLegend, Segment, SegmentWithLegend
from .runner import ENV_VAR

PYTHON_SETTING = "SEGLIB_PYTHON"  # Settings > Options > Processing > Providers > seglib


def _config():
    try:  # the Processing plugin's settings (present wherever Processing runs, GUI and qgis_process)
        from processing.core.ProcessingConfig import ProcessingConfig, Setting

        return ProcessingConfig, Setting
    except ImportError:
        return None, None


def python_setting() -> str:
    """The provider's 'Python with seglib' setting ('' when unset or unavailable)."""
    config, _ = _config()
    return (config.getSetting(PYTHON_SETTING) or "") if config is not None else ""


class SeglibProvider(QgsProcessingProvider):
    def id(self):
        return "seglib"

    def name(self):
        return "seglib"

    def longName(self):
        return "seglib: unsupervised segmentation of RGB imagery"

    def icon(self):
        return QIcon(str(Path(__file__).with_name("icon.svg")))

    def load(self):
        config, setting = _config()
        if config is not None:
            config.settingIcons[self.name()] = self.icon()
            config.addSetting(
                setting(
                    self.name(),
                    PYTHON_SETTING,
                    f"Python with seglib (empty: {ENV_VAR}, else the one `python -m seglib.qgis install` recorded)",
                    "",
                    valuetype=setting.FILE,
                )
            )
            config.readSettings()
        self.refreshAlgorithms()
        return True

    def unload(self):
        config, _ = _config()
        if config is not None:
            config.removeSetting(PYTHON_SETTING)

    def loadAlgorithms(self):
        for algorithm in (Segment(), FitLegend(), SegmentWithLegend()):
            self.addAlgorithm(algorithm)

    def supportedOutputRasterLayerExtensions(self):  # seglib writes GeoTIFF labels
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self):  # and GeoPackage polygons
        return ["gpkg"]

    def supportsNonFileBasedOutput(self):  # a child process writes every output to a file
        return False
