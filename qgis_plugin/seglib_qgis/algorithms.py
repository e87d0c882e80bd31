"""The three algorithms: each turns its parameters into one of seglib's commands and runs it.

    seglib:segment              python -m seglib.predict --input F --k K --output DIR [--vector gpkg --min-area A]
    seglib:fit_legend           python -m seglib.qgis fit-legend --k K --output legend.json F1 F2 ...
    seglib:segment_with_legend  python -m seglib.predict --input Fi --legend legend.json --output DIR (each Fi)

Nothing here segments: the labels are the command's, byte for byte. Outputs are written to a
private folder beside their destination and moved to their names only when the command
succeeded, so a failed or canceled run leaves nothing (runner.staging).
"""

import re
from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputMultipleLayers,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProviderRegistry,
)

from . import runner

K_MIN, K_MAX = 2, 16
LANES = ["the model's default", "fast", "learned", "none"]  # seglib's --lane choices after the first
GEOTIFF = (".tif", ".tiff")

# Plain text: qgis_process prints it as it is, the Processing dialog turns the line breaks into HTML.
_MODEL_HELP = (
    "\n\nModel checkpoint: a teacher.pt or student.pt trained with seglib; empty: the model bundled with "
    "seglib. Refinement: how boundaries are sharpened back to full resolution (fast: an edge-aware filter; "
    "learned; none)."
)
_RUN_HELP = (
    "\n\nseglib runs in its own Python (the one `python -m seglib.qgis install` recorded, or Settings > "
    "Options > Processing > Providers > seglib), outside QGIS, as the command shown in the log: the "
    "output is that command's, byte for byte. Cancel stops it and leaves no output."
)


class SeglibAlgorithm(QgsProcessingAlgorithm):
    """What the three share: the group, the model parameters, running a command."""

    def group(self):
        return "seglib"

    def groupId(self):
        return "seglib"

    def createInstance(self):
        return type(self)()

    def helpUrl(self):
        return ""

    # --- parameters shared by the algorithms
    def add_k(self):
        self.addParameter(
            QgsProcessingParameterNumber(
                "K",
                f"Number of segments K ({K_MIN}..{K_MAX})",
                QgsProcessingParameterNumber.Integer,
                defaultValue=6,
                minValue=K_MIN,
                maxValue=K_MAX,
            )
        )
        self.addParameter(
            QgsProcessingParameterBoolean("AUTO_K", "Pick K automatically (without labels)", defaultValue=False)
        )
        k_range = QgsProcessingParameterString(
            "K_RANGE", "Range searched when K is picked automatically (e.g. 3..10; empty: seglib's)", optional=True
        )
        k_range.setFlags(k_range.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(k_range)

    def add_model(self, lane=True):
        if lane:
            self.addParameter(QgsProcessingParameterEnum("LANE", "Refinement", options=LANES, defaultValue=0))
        self.addParameter(
            QgsProcessingParameterFile(
                "CHECKPOINT", "Model checkpoint (empty: seglib's bundled model)", extension="pt", optional=True
            )
        )

    def k_args(self, parameters, context):
        if self.parameterAsBoolean(parameters, "AUTO_K", context):
            k_range = (self.parameterAsString(parameters, "K_RANGE", context) or "").strip()
            return ["--k", "auto"] + (["--k-range", k_range] if k_range else [])
        return ["--k", str(self.parameterAsInt(parameters, "K", context))]

    def model_args(self, parameters, context, lane=True):
        args = []
        if lane:
            choice = self.parameterAsEnum(parameters, "LANE", context)
            if choice:
                args += ["--lane", LANES[choice]]
        checkpoint = _absolute(self.parameterAsFile(parameters, "CHECKPOINT", context))
        if checkpoint:
            args += ["--checkpoint", checkpoint]
        return args

    def raster_path(self, layer, name):
        """The GeoTIFF file behind a raster layer; seglib reads files, not QGIS's layers."""
        if layer is None:
            raise QgsProcessingException(f"{name}: no raster layer given")
        uri = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
        path = Path(uri.get("path") or layer.source()).absolute()
        if layer.providerType() != "gdal" or not path.is_file() or path.suffix.lower() not in GEOTIFF:
            raise QgsProcessingException(
                f"{name}: seglib segments GeoTIFF files, and the layer '{layer.name()}' is {layer.source()}; "
                "save it as a GeoTIFF first (Raster > Conversion > Translate, or Export > Save As)"
            )
        return path

    # --- running
    def run_seglib(self, args, feedback, progress=None):
        """``python -m <args>`` in seglib's Python; seglib's errors become QgsProcessingException."""
        from .provider import python_setting

        try:
            python, origin = runner.find_python(python_setting())
            runner.check_python(python, origin)
            return runner.run_command(python, [str(a) for a in args], feedback, progress=progress)
        except runner.SeglibError as exc:
            raise QgsProcessingException(str(exc)) from None


def _absolute(path):
    """A file parameter as an absolute path ('' stays ''): seglib's commands run in another folder."""
    return str(Path(path).absolute()) if path else ""


def _window_progress(feedback, start, span):
    """A progress callback putting seglib's window count into [start, start + span] percent."""

    def update(desc, n, total):
        if desc == "windows" and total:
            feedback.setProgress(start + span * n / total)

    return update


class Segment(SeglibAlgorithm):
    def name(self):
        return "segment"

    def displayName(self):
        return "Segment raster"

    def shortHelpString(self):
        return (
            "Splits an RGB raster (GeoTIFF) into K segments without labels: water, roads, buildings, "
            "vegetation, bare land... The output is a uint8 label GeoTIFF with the input's CRS, transform and "
            "size, label 0 the darkest cluster, 255 nodata, styled with seglib's colour table, as "
            "`python -m seglib.predict --input F --k K` writes it."
            "\n\nK: 2..16, or picked automatically. Legend file: a legend from 'Fit a shared legend' (or "
            "`python -m seglib.predict --save-legend`); K is then the file's. Polygons: also a GeoPackage with "
            "one polygon per segment (label, area); segments smaller than the minimum area (square map units of "
            "the raster's CRS, e.g. m² in UTM) are merged into a neighbour first." + _MODEL_HELP + _RUN_HELP
        )

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "RGB raster (GeoTIFF)"))
        self.add_k()
        self.addParameter(
            QgsProcessingParameterFile(
                "CLUSTERS", "Legend file (shared legend; K is then the file's)", extension="json", optional=True
            )
        )
        self.add_model()
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", "Segments"))
        self.addParameter(
            QgsProcessingParameterVectorDestination(
                "POLYGONS", "Polygons", QgsProcessing.TypeVectorPolygon, optional=True, createByDefault=False
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                "MIN_AREA",
                "Minimum polygon area (square map units; 0: keep every segment)",
                QgsProcessingParameterNumber.Double,
                defaultValue=0.0,
                minValue=0.0,
                optional=True,
            )
        )
        self.addOutput(QgsProcessingOutputNumber("K_USED", "Number of segments"))

    def processAlgorithm(self, parameters, context, feedback):
        source = self.raster_path(self.parameterAsRasterLayer(parameters, "INPUT", context), "INPUT")
        output = Path(self.parameterAsOutputLayer(parameters, "OUTPUT", context)).absolute()
        if output.suffix.lower() not in GEOTIFF:
            raise QgsProcessingException(f"OUTPUT: seglib writes GeoTIFF labels; name the output *.tif, got {output}")
        polygons = self.parameterAsOutputLayer(parameters, "POLYGONS", context) if "POLYGONS" in parameters else ""
        polygons = Path(polygons).absolute() if polygons else None
        if polygons is not None and polygons.suffix.lower() != ".gpkg":
            raise QgsProcessingException(f"POLYGONS: seglib writes GeoPackage polygons (*.gpkg), got {polygons}")
        clusters = _absolute(self.parameterAsFile(parameters, "CLUSTERS", context))
        min_area = self.parameterAsDouble(parameters, "MIN_AREA", context) if parameters.get("MIN_AREA") else 0.0

        with runner.staging(output.parent) as folder:
            args = ["seglib.predict", "--input", source, "--output", folder]
            args += ["--legend", clusters] if clusters else self.k_args(parameters, context)
            args += self.model_args(parameters, context)
            if polygons is not None:
                args += ["--vector", "gpkg"] + (["--min-area", repr(min_area)] if min_area > 0 else [])
            elif min_area > 0:
                feedback.pushInfo("MIN_AREA applies to the polygons, and no POLYGONS output was asked for")
            feedback.setProgressText(f"seglib: segmenting {source.name}")
            lines = self.run_seglib(args, feedback, _window_progress(feedback, 0, 90 if polygons else 100))
            if feedback.isCanceled():
                raise QgsProcessingException(str(runner.Canceled()))
            runner.move_outputs(folder, source.stem, output, {".gpkg": polygons} if polygons else None)
        feedback.setProgress(100)
        k = next((int(m[1]) for m in map(re.compile(r"\(K=(\d+)").search, lines) if m), None)
        return {"OUTPUT": str(output), "POLYGONS": str(polygons) if polygons else None, "K_USED": k}


class FitLegend(SeglibAlgorithm):
    def name(self):
        return "fit_legend"

    def displayName(self):
        return "Fit a shared legend"

    def shortHelpString(self):
        return (
            "Fits one set of K clusters on windows sampled from every raster and saves it as a legend file "
            "(JSON). Segmenting rasters with that file ('Segment with a shared legend', or "
            "`python -m seglib.predict --legend FILE`) gives label ids that mean the same land cover in every "
            "output. The file is bound to the model it was fitted with." + _MODEL_HELP + _RUN_HELP
        )

    def initAlgorithm(self, config=None):
        self.addParameter(
            QgsProcessingParameterMultipleLayers("INPUTS", "RGB rasters (GeoTIFF)", QgsProcessing.TypeRaster)
        )
        self.add_k()
        self.add_model(lane=False)
        self.addParameter(
            QgsProcessingParameterFileDestination("OUTPUT", "Legend file", fileFilter="JSON files (*.json)")
        )

    def processAlgorithm(self, parameters, context, feedback):
        layers = self.parameterAsLayerList(parameters, "INPUTS", context)
        if not layers:
            raise QgsProcessingException("INPUTS: give at least one raster")
        sources = [self.raster_path(layer, "INPUTS") for layer in layers]
        output = Path(self.parameterAsFileOutput(parameters, "OUTPUT", context)).absolute()
        if output.suffix.lower() != ".json":
            raise QgsProcessingException(f"OUTPUT: the legend file is JSON; name it *.json, got {output}")
        with runner.staging(output.parent) as folder:
            staged = folder / output.name
            args = ["seglib.qgis", "fit-legend", *sources, "--output", staged]
            args += self.k_args(parameters, context) + self.model_args(parameters, context, lane=False)
            feedback.setProgressText(f"seglib: fitting one legend on {len(sources)} raster(s)")
            self.run_seglib(args, feedback)
            if feedback.isCanceled():
                raise QgsProcessingException(str(runner.Canceled()))
            runner.move_outputs(folder, output.stem, output)
        feedback.setProgress(100)
        return {"OUTPUT": str(output)}


class SegmentWithLegend(SeglibAlgorithm):
    def name(self):
        return "segment_with_legend"

    def displayName(self):
        return "Segment with a shared legend"

    def shortHelpString(self):
        return (
            "Segments every raster with one legend file (from 'Fit a shared legend'): label i is the same land "
            "cover in every output. Writes <name>.tif per input into the output folder, each with its input's "
            "CRS and transform, as `python -m seglib.predict --input F --legend FILE` does." + _MODEL_HELP + _RUN_HELP
        )

    def initAlgorithm(self, config=None):
        self.addParameter(
            QgsProcessingParameterMultipleLayers("INPUTS", "RGB rasters (GeoTIFF)", QgsProcessing.TypeRaster)
        )
        self.addParameter(QgsProcessingParameterFile("CLUSTERS", "Legend file (shared legend)", extension="json"))
        self.add_model()
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT_FOLDER", "Output folder"))
        self.addOutput(QgsProcessingOutputMultipleLayers("OUTPUT_LAYERS", "Segments"))

    def processAlgorithm(self, parameters, context, feedback):
        layers = self.parameterAsLayerList(parameters, "INPUTS", context)
        if not layers:
            raise QgsProcessingException("INPUTS: give at least one raster")
        sources = [self.raster_path(layer, "INPUTS") for layer in layers]
        by_name = {}
        for source in sources:
            if source.stem in by_name and by_name[source.stem] != source:
                raise QgsProcessingException(
                    f"INPUTS: {by_name[source.stem]} and {source} would both be {source.stem}.tif; rename one"
                )
            by_name[source.stem] = source
        clusters = _absolute(self.parameterAsFile(parameters, "CLUSTERS", context))
        folder_out = Path(self.parameterAsString(parameters, "OUTPUT_FOLDER", context)).absolute()
        targets = {source: folder_out / f"{source.stem}.tif" for source in by_name.values()}
        with runner.staging(folder_out) as folder:
            # Every file is segmented first, then all are moved: a cancel halfway leaves none.
            span = 100 / len(targets)
            for i, source in enumerate(targets):
                args = ["seglib.predict", "--input", source, "--legend", clusters, "--output", folder / str(i)]
                args += self.model_args(parameters, context)
                feedback.setProgressText(f"seglib: segmenting {source.name} ({i + 1} of {len(targets)})")
                self.run_seglib(args, feedback, _window_progress(feedback, i * span, span))
            if feedback.isCanceled():
                raise QgsProcessingException(str(runner.Canceled()))
            for i, (source, target) in enumerate(targets.items()):
                runner.move_outputs(folder / str(i), source.stem, target)
        project = context.project()  # the GUI loads the outputs when done (qgis_process has no project)
        for target in targets.values():
            if project is not None:
                details = QgsProcessingContext.LayerDetails(target.stem, project, "OUTPUT_LAYERS")
                context.addLayerToLoadOnCompletion(str(target), details)
        feedback.setProgress(100)
        return {"OUTPUT_FOLDER": str(folder_out), "OUTPUT_LAYERS": [str(t) for t in targets.values()]}
