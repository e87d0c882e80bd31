"""What every seglib segmenter shares: input checks, colour channels, the soft k-means head,
the refinement lanes and the forward contract. Subclasses only say how to embed an image.

    out = model(rgb, k)   # rgb (B, 3, H, W) in [0, 1], H and W multiples of input_multiple
    out["probs"]        # (B, K, H, W), sums to 1 over K; argmax gives the labels
    out["embeddings"]   # (B, D, H/4, W/4) for downsample 1 (H/8 for downsample 2)
    out["prototypes"]   # (B, K, D)
    out["cluster_bias"] # (B, K) the size prior's logit offsets, or None without one
    out["logits"]       # (B, K, H/4, W/4) the head's logits (-squared distance / T)
    out["probs_coarse"] # (B, K, H/4, W/4) the head's probabilities before refinement
    out["features"]     # (B, F, H/4, W/4) the learned (unnormalised) features
    out["clustered"]    # (B, D, H/4, W/4) the embeddings the head clustered (after denoising)

The embedding D = F learned unit-norm channels + 3 colour channels: the stride-4 mean colour
(centred on mid-grey) times ``colour_weight``. Colour is the strongest cue in aerial
imagery and must survive training (docs/design.md); appending it explicitly means the learned
channels only have to add what colour cannot tell (texture, context).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HeadConfig, check_k, check_lane
from ..kernels.numerics import inference_numerics
from ..kernels.pooling import cell_means, mean_pool
from .head import Clusters, SoftKMeans
from .refine import LearnedRefiner, fast_lane, none_lane

__all__ = ["Segmenter", "check_rgb", "colour_channels", "head_embedding", "valid_cells", "STRIDE"]

STRIDE = 4  # embeddings are at stride 4 of the (downsampled) input


def check_rgb(rgb: object, multiple: int = STRIDE, *, check_values: bool = True) -> torch.Tensor:
    """Validate a model input; raises ``ValueError`` that names the problem and the fix."""
    if not isinstance(rgb, torch.Tensor):
        raise ValueError(f"rgb must be a torch.Tensor (B, 3, H, W), got {type(rgb).__name__}")
    if rgb.ndim != 4:
        raise ValueError(f"rgb must have shape (B, 3, H, W), got {tuple(rgb.shape)}; add a batch axis with rgb[None]")
    if rgb.shape[1] != 3:
        raise ValueError(
            f"rgb must have 3 channels, got {rgb.shape[1]} (shape {tuple(rgb.shape)}); "
            "drop alpha (rgb[:, :3]) or repeat a grey band 3 times"
        )
    if not rgb.is_floating_point():
        raise ValueError(f"rgb must be float in [0, 1], got {rgb.dtype}; divide uint8 images by 255")
    h, w = rgb.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"H and W must be divisible by {multiple}, got {h}x{w}; pad or crop the image "
            "(seglib.segment pads automatically)"
        )
    if check_values:
        lo, hi = torch.aminmax(rgb.detach())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("rgb contains NaN or inf; replace missing pixels (e.g. torch.nan_to_num) first")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"rgb values must lie in [0, 1], got [{float(lo):.3g}, {float(hi):.3g}]; "
                "scale uint8 by 1/255 and 16-bit by 1/65535"
            )
    return rgb


def colour_channels(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mean colour per embedding cell, centred on mid-grey: (B, 3, h, w).

    Absolute colour, not relative to the image mean: k-means distances do not change by a
    shift within one image, and windows of a large raster then agree with each other."""
    return cell_means(rgb.float(), size) - 0.5


def head_embedding(features: torch.Tensor, rgb: torch.Tensor, *, colour_weight: float) -> torch.Tensor:
    """What the head clusters: learned features (B, F, h, w), unit-normalised per position,
    followed by the weighted colour channels of ``rgb`` (B, 3, H, W) -> (B, F + 3, h, w)."""
    features = features.float()
    colour = colour_channels(rgb, features.shape[-2:]) * colour_weight
    if inference_numerics():  # F.normalize written out: several times faster on CPU
        unit = features * features.square().sum(1, keepdim=True).clamp_min(1e-24).rsqrt()
    else:
        unit = F.normalize(features, dim=1)
    return torch.cat([unit, colour], 1)


def valid_cells(valid: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """Pixel mask (B, H, W) -> embedding-cell mask (B, h, w): the cells whose pixels are all
    valid, or, when there are none, those with any valid pixel (a thin strip of data). None stays
    None (everything valid)."""
    if valid is None:
        return None
    share = F.adaptive_avg_pool2d(valid.float()[:, None], size)[:, 0]  # (B, h, w) valid share per cell
    whole = share >= 1 - 1e-6
    return whole if whole.any() else share > 0


class Segmenter(nn.Module):
    """Base class: subclasses set ``self.config`` (with ``head``, ``refine`` and ``downsample``
    fields), call ``init_head(...)`` and implement ``features(rgb) -> (B, F, H/4, W/4)``."""

    input_multiple: int = STRIDE  # H and W must be multiples of this (times the downsample)

    def init_head(self, head: HeadConfig, *, colour_weight: float) -> None:
        self.colour_weight = colour_weight
        self.head = SoftKMeans(**dataclasses.asdict(head))  # HeadConfig's fields are its arguments
        self.refiner = LearnedRefiner()

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, D, H/4, W/4), learned features (B, F, H/4, W/4)).

        Embeddings are the unit-normalised features followed by the weighted colour channels.
        """
        features = self.features(rgb).float()
        return head_embedding(features, rgb, colour_weight=self.colour_weight), features

    def refine(
        self,
        probs: torch.Tensor,
        logits: torch.Tensor,
        rgb: torch.Tensor,
        lane: str,
        smooth_iters: int | None = None,
        upsample: bool = True,
    ) -> torch.Tensor:
        """Full-resolution probabilities from the head's stride-4 output, by ``lane``
        (``upsample=False``: see ``forward``)."""
        r = self.config.refine
        smooth_iters = r.smooth_iters if smooth_iters is None else smooth_iters
        if lane == "none":
            return none_lane(logits, rgb.shape[-2:])
        if lane == "fast":
            return fast_lane(probs, rgb, smooth_iters=smooth_iters, guide_scale=r.guide_scale, upsample=upsample)
        refined = self.refine_learned(probs, rgb, smooth_iters)  # the learned lane: (B, K, H/s, W/s)
        if upsample and refined.shape[-2:] != rgb.shape[-2:]:  # bilinear keeps the probabilities summing to 1
            refined = F.interpolate(refined, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return refined

    def refine_learned(self, probs: torch.Tensor, rgb: torch.Tensor, smooth_iters: int | None = None) -> torch.Tensor:
        """The learned lane at its working resolution, 1/``refine.learned_scale`` of rgb's
        (B, 3, H, W): the guided filter's output there, refined by the learned refiner."""
        r = self.config.refine
        smooth_iters = r.smooth_iters if smooth_iters is None else smooth_iters
        scale = r.learned_scale
        small = F.avg_pool2d(rgb, scale) if scale > 1 else rgb
        fast = fast_lane(probs, small, smooth_iters=smooth_iters, guide_scale=max(1, r.guide_scale // scale))
        return self.refiner(fast, small)

    def _downsampled(self, rgb: torch.Tensor, downsample: int | None, check_values: bool = True) -> torch.Tensor:
        ds = self.config.downsample if downsample is None else downsample
        if ds not in (1, 2):
            raise ValueError(f"downsample must be 1 or 2, got {ds}")
        check_rgb(rgb, self.input_multiple * ds, check_values=check_values)
        return mean_pool(rgb, ds) if ds > 1 else rgb

    @torch.no_grad()
    def clustered_embeddings(
        self, rgb: torch.Tensor, *, downsample: int | None = None, check_values: bool = True
    ) -> torch.Tensor:
        """What the head clusters for ``rgb`` (B, 3, H, W): the embeddings after its denoising,
        (B, D, h, w). ``fit_clusters(..., clustered=)`` and ``forward(..., clustered=)`` take
        them instead of computing them again (a raster's fit windows are also labelled)."""
        emb, _ = self.embed(self._downsampled(rgb, downsample, check_values))
        return self.head.denoise_input(emb)

    @torch.no_grad()
    def fit_clusters(
        self,
        rgb: torch.Tensor,
        k: int,
        *,
        downsample: int | None = None,
        iters: int | None = None,
        temperature: float | None = None,
        size_prior: float | None = None,
        valid: torch.Tensor | None = None,
        clustered: torch.Tensor | None = None,
    ) -> Clusters:
        """Clusters (prototypes (1, K, D) and size-prior offsets) fitted jointly over all images
        of ``rgb`` (N, 3, H, W), e.g. windows sampled from one large raster; pass them back as
        ``predict(..., clusters=)`` so every window is labelled with the same clusters.
        ``valid`` (N, H, W) bool: only those pixels' cells are clustered (see ``predict``).
        ``clustered``: ``clustered_embeddings(rgb)``, when the caller has them already. The head
        overrides are ``forward``'s; ``k`` comes checked, as ``predict``'s does, from
        ``seglib.inference.predictor.Predictor``, which holds it."""
        emb = self.clustered_embeddings(rgb, downsample=downsample) if clustered is None else clustered
        out = self.head(
            emb,
            k,
            iters=iters,
            temperature=temperature,
            size_prior=size_prior,
            group=emb.shape[0],
            valid=valid_cells(valid, emb.shape[-2:]),
            denoised=True,
        )
        return Clusters(out.prototypes[:1], None if out.bias is None else out.bias[:1])

    def forward(
        self,
        rgb: torch.Tensor,
        k: int,
        *,
        lane: str | None = None,
        downsample: int | None = None,
        iters: int | None = None,
        temperature: float | None = None,
        size_prior: float | None = None,
        smooth_iters: int | None = None,
        group: int = 1,
        full_resolution: bool = True,
        check_values: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Segment ``rgb`` (B, 3, H, W) in [0, 1] into ``k`` clusters (2..16): what training
        runs, and a direct call. Raster inference (nodata masks, shared clusters, labels
        without full-resolution maps) goes through ``predict``, by way of
        ``seglib.inference.predictor.Predictor``.

        Per-call overrides of the config: ``lane`` (fast | learned | none), ``downsample``
        (1 or 2), ``iters``, ``temperature`` and ``size_prior`` of the head, ``smooth_iters`` of
        the fast lane. ``group=2`` shares prototypes between image i and image i + B/2 (training
        views). ``full_resolution=False`` skips the refinement lane and leaves ``probs`` out of
        the result: training steps whose losses only read the stride-4 maps need nothing more;
        for the learned lane it returns ``probs_learned`` instead, the lane's output at its
        working resolution (1/``refine.learned_scale``), which its training loss reads.
        ``check_values=False`` skips the NaN/range check of ``rgb`` (it reads values back from
        the device): for inputs the caller made itself, such as a training step's views.
        """
        check_lane(lane)
        return self._segment(
            rgb,
            check_k(k),
            lane=lane,
            downsample=downsample,
            iters=iters,
            temperature=temperature,
            size_prior=size_prior,
            smooth_iters=smooth_iters,
            group=group,
            full_resolution=full_resolution,
            check_values=check_values,
        )

    def predict(
        self,
        rgb: torch.Tensor,
        k: int,
        *,
        lane: str | None,
        downsample: int | None,
        iters: int | None,
        temperature: float | None,
        size_prior: float | None,
        clusters: Clusters | None = None,
        valid: torch.Tensor | None = None,
        upsample: bool = True,
        clustered: torch.Tensor | None = None,
        check_values: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``forward`` for inference, with the options only inference has; ``k`` and ``lane``
        come checked from ``seglib.inference.predictor.Predictor``, which holds them.

        ``clusters`` (from ``fit_clusters``) skips fitting and assigns to them.
        ``valid`` (B, H, W) bool marks image data (False: nodata, e.g. a scene's black border):
        prototypes and size-prior shares come from the cells whose pixels are all valid, one
        set fitted jointly over the batch; every pixel is still assigned (discard the others).
        ``upsample=False`` may return ``probs`` at 1/f of the input's size (an integer f, or
        not), leaving out the lane's last step, a bilinear upsampling (align_corners=False) of
        the probabilities by f: bilinear weights are convex, so a pixel whose (up to) four
        sources agree on the most probable cluster has that cluster as its label, and a caller
        that needs only labels computes the full-resolution maps near label edges alone
        (``seglib.inference.blend``). ``F.interpolate(probs, size=(H, W), mode="bilinear")``
        gives what ``upsample=True`` returns.
        ``clustered``: ``clustered_embeddings(rgb)`` computed before (with ``clusters``): the
        encoder and the denoising are skipped, and ``embeddings`` and ``features`` are None.
        """
        if clustered is not None and clusters is None:
            raise ValueError("clustered= needs clusters= (fitted clusters to assign the embeddings to)")
        return self._segment(
            rgb,
            k,
            lane=lane,
            downsample=downsample,
            iters=iters,
            temperature=temperature,
            size_prior=size_prior,
            clusters=clusters,
            valid=valid,
            upsample=upsample,
            clustered=clustered,
            check_values=check_values,
        )

    def _segment(
        self,
        rgb: torch.Tensor,
        k: int,
        *,
        lane: str | None,
        downsample: int | None,
        iters: int | None,
        temperature: float | None,
        size_prior: float | None,
        smooth_iters: int | None = None,
        group: int = 1,
        clusters: Clusters | None = None,
        full_resolution: bool = True,
        valid: torch.Tensor | None = None,
        check_values: bool = True,
        upsample: bool = True,
        clustered: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """What ``forward`` and ``predict`` share, with ``k`` and ``lane`` already checked."""
        lane = self.config.refine.lane if lane is None else lane
        if clustered is None:
            emb, features = self.embed(self._downsampled(rgb, downsample, check_values))  # (B, D, h, w)
        else:
            emb, features = None, None
        head_input = emb if clustered is None else clustered
        head = self.head(
            head_input,
            k,
            iters=iters,
            temperature=temperature,
            size_prior=size_prior,
            group=group,
            clusters=clusters,
            valid=valid_cells(valid, head_input.shape[-2:]),
            denoised=clustered is not None,
        )
        out = {
            "embeddings": emb,
            "prototypes": head.prototypes,
            "cluster_bias": head.bias,
            "logits": head.logits,
            "probs_coarse": head.probs,
            "features": features,
            "clustered": head.clustered,
        }
        if full_resolution:
            out["probs"] = self.refine(head.probs, head.logits, rgb, lane, smooth_iters, upsample)  # (B, K, H, W)
        elif lane == "learned":  # what the learned lane's training loss reads
            out["probs_learned"] = self.refine_learned(head.probs, rgb, smooth_iters)  # (B, K, H/s, W/s)
        return out
