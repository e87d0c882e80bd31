"""The teacher ("monolithic") segmenter: encoder -> soft k-means head -> refinement lane.

    model = MonolithicSegmenter()
    out = model(rgb, k)   # see seglib.models.segmenter for the output contract

The encoder is a small dilated residual CNN at stride 4; everything after it (colour channels,
head, lanes, forward) is shared with the student (``seglib.models.segmenter.Segmenter``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, apply_overrides
from .layers import INPUT_MODES, ResidualBlock, conv_norm_act, encoder_input
from .segmenter import STRIDE, Segmenter, check_rgb, colour_channels

__all__ = ["Encoder", "MonolithicSegmenter", "check_rgb", "colour_channels", "STRIDE"]


class Encoder(nn.Module):
    """Two stride-2 convs to stride 4, then dilated residual blocks and a 1x1 projection.

    Arguments:
      width: channels at stride 4.
      depth: residual blocks; dilations cycle 1, 2, 4 to widen the receptive field for texture.
      embed_dim: output channels (the model L2-normalises them per position).
      input_mode: what the network reads (``seglib.models.layers.encoder_input``). The
        default, high-pass luminance, keeps colour out of the learned features: colour is
        appended to the embedding explicitly, and a colour-blind network has to learn texture
        (docs/design.md has the measurements).

    The norms are GroupNorm: the teacher's features do not depend on what else is in the
    batch, so a window of a raster is embedded like the whole image.
    """

    def __init__(
        self,
        *,
        width: int = 64,
        depth: int = 3,
        embed_dim: int = 32,
        input_mode: str = "highpass",
    ):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {', '.join(INPUT_MODES)}, got {input_mode!r}")
        cin = INPUT_MODES[input_mode]
        self.stem = nn.Sequential(
            conv_norm_act(cin, width // 2, stride=2),
            conv_norm_act(width // 2, width, stride=2),
        )
        self.blocks = nn.Sequential(*[ResidualBlock(width, dilation=(1, 2, 4)[i % 3]) for i in range(depth)])
        self.input_mode = input_mode
        self.proj = nn.Conv2d(width, embed_dim, 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """Unnormalised features (B, embed_dim, H/4, W/4); the model normalises them."""
        x = encoder_input(rgb, self.input_mode)  # (B, C_in, H, W)
        return self.proj(self.blocks(self.stem(x)))  # (B, embed_dim, H/4, W/4)


class MonolithicSegmenter(Segmenter):
    """Teacher model. ``MonolithicSegmenter()`` builds the default configuration.

    Arguments:
      config: a ``ModelConfig``; its defaults are the reference teacher.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        enc = config.encoder
        self.encoder = Encoder(width=enc.width, depth=enc.depth, embed_dim=enc.embed_dim, input_mode=enc.input_mode)
        self.init_head(config.head, colour_weight=enc.colour_weight)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MonolithicSegmenter:
        """Build the model a teacher checkpoint (``teacher.pt`` or a ``ckpt_*.pt`` of a teacher
        run) describes and load its weights, on CPU and in eval mode."""
        from ..checkpoint import CheckpointError, load_checkpoint

        state = load_checkpoint(path, kind=("teacher", "train-state"))
        if state["kind"] == "train-state" and state.get("task") != "teacher":
            raise CheckpointError(f"{path} is a {state.get('task')} training checkpoint, not a teacher's")
        model = cls(apply_overrides(ModelConfig(), state["config"]["model"], prefix="model."))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit the model its config describes: {exc}") from exc
        return model.eval()

    @property
    def embed_dim(self) -> int:
        return self.config.encoder.embed_dim + 3

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.encoder(rgb)
