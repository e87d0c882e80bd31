"""The teacher ("monolithic") segmenter: encoder -> soft k-means head -> refinement lane.

    model = MonolithicSegmenter()
    out = model(rgb, k)   # rgb (B, 3, H, W) in [0, 1], H and W divisible by 4 * downsample
    out["probs"]        # (B, K, H, W), sums to 1 over K; argmax gives the labels
    out["embeddings"]   # (B, D, H/4, W/4) for downsample 1 (H/8 for downsample 2)
    out["prototypes"]   # (B, K, D)
    out["logits"]       # (B, K, H/4, W/4) the head's logits (-squared distance / T)
    out["probs_coarse"] # (B, K, H/4, W/4) the head's probabilities before refinement
    out["features"]     # (B, embed_dim, H/4, W/4) the encoder's raw (unnormalised) features

The embedding D = ``embed_dim`` learned unit-norm channels + 3 colour channels: the image's
stride-4 mean colour (minus the image mean) times ``colour_weight``. Colour is the strongest
cue in aerial imagery and must survive training (see docs/design.md); appending it explicitly
means the learned channels only have to add what colour cannot tell (texture, context).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .head import SoftKMeans, check_k
from .layers import ConvNormAct, ResidualBlock, standardize
from .refine import LANES, LearnedRefiner, fast_lane, none_lane

__all__ = ["Encoder", "MonolithicSegmenter", "check_rgb"]

STRIDE = 4


def check_rgb(rgb: object, multiple: int = STRIDE, *, check_values: bool = True) -> torch.Tensor:
    """Validate a model input; raises ``ValueError`` that names the problem and the fix."""
    if not isinstance(rgb, torch.Tensor):
        raise ValueError(f"rgb must be a torch.Tensor (B, 3, H, W), got {type(rgb).__name__}")
    if rgb.ndim != 4:
        raise ValueError(
            f"rgb must have shape (B, 3, H, W), got {tuple(rgb.shape)}; add a batch axis with rgb[None]"
        )
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


class Encoder(nn.Module):
    """Two stride-2 convs to stride 4, then dilated residual blocks and a 1x1 projection.

    Arguments:
      width: channels at stride 4.
      depth: residual blocks; dilations cycle 1, 2, 4 to widen the receptive field for texture.
      embed_dim: output channels, L2-normalised per position.
      norm: group | batch | instance | none.
    """

    def __init__(
        self,
        *,
        width: int = 64,
        depth: int = 3,
        embed_dim: int = 32,
        norm: str = "group",
        texture_pool: int = 0,
        input_mode: str = "rgb",
    ):
        super().__init__()
        if input_mode not in ("rgb", "highpass", "both"):
            raise ValueError(f"input_mode must be rgb, highpass or both, got {input_mode!r}")
        cin = {"rgb": 3, "highpass": 1, "both": 4}[input_mode]
        self.stem = nn.Sequential(
            ConvNormAct(cin, width // 2, stride=2, norm=norm),
            ConvNormAct(width // 2, width, stride=2, norm=norm),
        )
        self.blocks = nn.Sequential(
            *[ResidualBlock(width, dilation=(1, 2, 4)[i % 3], norm=norm) for i in range(depth)]
        )
        self.texture_pool, self.input_mode = texture_pool, input_mode
        if texture_pool:
            # Rectified filter responses averaged over a window: texture energies that no
            # longer depend on where in a stripe or grid cell a position sits.
            self.texture = nn.Conv2d(width, width, 1)
        self.proj = nn.Conv2d(width * (2 if texture_pool else 1), embed_dim, 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """Unnormalised features (B, embed_dim, H/4, W/4); the model normalises them."""
        x = self.blocks(self.stem(self.prepare(rgb)))  # (B, width, H/4, W/4)
        if self.texture_pool:
            r = self.texture_pool
            energy = F.avg_pool2d(F.relu(self.texture(x)), 2 * r + 1, 1, r, count_include_pad=False)
            x = torch.cat([x, energy], 1)  # (B, 2 * width, H/4, W/4)
        return self.proj(x)

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """The encoder's input: standardised RGB, and/or high-pass luminance (luminance minus
        its local mean over ~8 px), which carries texture but no colour or brightness."""
        if self.input_mode == "rgb":
            return standardize(rgb)
        lum = (rgb * rgb.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        highpass = (lum - F.avg_pool2d(lum, 9, 1, 4, count_include_pad=False)) / 0.05
        return highpass if self.input_mode == "highpass" else torch.cat([standardize(rgb), highpass], 1)


def colour_channels(rgb: torch.Tensor, size: tuple[int, int], blur: int = 0) -> torch.Tensor:
    """Mean colour per embedding cell minus the image mean: (B, 3, h, w); ``blur`` > 0 averages
    over (2*blur+1)^2 cells more, so textured classes do not split by the phase of a pattern."""
    pooled = F.adaptive_avg_pool2d(rgb.float(), size)
    if blur:
        pooled = F.avg_pool2d(pooled, 2 * blur + 1, 1, blur, count_include_pad=False)
    return pooled - rgb.float().mean(dim=(2, 3), keepdim=True)


class MonolithicSegmenter(nn.Module):
    """Teacher model. ``MonolithicSegmenter()`` builds the default configuration.

    Arguments:
      config: a ``ModelConfig``; its defaults are the reference teacher.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        enc = config.encoder
        self.encoder = Encoder(
            width=enc.width,
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            norm=enc.norm,
            texture_pool=enc.texture_pool,
            input_mode=enc.input_mode,
        )
        self.colour_weight = enc.colour_weight
        h = config.head
        self.head = SoftKMeans(
            iters=h.iters,
            temperature=h.temperature,
            init_pool=h.init_pool,
            denoise_iters=h.denoise_iters,
            denoise_radius=h.denoise_radius,
            denoise_bandwidth=h.denoise_bandwidth,
        )
        self.refiner = LearnedRefiner(width=config.refine.learned_width)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MonolithicSegmenter:
        """Build the model a teacher checkpoint (``teacher.pt`` or a ``ckpt_*.pt`` of a teacher
        run) describes and load its weights, on CPU and in eval mode."""
        from ..checkpoint import CheckpointError, load_checkpoint
        from ..config import Config

        state = load_checkpoint(path, kind=("teacher", "train-state"))
        if state["kind"] == "train-state" and state.get("task") != "teacher":
            raise CheckpointError(f"{path} is a {state.get('task')} training checkpoint, not a teacher's")
        model = cls(Config.from_dict(state["config"]).model)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path}: weights do not fit the model its config describes: {exc}"
            ) from exc
        return model.eval()

    @property
    def input_multiple(self) -> int:
        """H and W must be multiples of this (times the downsample factor)."""
        return STRIDE

    @property
    def embed_dim(self) -> int:
        return self.config.encoder.embed_dim + 3

    def embed(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, D, H/4, W/4), raw features (B, embed_dim, H/4, W/4)).

        Embeddings are the unit-normalised features followed by the weighted colour channels.
        """
        features = self.encoder(rgb).float()
        colour = colour_channels(rgb, features.shape[-2:], self.config.encoder.colour_blur) * self.colour_weight
        return torch.cat([F.normalize(features, dim=1), colour], 1), features

    def refine(
        self,
        probs: torch.Tensor,
        logits: torch.Tensor,
        rgb: torch.Tensor,
        lane: str,
        smooth_iters: int | None = None,
    ) -> torch.Tensor:
        """Full-resolution probabilities from the head's stride-4 output, by ``lane``."""
        r = self.config.refine
        smooth_iters = r.smooth_iters if smooth_iters is None else smooth_iters
        if lane == "none":
            return none_lane(logits, rgb.shape[-2:])
        fast = fast_lane(probs, rgb, radius=r.radius, eps=r.eps, smooth_iters=smooth_iters)
        if lane == "fast":
            return fast
        if lane == "learned":
            return self.refiner(fast, rgb)
        raise ValueError(f"unknown refinement lane {lane!r}; choose one of {', '.join(LANES)}")

    @torch.no_grad()
    def fit_prototypes(self, rgb: torch.Tensor, k: int, *, downsample: int | None = None) -> torch.Tensor:
        """Prototypes (1, K, D) fitted jointly over all images of ``rgb`` (N, 3, H, W), e.g.
        windows sampled from one large raster; pass them back as ``forward(..., prototypes=)``
        so every window is labelled with the same clusters."""
        ds = self.config.downsample if downsample is None else downsample
        check_rgb(rgb, self.input_multiple * ds)
        x = F.avg_pool2d(rgb, ds) if ds > 1 else rgb
        emb, _ = self.embed(x)
        return self.head(emb, check_k(k), group=emb.shape[0]).prototypes[:1]

    def forward(
        self,
        rgb: torch.Tensor,
        k: int,
        *,
        lane: str | None = None,
        downsample: int | None = None,
        iters: int | None = None,
        temperature: float | None = None,
        smooth_iters: int | None = None,
        group: int = 1,
        prototypes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Segment ``rgb`` (B, 3, H, W) in [0, 1] into ``k`` clusters (2..16).

        Per-call overrides of the config: ``lane`` (fast | learned | none), ``downsample``
        (1 or 2), ``iters`` and ``temperature`` of the head, ``smooth_iters`` of the fast lane.
        ``group=2`` shares prototypes between image i and image i + B/2 (training views).
        ``prototypes`` (1 or B, K, D) skips fitting and assigns to the given prototypes.
        """
        k = check_k(k)
        lane = self.config.refine.lane if lane is None else lane
        if lane not in LANES:
            raise ValueError(f"unknown refinement lane {lane!r}; choose one of {', '.join(LANES)}")
        ds = self.config.downsample if downsample is None else downsample
        if ds not in (1, 2):
            raise ValueError(f"downsample must be 1 or 2, got {ds}")
        check_rgb(rgb, STRIDE * ds)
        x = F.avg_pool2d(rgb, ds) if ds > 1 else rgb
        emb, features = self.embed(x)  # (B, D, H/4ds, W/4ds)
        head = self.head(emb, k, iters=iters, temperature=temperature, group=group, prototypes=prototypes)
        probs = self.refine(head.probs, head.logits, rgb, lane, smooth_iters)  # (B, K, H, W)
        return {
            "probs": probs,
            "embeddings": emb,
            "prototypes": head.prototypes,
            "logits": head.logits,
            "probs_coarse": head.probs,
            "features": features,
        }
