"""The Python API: ``load_model`` and ``segment``, and ``fit_legend`` for one legend.

    import seglib
    labels = seglib.segment(image, k=5)                        # (H, W) uint8, bundled model
    model = seglib.load_model("runs/teacher/teacher.pt")       # a teacher or student checkpoint
    labels, probs = seglib.segment(image, 5, model, return_probs=True)  # probs (K, H, W) float32
    labels = seglib.segment(image, "auto")                     # K picked without labels (2..8)

    legend = seglib.fit_legend(["a.tif", b_array], 6, model=model)  # one legend for a set
    labels = seglib.segment(c_array, model=model, legend=legend)      # label i means the same in all
    legend.save("legend.json"); legend = seglib.load_legend("legend.json", model=model)

``image`` is a NumPy array (H, W, 3), uint8 or float in [0, 1], of any H and W. Anything else
raises ``ValueError`` naming the problem and the fix (docs/bad-inputs.md lists every case).
Both go to the inference engine, ``seglib.inference.engine``: images up to ``tile`` pixels on each side go
through the model in one piece (reflect-padded to its stride, cropped back), larger ones window
by window (shared prototypes fitted on sampled windows, overlapping windows blended), so memory
stays bounded. ``load_model`` is ``seglib.models.load_model``. Label ids follow a documented
order (the brightness of each cluster's mean colour, darkest first; ``seglib.inference.legend``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import check_k, check_lane
from ..models import load_model
from .engine import segment_array
from .kselect import DEFAULT_RANGE, check_k_range, fit_sources_auto
from .legend import Legend, fit_sources, load_legend
from .predictor import Predictor, model_stride
from .windows import DEFAULT_OVERLAP, DEFAULT_TILE, FIT_PIXELS, Tiling

__all__ = ["load_model", "check_image", "check_mask", "segment", "fit_legend", "load_legend", "resolve_legend"]

_ROWS = 256  # rows per chunk when scanning float images for NaN and range (bounded memory)


@functools.lru_cache(maxsize=1)
def _default_model() -> torch.nn.Module:
    # Loaded once per process: segment() in a loop should not re-read the weights.
    return load_model(None)


def check_image(image: object) -> np.ndarray:
    """Validate a ``segment`` input; raises ``ValueError`` that names the problem and the fix."""
    if not isinstance(image, np.ndarray):
        hint = "image.numpy() (and permute to H, W, 3)" if isinstance(image, torch.Tensor) else "np.asarray(image)"
        raise ValueError(f"image must be a NumPy array (H, W, 3), got {type(image).__name__}; convert with {hint}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        raise ValueError(
            f"image is grayscale (shape {image.shape}), but seglib needs RGB (H, W, 3); replicate it with "
            "np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)"
        )
    if image.ndim != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape} ({image.ndim} dimensions)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {image.shape}); pass an image with at least one pixel")
    c = image.shape[-1]
    if c != 3:
        if c == 4:
            fix = "drop alpha (or NIR): image[..., :3]; for alpha, also pass mask=image[..., 3] > 0"
        elif c == 2:
            fix = "grayscale + alpha: np.repeat(image[..., :1], 3, axis=-1)"
        elif image.shape[0] in (3, 4):
            fix = "the bands look channel-first (C, H, W): np.moveaxis(image, 0, -1)"
        else:
            fix = "pick the red, green and blue bands: image[..., [r, g, b]]"
        raise ValueError(f"image must have 3 channels (H, W, 3), got {c} (shape {image.shape}); {fix}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        if image.dtype in (np.uint16, np.int16):
            fix = "16-bit imagery: seglib.io.images.to_uint8_rgb(image)[0] stretches it (2nd-98th percentile) to uint8"
        else:
            fix = "pass uint8 (0..255) or float in [0, 1]; e.g. image.astype(np.uint8) if values are 0..255"
        raise ValueError(f"image dtype {image.dtype} is not supported; {fix}")
    lo, hi = np.inf, -np.inf
    for y in range(0, image.shape[0], _ROWS):
        rows = image[y : y + _ROWS]
        if not np.isfinite(rows).all():
            raise ValueError(
                "image contains NaN or inf pixels; replace them first, e.g. np.nan_to_num(image, nan=0.0, "
                "posinf=1.0, neginf=0.0), or mark them as nodata: mask=np.isfinite(image).all(-1)"
            )
        lo, hi = min(lo, float(rows.min())), max(hi, float(rows.max()))
    if lo < 0 or hi > 1:
        raise ValueError(
            f"float image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; scale it, e.g. image / 255 "
            "for 0..255 data, or np.clip(image, 0, 1)"
        )
    return image


def _check_k_or_auto(k: object) -> int | str:
    if isinstance(k, str) and k.strip().lower() == "auto":
        return "auto"
    return check_k(k)


def fit_legend(
    images: Sequence[np.ndarray | str | Path] | np.ndarray | str | Path,
    k: int | str,
    model: torch.nn.Module | None = None,
    *,
    k_range: tuple[int, int] | str = DEFAULT_RANGE,
    tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    fit_windows: int = 16,
    fit_pixels: int = FIT_PIXELS,
    seed: int = 0,
) -> Legend:
    """One set of ``k`` clusters for a set of images (arrays and/or file paths, GeoTIFFs read
    window by window), fitted on windows sampled from every one of them, in the stable order.

    Arguments:
      images: the images, or one image; arrays as ``segment`` takes them, files as ``predict``.
      k: 2..16, or ``"auto"``: picked in ``k_range`` by ``seglib.inference.kselect.AUTO_RULE`` (the
        chosen K is ``.k``, the evidence ``.meta["k_auto"]``).
      model: a segmenter; None: the bundled default.
      tile, overlap, fit_windows, fit_pixels, seed: the window sample of each image (as a
        single-image fit draws it).

    Pass the result to ``segment(..., legend=)`` (or save it with ``.save(path)``).
    """
    k = _check_k_or_auto(k)
    model = _default_model() if model is None else model
    tiling = Tiling(DEFAULT_TILE if tile is None else tile, overlap, fit_windows, fit_pixels, seed)
    tiling = tiling.checked(model_stride(model))
    if isinstance(images, (np.ndarray, str, Path)):
        images = [images]
    if not images:
        raise ValueError("fit_legend needs at least one image")
    items = [check_image(i) if isinstance(i, np.ndarray) else Path(i) for i in images]  # files: opened one by one
    if k == "auto":
        return fit_sources_auto(model, items, tiling=tiling, k_range=check_k_range(k_range))
    return fit_sources(model, items, k, tiling=tiling)


def resolve_legend(legend: Legend | str | Path, model: torch.nn.Module, k: int | None = None) -> Legend:
    """``legend`` (fitted, or a legend file) checked against ``model`` (and ``k``, when given):
    a ``LegendFileError`` says when it was made with another model or K."""
    if isinstance(legend, (str, Path)):
        return load_legend(legend, model=model, k=k)
    if not isinstance(legend, Legend):
        raise ValueError(f"legend must come from seglib.fit_legend or a legend file, got {type(legend).__name__}")
    legend.check_k(k)
    legend.check_model(model)
    return legend


def check_mask(mask: object, image: object) -> np.ndarray | None:
    """Validate a ``segment`` mask; raises ``ValueError`` that names the problem and the fix."""
    if mask is None:
        return None
    shape = getattr(image, "shape", None)
    if not isinstance(mask, np.ndarray) or mask.dtype != bool:
        got = f"{type(mask).__name__} {getattr(mask, 'dtype', '')}".strip()
        raise ValueError(
            f"mask must be a boolean NumPy array (H, W), True where the pixel is data, got {got}; e.g. mask=alpha > 0"
        )
    if shape is None or mask.shape != tuple(shape[:2]):
        want = tuple(shape[:2]) if shape else "(H, W)"
        raise ValueError(f"mask must have the image's height and width {want}, got {mask.shape}")
    if not mask.any():
        raise ValueError("mask has no True pixel: nothing to segment (True marks the pixels that are data)")
    return mask


def segment(
    image: np.ndarray,
    k: int | str | None = None,
    model: torch.nn.Module | None = None,
    *,
    legend: Legend | str | Path | None = None,
    k_range: tuple[int, int] | str = DEFAULT_RANGE,
    lane: str | None = None,
    return_probs: bool = False,
    tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    adapt_steps: int = 0,
    adapt_seconds: float | None = None,
    progress: bool = False,
    mask: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Segment an RGB image into ``k`` clusters (2..16).

    Arguments:
      image: (H, W, 3) uint8, or float in [0, 1]; any H and W.
      k: number of segments, an integer in 2..16; ``"auto"``: picked in ``k_range`` without
        labels (``fit_legend(image, "auto")``, whose ``.k`` reports it); None with ``legend``.
      model: a segmenter (``load_model(...)``, a teacher or a student); None: the bundled default.
      legend: clusters shared with other images (``fit_legend`` or a legend file made
        with the same model): every pixel is assigned to them instead of the image's own fit.
      lane: refinement lane, fast | learned | none; None uses the model's default.
      return_probs: also return the probabilities (K, H, W) float32 (they sum to 1 over K).
      tile: images with a side above this (default 1024) are segmented in overlapping windows
        of this size with prototypes shared across windows (``seglib.inference.engine.segment_array``).
      overlap: minimum overlap of those windows, in pixels (0..tile/2).
      adapt_steps: first train a copy of the model this many unsupervised steps on windows of
        ``image`` itself (``seglib.inference.adapt``; 0: off, the default). The model passed in is not changed.
      adapt_seconds: stop that adaptation after this many seconds (None: no bound).
      progress: show the adaptation's progress bar.
      mask: (H, W) bool, True where the pixel is image data and False for nodata (GDAL's
        meaning of a mask; e.g. ``alpha > 0``, or ``~masked_array.mask.any(-1)``). Nodata pixels
        are left out of the clusters, may hold anything (NaN too) and are labelled 255.

    Returns labels (H, W) uint8 with values in 0..k-1 in the stable order (label 0 the darkest
    cluster; 255 where ``mask`` is False), or ``(labels, probs)`` (the probabilities of nodata
    pixels are not meaningful).
    """
    float_image = isinstance(image, np.ndarray) and image.ndim == 3 and np.issubdtype(image.dtype, np.floating)
    if mask is not None and float_image and not np.isfinite(image[~check_mask(mask, image)]).all():
        image = np.where(mask[..., None], image, 0.0).astype(image.dtype)  # nodata may be NaN
    image = check_image(image)
    mask = check_mask(mask, image)
    auto = isinstance(k, str) and k.strip().lower() == "auto"
    if legend is not None and auto:
        raise ValueError("k='auto' picks K for a new fit; with legend= the legend's K is used (pass k=None)")
    if mask is not None and auto:
        raise ValueError("k='auto' does not take a mask yet; pass an integer K (or fit_legend on the valid part)")
    model = _default_model() if model is None else model
    if auto:  # K comes from the fit below
        check_lane(lane)
        predictor = None
    elif legend is not None:
        fitted = resolve_legend(legend, model, k)  # a K that is not the legend's is refused here
        predictor = Predictor(model, fitted.k, lane=lane, clusters=fitted.head_clusters())
    else:
        predictor = Predictor(model, k, lane=lane)  # K checked here, the one time on its way to the head
    tiling = Tiling(DEFAULT_TILE if tile is None else tile, overlap).checked(model_stride(model))
    if isinstance(adapt_steps, bool) or not isinstance(adapt_steps, int) or adapt_steps < 0:
        raise ValueError(f"adapt_steps must be an integer >= 0, got {adapt_steps!r}")
    if adapt_steps and legend is not None:
        raise ValueError(
            "adapt_steps changes the features the given legend was fitted on; drop legend= (or adapt_steps)"
        )
    if adapt_steps:
        from ..io.rasters import ArraySource
        from .adapt import adapt

        model = adapt(model, ArraySource(image, valid=mask), steps=adapt_steps, max_seconds=adapt_seconds,
                      progress=progress)  # fmt: skip
        predictor = None if predictor is None else predictor.with_model(model)
    if auto:
        fitted = fit_legend(image, "auto", model, k_range=k_range, tile=tiling.tile, overlap=overlap)
        predictor = Predictor(model, fitted.k, lane=lane, clusters=fitted.head_clusters())
    return segment_array(predictor, image, tiling=tiling, return_probs=return_probs, mask=mask)
