"""seglib's QGIS plugin: a Processing provider whose algorithms run seglib's commands.

Installed by ``python -m seglib.qgis install`` (docs/qgis.md). QGIS imports this package; it
never imports seglib itself (see runner.py for why).
"""


def classFactory(iface):
    from .plugin import SeglibPlugin

    return SeglibPlugin(iface)
