"""The one inference entry on a segmenter, ``Predictor``, and the tensors it takes.

    predictor = Predictor(model, 6)                        # K and the lane checked here, once
    labels = predictor.labels(image)                       # (H, W) int64, in one piece
    probs = predictor.probs(to_tensor(image))              # (1, K, H, W)
    clusters, clustered = predictor.fit(windows)           # one set of clusters for a batch of windows
    probs = predictor.with_clusters(clusters).window(x)    # a window assigned to them

Everything that runs a model on images goes through a ``Predictor``: the window engine
(``seglib.inference.engine``), ``seglib.segment``, adaptation and the evaluation. It holds what
inference asks of the model beyond training: K, the refinement lane and the head's overrides,
padding to the model's stride and cropping back, nodata masks, shared clusters, probabilities
left before the lane's last upsampling, embeddings kept from the fit, and the stable order of
each image's own clusters (``brightness_order``). ``Segmenter.forward`` stays what training runs.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..config import check_k, check_lane
from ..models.head import Clusters, brightness_order
from ..models.segmenter import Segmenter

__all__ = [
    "Predictor",
    "InferenceSettings",
    "model_stride",
    "model_device",
    "to_tensor",
    "bands_tensor",
    "valid_tensor",
    "pad_to_stride",
    "pad_valid",
    "argmax_labels",
]


def model_stride(model: torch.nn.Module, downsample: int | None = None) -> int:
    """The multiple H and W must have for ``model`` (4 for the teacher, 16 for the student),
    times the downsample factor."""
    base = getattr(model, "input_multiple", 4)
    ds = downsample if downsample is not None else getattr(getattr(model, "config", None), "downsample", 1)
    return base * (ds or 1)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 or float in [0, 1] -> (1, 3, H, W) float32."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]


def pad_to_stride(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad (B, 3, h, w) at the bottom/right up to multiples of ``multiple`` (replicate
    when a side is too short to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_valid(valid: torch.Tensor | None, multiple: int) -> torch.Tensor | None:
    """Pad a (B, h, w) bool mask like ``pad_to_stride`` pads the image: the padding is not data."""
    if valid is None:
        return None
    h, w = valid.shape[-2:]
    return F.pad(valid, (0, (-w) % multiple, 0, (-h) % multiple), value=False)


def valid_tensor(valid: np.ndarray | None) -> torch.Tensor | None:
    return None if valid is None else torch.from_numpy(np.ascontiguousarray(valid))[None]  # (1, h, w)


def bands_tensor(bands: np.ndarray) -> torch.Tensor:
    """uint8 (3, h, w) -> (1, 3, h, w) float32 in [0, 1]: the values ``to_tensor`` gives, in the
    layout the model takes (no transpose). NumPy, not torch: it runs in the reader thread, where
    a torch op would start a second OpenMP team beside the model's and oversubscribe the cores."""
    x = bands.astype(np.float32)
    x /= 255.0
    return torch.from_numpy(x)[None]


def argmax_labels(probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (h, w) index of the largest of the K values (K, h, w), the first one on ties.

    ``torch.max`` over K, not ``np.argmax``: the model's probabilities come out channels-last
    (the fast lane's layout), where NumPy's argmax over K is several times slower."""
    return torch.as_tensor(probs).max(0).indices.to(torch.uint8).numpy()


def _renumber(out: dict[str, torch.Tensor]) -> None:
    """Put each image's clusters in the stable order (``brightness_order``), in place."""
    orders = [brightness_order(p) for p in out["prototypes"]]
    if all(order == sorted(order) for order in orders):
        return
    index = torch.as_tensor(orders, device=out["prototypes"].device)  # (B, K)
    for key in ("probs", "logits", "probs_coarse", "prototypes", "cluster_bias"):
        t = out.get(key)
        if t is not None:
            out[key] = t.gather(1, index.view(*index.shape, *[1] * (t.ndim - 2)).expand_as(t))


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """Per-call settings of a segmenter at inference, None meaning the model's own: the
    refinement ``lane`` and the head's ``downsample``, ``iters``, ``temperature`` and
    ``size_prior`` (what an evaluation or a protocol method varies)."""

    lane: str | None = None
    downsample: int | None = None
    iters: int | None = None
    temperature: float | None = None
    size_prior: float | None = None


def _check_model(model: object) -> None:
    if not isinstance(model, Segmenter):
        raise TypeError(f"a Predictor needs a seglib segmenter (seglib.load_model(...)), got {type(model).__name__}")


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A segmenter set up for inference at ``k`` clusters.

    Arguments:
      model: a ``Segmenter`` (``seglib.load_model``: the teacher or a student).
      k: clusters, 2..16; checked here, once, for every call that follows.
      lane: refinement lane, fast | learned | none; None: the model's.
      downsample, iters, temperature, size_prior: overrides of the model's head for these calls
        (None: the model's settings), as ``Segmenter.forward`` takes them.
      clusters: assign every image to these (``fit`` or a legend's ``head_clusters``) instead
        of fitting each image's own.
    """

    model: Segmenter
    k: int
    lane: str | None = None
    downsample: int | None = None
    iters: int | None = None
    temperature: float | None = None
    size_prior: float | None = None
    clusters: Clusters | None = None

    @classmethod
    def of(
        cls, model: Segmenter, k: int, settings: InferenceSettings | None = None, clusters: Clusters | None = None
    ) -> Predictor:
        """A predictor with ``settings`` (None: the model's own)."""
        s = settings or InferenceSettings()
        return cls(
            model,
            k,
            lane=s.lane,
            downsample=s.downsample,
            iters=s.iters,
            temperature=s.temperature,
            size_prior=s.size_prior,
            clusters=clusters,
        )

    def __post_init__(self) -> None:
        _check_model(self.model)
        object.__setattr__(self, "k", check_k(self.k))
        check_lane(self.lane)
        if self.downsample is not None and self.downsample not in (1, 2):
            raise ValueError(f"downsample must be 1 or 2, got {self.downsample!r}")
        self._set_clusters(self.clusters)

    def _set_clusters(self, clusters: Clusters | None) -> None:
        if clusters is not None:
            if clusters.prototypes.shape[1] != self.k:
                raise ValueError(
                    f"the clusters hold K = {clusters.prototypes.shape[1]}, but K = {self.k} was asked for; "
                    "drop K (the clusters' is used) or fit new clusters with this K"
                )
            clusters = clusters.to(self.device)
        object.__setattr__(self, "clusters", clusters)

    @property
    def stride(self) -> int:
        """The multiple H and W are padded to (``model_stride`` with this ``downsample``)."""
        return model_stride(self.model, self.downsample)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def with_clusters(self, clusters: Clusters | None) -> Predictor:
        """The same predictor assigning to ``clusters`` (moved to the model's device)."""
        new = copy.copy(self)
        new._set_clusters(clusters)
        return new

    def with_model(self, model: Segmenter) -> Predictor:
        """The same settings on another model of the same kind (e.g. a copy adapted to the input)."""
        _check_model(model)
        new = copy.copy(self)
        object.__setattr__(new, "model", model)
        new._set_clusters(self.clusters)
        return new

    def _predict(
        self,
        x: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        upsample: bool = True,
        clustered: torch.Tensor | None = None,
        check_values: bool = True,
    ) -> dict[str, torch.Tensor]:
        return self.model.predict(
            x,
            self.k,
            lane=self.lane,
            downsample=self.downsample,
            iters=self.iters,
            temperature=self.temperature,
            size_prior=self.size_prior,
            clusters=self.clusters,
            valid=valid,
            upsample=upsample,
            clustered=clustered,
            check_values=check_values,
        )

    @torch.no_grad()
    def outputs(self, rgb: torch.Tensor, *, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The model's outputs (``Segmenter.forward``'s keys) for ``rgb`` (B, 3, H, W) of any size
        in one piece: padded up to the stride, ``probs`` cropped back. ``valid`` (B, H, W) bool
        marks image data (``Segmenter.predict``). Without ``clusters`` each image's own clusters
        come in the stable order."""
        h, w = rgb.shape[-2:]
        multiple = self.stride
        x = pad_to_stride(rgb.to(self.device), multiple)
        out = self._predict(x, valid=pad_valid(valid, multiple))
        out["probs"] = out["probs"][..., :h, :w]
        if self.clusters is None:  # clusters fitted here, per image: stable ids
            _renumber(out)
        return out

    def probs(self, rgb: torch.Tensor, *, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities (B, K, H, W) for rgb (B, 3, H, W) of any size, in one piece."""
        return self.outputs(rgb, valid=valid)["probs"]

    def labels(self, image: np.ndarray) -> np.ndarray:
        """Labels (H, W) int64 of one (H, W, 3) image (uint8 or float in [0, 1]), in one piece."""
        return self.probs(to_tensor(image))[0].argmax(0).cpu().numpy()

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the head clusters for ``x`` (N, 3, h, w), already a multiple of the stride."""
        return self.model.clustered_embeddings(x.to(self.device), downsample=self.downsample)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, *, valid: torch.Tensor | None = None) -> tuple[Clusters, torch.Tensor]:
        """One set of clusters fitted jointly over the windows ``x`` (N, 3, h, w), padded to the
        stride (``valid`` (N, h, w) likewise), in the stable order, and what the head clustered
        for the windows (``embed``), for ``window(..., clustered=)``."""
        clustered = self.embed(x)
        clusters = self.model.fit_clusters(
            x,
            self.k,
            downsample=self.downsample,
            iters=self.iters,
            temperature=self.temperature,
            size_prior=self.size_prior,
            valid=None if valid is None else valid.to(self.device),
            clustered=clustered,
        )
        return clusters.ordered(), clustered

    @torch.no_grad()
    def window(self, x: torch.Tensor, *, upsample: bool = True, clustered: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities (1, K, h, w) of a window ``x`` (1, 3, h, w) padded to the stride,
        assigned to ``clusters``; ``upsample=False``: at 1/f of the window's size when only
        labels are wanted (``Segmenter.predict``); ``clustered``: its embeddings from ``fit``.
        The window comes from uint8 pixels, so its values are not checked again."""
        if self.clusters is None:
            raise ValueError("window() assigns to fitted clusters: use with_clusters(fit(...)[0]) first")
        out = self._predict(x.to(self.device), upsample=upsample, clustered=clustered, check_values=False)
        return out["probs"]
