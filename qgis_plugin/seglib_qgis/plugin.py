"""The plugin object QGIS creates: it registers the Processing provider (GUI and qgis_process)."""

from qgis.core import QgsApplication

from .provider import SeglibProvider


class SeglibPlugin:
    def __init__(self, iface=None):
        self.iface = iface
        self.provider = None

    def initProcessing(self):  # qgis_process calls only this one
        if self.provider is None:
            self.provider = SeglibProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
