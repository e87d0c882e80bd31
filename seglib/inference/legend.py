"""One legend for many images: clusters fitted once, in a stable order, saved to a safe file.

    import seglib
    model = seglib.load_model()
    legend = seglib.fit_legend(["a.tif", "b.tif", "c.png"], 6, model=model)  # one fit for all
    legend.save("legend.json")                                                # reuse later
    labels = seglib.segment(image, legend=seglib.load_legend("legend.json", model=model))

**Fitting.** Every input contributes the same seeded, spread-out sample of windows that a
single-file fit draws from it (``Tiling.sample_windows``: up to ``fit_windows`` windows and
``fit_pixels`` pixels per file). The windows are embedded one at a time (so memory is one
window's forward pass plus the embeddings kept), denoised by the head's filter, and the head's
soft k-means runs once over all their positions together: farthest-point initialisation on
pooled positions, ``iters`` EM steps, the size prior's offsets measured on the same sample.
For windows of one size this is exactly what ``model.fit_clusters(batch)`` computes.

**Stable ids.** After fitting, clusters are renumbered by the brightness of their mean colour
(the colour channels of the prototypes), darkest first: label 0 is the darkest cluster (water,
shadow), label K-1 the brightest (sand, bright roofs). Ties, which need two identical mean
colours, fall back to the other prototype values. The order is a function of the prototypes
alone, so windows, files and runs agree, and a legend or colour table can be written once.

**The legend file** is JSON (no pickle, nothing executable), documented in
docs/inference.md: format tag and version, K, the prototypes (K x D floats) and size-prior
offsets, each cluster's share of the fit sample and mean RGB colour, and the model's
fingerprint: a SHA-256 of its weights and of the head settings that shape the embedding and the
assignment. Loading it with another model or another K is refused with a message that says so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import check_k
from ..io.outputs import palette_table, write_text
from ..io.sidecars import COLOUR_MODES, LabelTable
from ..models.head import Clusters, HeadOutput, brightness_order
from .budget import PositionBudget, embed_windows, file_sample, opened
from .predictor import model_stride
from .windows import Tiling

__all__ = [
    "label_table",
    "FORMAT",
    "VERSION",
    "LegendFileError",
    "Legend",
    "model_fingerprint",
    "head_settings",
    "embed_windows",
    "fit_embeddings",
    "sample_embeddings",
    "fit_sources",
    "fit_positions",
    "legend_from_fit",
    "load_legend",
]

FORMAT = "seglib-clusters"
VERSION = 1
# k-means positions of a shared fit, at most (more are subsampled, seeded). 2^16 to 2^18 cells give
# legends that agree with a fit on every cell as closely as two seeds' legends agree with each
# other (experiments/legend_budget); 2^17 holds the client's memory to ~21 MB of cells.
MAX_POSITIONS = 1 << 17


class LegendFileError(ValueError):
    """A legend file that cannot be used: unreadable, not ours, or made for another model or K."""


# ----------------------------------------------------------------------------- model identity


def head_settings(model: torch.nn.Module) -> dict:
    """The settings besides the weights that decide what an embedding is and how it is assigned."""
    head = model.head
    return {
        "model": type(model).__name__,
        "downsample": int(getattr(model.config, "downsample", 1) or 1),
        "colour_weight": float(model.colour_weight),
        "temperature": float(head.temperature),
        "size_prior": float(head.size_prior),
        "denoise_iters": int(head.denoise_iters),
        "denoise_radius": int(head.denoise_radius),
        "denoise_bandwidth": float(head.denoise_bandwidth),
        "denoise_dilations": list(head.denoise_dilations),
    }


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of the model's weights and buffers (names, dtypes, shapes, bytes) and of
    ``head_settings``; the same on CPU and GPU."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(head_settings(model), sort_keys=True).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the fitted clusters


@dataclass
class Legend:
    """K clusters shared by every window and file they are applied to, in the stable order.

    Arguments:
      prototypes: (K, D) float32, label i is row i.
      bias: (K,) float32 size-prior logit offsets, or None for a model without a size prior.
      fingerprint: ``model_fingerprint`` of the model they were fitted with.
      shares: (K,) fraction of the fit sample's positions each cluster holds.
      colours: (K, 3) mean RGB (0..255) of each cluster's positions in the fit sample.
      meta: what they were fitted on (files, windows, positions, seed, head settings).
    """

    prototypes: np.ndarray
    bias: np.ndarray | None
    fingerprint: str
    shares: np.ndarray
    colours: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[0])

    def head_clusters(self, device: torch.device | str = "cpu") -> Clusters:
        """The ``(1, K, D)`` / ``(1, K)`` tensors the model's head takes as ``clusters=``."""
        bias = None if self.bias is None else torch.from_numpy(self.bias)[None].to(device)
        return Clusters(torch.from_numpy(self.prototypes)[None].to(device), bias)

    def check_model(self, model: torch.nn.Module, *, name: str = "these clusters") -> None:
        """``LegendFileError`` unless the clusters were fitted with ``model``."""
        mine = model_fingerprint(model)
        if mine != self.fingerprint:
            made = self.meta.get("head", {}).get("model", "another model")
            raise LegendFileError(
                f"{name}: fitted with another model or head settings ({made}, fingerprint "
                f"{self.fingerprint[:12]}; this model: {mine[:12]}); use the checkpoint they were fitted with, "
                "or fit new ones with this model (--save-legend FILE / seglib.fit_legend)"
            )

    def check_k(self, k: int | None, *, name: str = "these clusters") -> int:
        """The clusters' K; ``LegendFileError`` when another K is asked for."""
        if k is not None and k != self.k:
            raise LegendFileError(
                f"{name}: K = {self.k} clusters, but K = {k} was asked for; drop --k (the file's K is used) "
                f"or fit new clusters with K = {k}"
            )
        return self.k

    def to_dict(self) -> dict:
        as_list = lambda a: None if a is None else np.asarray(a, np.float64).tolist()  # noqa: E731
        return {
            "format": FORMAT,
            "version": VERSION,
            "k": self.k,
            "dim": int(self.prototypes.shape[1]),
            "order": "brightness of the cluster's mean colour, darkest first",
            "model_fingerprint": self.fingerprint,
            "prototypes": as_list(self.prototypes),
            "bias": as_list(self.bias),
            "shares": as_list(self.shares),
            "colours": as_list(self.colours),
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write the JSON legend file (``seglib.io.outputs.write_text``: checked, then renamed)."""
        return write_text(path, json.dumps(self.to_dict(), indent=1))


def _array(data: dict, key: str, shape: tuple[int, ...], path: Path) -> np.ndarray:
    try:
        array = np.asarray(data[key], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise LegendFileError(
            f"{path}: field {key!r} is missing or not numeric ({exc}); fit the clusters again"
        ) from None
    if array.shape != shape or not np.isfinite(array).all():
        raise LegendFileError(f"{path}: field {key!r} must be finite numbers of shape {shape}, got {array.shape}")
    return array.astype(np.float32)


def load_legend(path: str | Path, *, model: torch.nn.Module | None = None, k: int | None = None) -> Legend:
    """Read a legend file; with ``model`` (and ``k``) also check it was made for them.

    Raises ``LegendFileError`` (a ``ValueError``) with the reason and the fix for a missing,
    unreadable or foreign file, a file of another model, or of another K.
    """
    path = Path(path)
    if not path.is_file():
        raise LegendFileError(f"legend file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LegendFileError(
            f"{path} is not a seglib legend file (not JSON: {exc}); write one with --save-legend"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LegendFileError(f"{path} is not a seglib legend file (no {FORMAT!r} format tag)")
    if data.get("version") != VERSION:
        raise LegendFileError(
            f"{path}: legend file version {data.get('version')!r}, this seglib reads version {VERSION}; refit them"
        )
    try:
        kk, dim = check_k(data.get("k")), int(data.get("dim"))
    except (TypeError, ValueError) as exc:
        raise LegendFileError(f"{path}: bad K or dimension ({exc})") from None
    fitted = Legend(
        prototypes=_array(data, "prototypes", (kk, dim), path),
        bias=None if data.get("bias") is None else _array(data, "bias", (kk,), path),
        fingerprint=str(data.get("model_fingerprint", "")),
        shares=_array(data, "shares", (kk,), path),
        colours=_array(data, "colours", (kk, 3), path),
        meta=data.get("meta") or {},
    )
    name = path.name
    if k is not None:
        fitted.check_k(k, name=name)
    if model is not None:
        if dim != model.embed_dim:
            raise LegendFileError(
                f"{name}: {dim}-dimensional prototypes, this model embeds in {model.embed_dim}: fitted with "
                "another model; use that checkpoint or fit new clusters with this one"
            )
        fitted.check_model(model, name=name)
    return fitted


# ----------------------------------------------------------------------------- fitting


def fit_embeddings(
    head: torch.nn.Module,
    embs: Sequence[torch.Tensor],
    k: int,
    *,
    max_positions: int | None = None,
    seed: int = 0,
) -> HeadOutput:
    """The head's soft k-means over the positions of all ``embs`` (each (1, D, h, w), already
    denoised), jointly: what ``SoftKMeans.forward(..., group=len(embs))`` does for windows of
    one size, for windows of any sizes.

    Returns prototypes (1, K, D), bias (1, K) and probs (1, K, N) over the concatenated positions
    (of the subsample when there are more than ``max_positions``).
    """
    k = check_k(k)
    x = torch.cat([e.flatten(2) for e in embs], 2)  # (1, D, N): the windows' positions side by side
    pool = head.init_pool
    pooled = [head.init_cells(e) for e in embs]
    xp = torch.cat([p.flatten(2) for p in pooled], 2)  # (1, D, Np)
    if max_positions is not None and x.shape[2] > max_positions:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(x.shape[2], generator=gen)[:max_positions].sort().values
        x = x[:, :, keep.to(x.device)]
        keep_p = torch.randperm(xp.shape[2], generator=gen)[: max(k, max_positions // pool**2)].sort().values
        xp = xp[:, :, keep_p.to(xp.device)]
    return head.fit(x, xp, k, iters=head.iters, temperature=head.temperature, size_prior=head.size_prior)


def _ordered(
    labels: np.ndarray, prototypes: torch.Tensor, bias: torch.Tensor | None, x_rgb, fingerprint: str, meta: dict
) -> Legend:
    """Legend from a fit (the positions' labels (N,), prototypes (1, K, D), bias (1, K) or None),
    renumbered into the stable order."""
    protos = prototypes[0].float().cpu().numpy()  # (K, D)
    order = brightness_order(prototypes[0])
    k = protos.shape[0]
    shares = np.bincount(labels, minlength=k) / max(labels.size, 1)
    colours = np.zeros((k, 3))
    if x_rgb is not None:  # (N, 3) mean colours of the positions, same order as the probs
        for c in range(k):
            if (labels == c).any():
                colours[c] = x_rgb[labels == c].mean(0)
    bias = None if bias is None else bias[0].float().cpu().numpy()
    return Legend(
        prototypes=np.ascontiguousarray(protos[order], np.float32),
        bias=None if bias is None else np.ascontiguousarray(bias[order], np.float32),
        fingerprint=fingerprint,
        shares=shares[order].astype(np.float32),
        colours=colours[order].astype(np.float32),
        meta=meta,
    )


def _cell_colours(model: torch.nn.Module, embs: Sequence[torch.Tensor]) -> np.ndarray:
    """(N, 3) mean RGB (0..255) of every embedding cell, read back from the colour channels."""
    return _colours(model, torch.cat([e.flatten(2) for e in embs], 2))


def _colours(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """(N, 3) RGB (0..255) of the cells x (1, D, N), whose last channels are (colour - 0.5) *
    weight; computed in one array (a shared legend's 2^17 cells: no temporaries beside the fit's)."""
    colours = x[0, -3:].T.float().cpu().numpy() / (float(model.colour_weight) or 1.0)
    colours += 0.5
    colours *= 255
    return np.clip(colours, 0, 255, out=colours)


def label_table(
    model: torch.nn.Module, clusters: Clusters, legend: Legend | None = None, colours: str = "mean"
) -> LabelTable:
    """What the labels of an output mean (``seglib.io.sidecars.LabelTable``): each cluster's mean RGB
    in the sample it was fitted on (a shared or saved legend's ``colours``; for a file's own fit,
    the colour channels of its prototypes, the soft mean of its cells' colours) and, for a shared
    legend, its share of the fit sample. ``colours``: ``mean`` draws each label in that mean RGB
    (water looks like water), ``categorical`` in ``seglib.viz.PALETTE`` (distinct colours)."""
    if colours not in COLOUR_MODES:
        raise ValueError(f"colours must be one of {', '.join(COLOUR_MODES)}, got {colours!r}")
    k = int(clusters.prototypes.shape[1])
    if legend is not None:
        mean, share = np.asarray(legend.colours, np.float64), np.asarray(legend.shares, np.float64)
    elif float(getattr(model, "colour_weight", 0) or 0) > 0:  # the embedding ends with the colour channels
        mean, share = _cell_colours(model, [clusters.prototypes[0].T[None, :, :, None]]), None
    else:
        mean, share = None, None
    if colours == "categorical" or mean is None:
        return LabelTable(colours=palette_table(k).colours, mean_rgb=mean, legend_share=share, mode="categorical")
    return LabelTable(
        colours=np.round(mean).clip(0, 255).astype(np.uint8), mean_rgb=mean, legend_share=share, mode="mean"
    )


def sample_embeddings(
    model: torch.nn.Module,
    items: Sequence,
    *,
    tiling: Tiling,
    flip: bool = False,
    skip_unreadable: bool = False,
) -> tuple[list[torch.Tensor], dict]:
    """The denoised embeddings of every item's fit sample (``Tiling.sample_windows``), one window
    through the model at a time; ``flip``: of the flipped windows, aligned (``embed_windows``).

    ``items`` are window readers (``ArraySource``/``RasterSource``), arrays or file paths (opened
    one at a time). Returns the embeddings and ``{"windows", "files", "skipped"}``;
    ``skip_unreadable`` records an unreadable file in ``skipped`` (name, reason) instead of raising.
    """
    from ..io.images import ImageReadError

    m = model_stride(model)
    tiling = tiling.checked(m)
    embs: list[torch.Tensor] = []
    info: dict = {"windows": 0, "files": [], "skipped": []}
    for item in items:
        try:
            with opened(item) as source:
                windows = tiling.sample_windows(source.height, source.width, m)
                embs += embed_windows(model, source, windows, flip=flip)[0]
                info["windows"] += len(windows)
                info["files"].append(Path(getattr(source, "name", "image")).name)
        except (ImageReadError, OSError) as exc:
            if not skip_unreadable:
                raise
            info["skipped"].append((str(item), str(exc)))
    if not embs:
        raise ImageReadError("no readable image to fit the clusters on")
    return embs, info


@torch.no_grad()
def fit_sources(
    model: torch.nn.Module,
    items: Sequence,
    k: int,
    *,
    tiling: Tiling,
    max_positions: int = MAX_POSITIONS,
    skip_unreadable: bool = False,
) -> Legend:
    """One set of K clusters fitted on windows sampled from every item (window readers, arrays
    or file paths, opened one at a time), in the stable order (``seglib.inference.kselect.fit_sources_auto``
    picks K too). The k-means runs on at most ``max_positions`` cells, a bottom-k sample over all
    items (``seglib.inference.budget``): memory does not grow with the number of items, and with
    fewer cells than that every cell is used. ``meta["skipped"]`` lists unreadable files when
    ``skip_unreadable``."""
    from ..io.images import ImageReadError

    k = check_k(k)
    tiling = tiling.checked(model_stride(model))
    budget = PositionBudget(max_positions, k=k, init_pool=model.head.init_pool)
    skipped = []
    for index, item in enumerate(items):
        try:
            budget.add(
                file_sample(model, item, index, k=k, tiling=tiling, positions=max_positions, threshold=budget.threshold)
            )
        except (ImageReadError, OSError) as exc:
            if not skip_unreadable:
                raise
            skipped.append((str(item), str(exc)))
    settings = {key: value for key, value in asdict(tiling).items() if key != "seed"}
    return fit_positions(model, budget, k, seed=tiling.seed, meta={"skipped": skipped, **settings})


@torch.no_grad()
def fit_positions(model: torch.nn.Module, budget: PositionBudget, k: int, *, seed: int, meta: dict) -> Legend:
    """``Legend`` (stable order, shares, colours, fingerprint) fitted with the head's soft
    k-means on the cells a ``PositionBudget`` kept (sorted in its storage, which the fit then
    holds: one copy of the cells, the budget empty afterwards); ``meta`` is stored with them."""
    if not budget.files:
        from ..io.images import ImageReadError

        raise ImageReadError("no readable image to fit the clusters on")
    head = model.head
    x = budget.cells.take()  # sorted in the budget's storage, which x now holds
    # The pooled cells passed as the only reference, so they are freed once the initialisation
    # has them (by name: a call through **settings would keep them alive in its argument tuple).
    out = head.fit(
        x, budget.pooled.take(), k, iters=head.iters, temperature=head.temperature, size_prior=head.size_prior
    )
    labels, prototypes, bias = out.probs[0].argmax(0).cpu().numpy(), out.prototypes, out.bias
    del out  # its (K, N) logits and probabilities (12 MiB at K = 6), before the colours are made
    colours = _colours(model, x)
    meta = {
        "positions": int(x.shape[2]),
        "max_positions": budget.positions,
        "seed": seed,
        "head": head_settings(model) | {"iters": int(head.iters)},
        "windows": budget.windows,
        "files": [name for _, name in sorted(budget.files)],
        **meta,
    }
    return _ordered(labels, prototypes, bias, colours, model_fingerprint(model), meta)


def legend_from_fit(
    model: torch.nn.Module,
    embs: Sequence[torch.Tensor],
    out: HeadOutput,
    *,
    max_positions: int,
    meta: dict,
) -> Legend:
    """``Legend`` (stable order, shares, colours, fingerprint) from a fit on ``embs``;
    ``meta`` (files, windows, the tiling with its ``seed``, ...) is kept with them."""
    seed = meta["seed"]
    colours = _cell_colours(model, embs)
    n = sum(e.shape[-1] * e.shape[-2] for e in embs)
    if n > max_positions:  # the probs cover fit_embeddings' subsample: colour the same subsample
        gen = torch.Generator().manual_seed(seed)
        colours = colours[torch.randperm(n, generator=gen)[:max_positions].sort().values.numpy()]
    meta = {
        "positions": min(n, max_positions),
        "max_positions": max_positions,
        "seed": seed,
        "head": head_settings(model) | {"iters": int(model.head.iters)},
        **{key: v for key, v in meta.items() if key != "seed"},
    }
    labels = out.probs[0].argmax(0).cpu().numpy()
    return _ordered(labels, out.prototypes, out.bias, colours, model_fingerprint(model), meta)
