"""seglib: unsupervised segmentation of aerial and satellite RGB imagery.

from seglib import MonolithicSegmenter, StudentSegmenter, segment, load_model
labels = segment(image_uint8_hxwx3, k=5)     # bundled default model, any H and W
legend = fit_legend([a, b, "c.tif"], 6)     # one legend for many images: segment(x, legend=legend)
labels = Predictor(load_model(), 6).labels(image)  # a model at K for inference, lower level
"""

from __future__ import annotations

from .config import Config, ConfigError
from .models.teacher import MonolithicSegmenter

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "MonolithicSegmenter",
    "StudentSegmenter",
    "load_model",
    "segment",
    "fit_legend",
    "load_legend",
    "Predictor",
    "__version__",
]


def __getattr__(name: str):
    # Imported lazily so that `import seglib` stays light for the CLI and notebooks.
    if name == "StudentSegmenter":
        from .models.student import StudentSegmenter

        return StudentSegmenter
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "Predictor":
        from .inference.predictor import Predictor

        return Predictor
    if name in ("segment", "fit_legend", "load_legend"):
        from .inference import api

        return getattr(api, name)
    raise AttributeError(f"module 'seglib' has no attribute {name!r}")
