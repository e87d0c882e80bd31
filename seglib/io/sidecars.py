"""Files beside an output that GIS software reads with it: a world file (the affine transform of
a PNG), GDAL's ``.aux.xml`` (the CRS, the legend as a colour table of K entries and a raster
attribute table), a QGIS style (``.qml``, loaded by QGIS with the raster: K named classes).

Each function returns the text of one file; ``seglib.io.outputs`` writes them through the same
checked path as the output itself, renamed together with it. What a label means is a ``LabelTable``:
per label its drawn colour, its cluster's mean RGB and its share of the legend's fit sample;
the output adds its own pixel counts.
"""

from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

__all__ = [
    "COLOUR_MODES",
    "LabelTable",
    "colour_name",
    "world_file_path",
    "world_file",
    "pam_path",
    "pam_xml",
    "legend_rows",
    "band_xml",
    "qml_path",
    "qml",
    "read_attribute_table",
]

COLOUR_MODES = ("mean", "categorical")
QGIS_VERSION = "3.22.16-Białowieża"  # the QGIS whose paletted-raster style this file follows

WORLD_SUFFIXES = {".png": ".pgw", ".jpg": ".jgw", ".jpeg": ".jgw", ".tif": ".tfw", ".tiff": ".tfw"}


def world_file_path(raster: Path) -> Path:
    """``a.png`` -> ``a.pgw`` (the name GDAL, QGIS and ArcGIS look for first; ``.wld`` otherwise)."""
    return raster.with_suffix(WORLD_SUFFIXES.get(raster.suffix.lower(), ".wld"))


def _number(value: float) -> str:
    return format(float(value), ".17g")


def world_file(transform) -> str:
    """The six lines of a world file for an ``affine.Affine`` ``transform``: pixel size in x,
    rotation terms, pixel size in y, and the map coordinates of the *centre* of the upper-left
    pixel (the transform gives its corner)."""
    a, b, c, d, e, f = transform[:6]
    return "\n".join(_number(v) for v in (a, d, b, e, c + a / 2 + b / 2, f + d / 2 + e / 2)) + "\n"


def pam_path(raster: Path) -> Path:
    """``a.png`` -> ``a.png.aux.xml``, GDAL's persistent auxiliary metadata beside a raster."""
    return raster.with_name(raster.name + ".aux.xml")


def pam_xml(*, crs_wkt: str | None = None, band: str = "") -> str:
    """GDAL's ``.aux.xml`` (PAMDataset) with the CRS (``crs_wkt``) and ``band``, the inner XML of
    band 1 (colour table, attribute table: ``band_xml``)."""
    lines = ["<PAMDataset>"]
    if crs_wkt:
        lines.append(f"  <SRS dataAxisToSRSAxisMapping={quoteattr('1,2')}>{escape(crs_wkt)}</SRS>")
    if band:
        lines += ['  <PAMRasterBand band="1">', band.rstrip("\n"), "  </PAMRasterBand>"]
    lines.append("</PAMDataset>")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the legend


@dataclass(frozen=True)
class LabelTable:
    """What the K labels of an output mean.

    Arguments:
      colours: (K, 3) uint8, the colour each label is drawn in (its mean RGB, or a categorical palette).
      mean_rgb: (K, 3) the mean RGB (0..255) of each cluster in the sample it was fitted on, or None.
      legend_share: (K,) the share of a shared legend's fit sample each cluster holds, or None
        (a file's own fit).
      mode: ``mean`` or ``categorical``, how ``colours`` were chosen.
    """

    colours: np.ndarray
    mean_rgb: np.ndarray | None = None
    legend_share: np.ndarray | None = None
    mode: str = "categorical"

    @property
    def k(self) -> int:
        return int(len(self.colours))


def colour_name(rgb) -> str:
    """A plain name for a colour ("dark blue", "light grey", "beige"): QGIS shows it in the legend."""
    r, g, b = (float(v) / 255 for v in rgb)
    hue, lightness, saturation = colorsys.rgb_to_hls(r, g, b)
    value = max(r, g, b)
    chroma = value - min(r, g, b)
    if chroma < 0.08:
        names = ((0.15, "black"), (0.4, "dark grey"), (0.65, "grey"), (0.88, "light grey"), (1.01, "white"))
        return next(name for limit, name in names if lightness < limit)
    degrees = hue * 360
    hues = ((15, "red"), (40, "orange"), (65, "yellow"), (90, "yellow-green"), (160, "green"), (195, "teal"),
            (255, "blue"), (290, "purple"), (335, "magenta"), (361, "red"))  # fmt: skip
    name = next(name for limit, name in hues if degrees < limit)
    if name in ("orange", "yellow") and chroma < 0.25 and lightness > 0.55:
        return "beige" if lightness < 0.85 else "cream"
    if name == "orange" and lightness < 0.45:
        name = "brown"
    prefix = "dark " if lightness < 0.3 else "light " if lightness > 0.7 else ""
    return prefix + ("grey-" if chroma < 0.2 and name not in ("brown",) else "") + name


def legend_rows(table: LabelTable, counts: np.ndarray) -> list[dict]:
    """One row per label: ``value``, ``class`` (its name in the legend), the drawn colour,
    the mean RGB, its pixels and share of the output (``counts``: (>= K,) pixels per label,
    nodata excluded), its share of the legend's fit sample."""
    counts = np.asarray(counts[: table.k], np.int64)
    total = max(int(counts.sum()), 1)
    rows = []
    for i in range(table.k):
        mean = None if table.mean_rgb is None else [round(float(v), 1) for v in table.mean_rgb[i]]
        share = 100 * int(counts[i]) / total
        name = colour_name(table.colours[i] if mean is None else mean)
        row = {
            "value": i,
            "class": f"{i}: {name}, {share:.1f} %",
            "red": int(table.colours[i][0]),
            "green": int(table.colours[i][1]),
            "blue": int(table.colours[i][2]),
            "pixels": int(counts[i]),
            "share": round(share, 3),
        }
        if mean is not None:
            row.update(mean_red=mean[0], mean_green=mean[1], mean_blue=mean[2])
        if table.legend_share is not None:
            row["legend_share"] = round(100 * float(table.legend_share[i]), 3)
        rows.append(row)
    return rows


# GDAL's raster attribute table: field type (0 integer, 1 real, 2 string) and usage (GFU_*).
_FIELDS = {
    "value": (0, 5),  # MinMax
    "class": (2, 2),  # Name
    "red": (0, 6),
    "green": (0, 7),
    "blue": (0, 8),
    "mean_red": (1, 0),
    "mean_green": (1, 0),
    "mean_blue": (1, 0),
    "pixels": (0, 1),  # PixelCount
    "share": (1, 0),
    "legend_share": (1, 0),
}


def band_xml(table: LabelTable, counts: np.ndarray) -> str:
    """Band 1 of GDAL's ``.aux.xml``: paletted, a colour table of exactly K entries (nodata, 255,
    stays outside it), the raster attribute table (``legend_rows``) and the colour mode."""
    lines = ["    <ColorInterp>Palette</ColorInterp>", "    <ColorTable>"]
    for r, g, b in np.asarray(table.colours, np.uint8).tolist():
        lines.append(f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="255"/>')
    lines.append("    </ColorTable>")
    rows = legend_rows(table, counts)
    fields = list(rows[0])
    lines.append('    <GDALRasterAttributeTable tableType="thematic">')
    for index, name in enumerate(fields):
        kind, usage = _FIELDS[name]
        lines.append(
            f'      <FieldDefn index="{index}"><Name>{name}</Name><Type>{kind}</Type><Usage>{usage}</Usage></FieldDefn>'
        )
    for row in rows:
        cells = "".join(f"<F>{escape(str(row[name]))}</F>" for name in fields)
        lines.append(f'      <Row index="{row["value"]}">{cells}</Row>')
    lines.append("    </GDALRasterAttributeTable>")
    lines += [
        "    <Metadata>",
        f'      <MDI key="seglib_colours">{escape(_mode_note(table))}</MDI>',
        "    </Metadata>",
    ]
    return "\n".join(lines) + "\n"


def _mode_note(table: LabelTable) -> str:
    if table.mode == "mean":
        return "each label drawn in its cluster's mean RGB"
    return "a categorical palette (seglib.viz.PALETTE)"


def read_attribute_table(raster: Path) -> list[dict]:
    """The rows of the attribute table seglib wrote beside ``raster`` (its ``.aux.xml``), typed,
    or ``[]`` when there is none."""
    path = pam_path(Path(raster))
    if not path.is_file():
        return []
    table = ET.parse(path).find(".//GDALRasterAttributeTable")
    if table is None:
        return []
    fields = [(d.findtext("Name"), int(d.findtext("Type"))) for d in table.findall("FieldDefn")]
    cast = {0: int, 1: float, 2: str}
    return [
        {name: cast[kind](cell.text or "") for (name, kind), cell in zip(fields, row.findall("F"), strict=True)}
        for row in table.findall("Row")
    ]


def qml_path(raster: Path) -> Path:
    """``a.tif`` -> ``a.qml``: the style QGIS loads with the raster by default."""
    return raster.with_suffix(".qml")


def qml(table: LabelTable, counts: np.ndarray) -> str:
    """A QGIS style for the label raster, in the form QGIS 3.22 writes for a paletted raster:
    K classes, each with its colour and name (``legend_rows``), nearest-neighbour resampling."""
    entries = "\n".join(
        f'        <paletteEntry value="{row["value"]}" color="#{row["red"]:02x}{row["green"]:02x}{row["blue"]:02x}" '
        f'alpha="255" label={quoteattr(row["class"])}/>'
        for row in legend_rows(table, counts)
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="{QGIS_VERSION}" styleCategories="AllStyleCategories"
      hasScaleBasedVisibilityFlag="0" minScale="1e+08" maxScale="0">
  <customproperties>
    <Option type="Map">
      <Option name="identify/format" type="QString" value="Value"/>
    </Option>
  </customproperties>
  <pipe>
    <provider>
      <resampling enabled="false" maxOversampling="2"
                  zoomedInResamplingMethod="nearestNeighbour" zoomedOutResamplingMethod="nearestNeighbour"/>
    </provider>
    <rasterrenderer type="paletted" band="1" alphaBand="-1" opacity="1" nodataColor="">
      <rasterTransparency/>
      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Estimated</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>
      <colorPalette>
{entries}
      </colorPalette>
      <colorramp name="[source]" type="randomcolors"/>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation colorizeOn="0" colorizeRed="255" colorizeGreen="128" colorizeBlue="128"
                   colorizeStrength="100" grayscaleMode="0" saturation="0" invertColors="0"/>
    <rasterresampler maxOversampling="2"/>
    <resamplingStage>resamplingFilter</resamplingStage>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""
