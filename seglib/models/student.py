"""The multi-resolution student CNN distilled from the teacher (what ships to the QGIS plugin).

``StudentBackbone`` encodes an image down to stride 16 and decodes back up, returning three
embeddings: ``coarse`` (stride 16), ``mid`` (stride 8) and ``fine`` (stride 4). Each slice is
a stack of VGG-style 3x3 conv-norm-ReLU blocks; coarse features are upsampled and merged into
mid, mid into fine (1x1 projection + skip connection from the encoder at that stride). Fully
convolutional: H and W must be multiples of 16 (``seglib.segment`` pads and crops back).

``StudentSegmenter`` wraps it with the same soft k-means head, colour channels and
refinement lanes as the teacher (``Segmenter``), clustering the fine embedding: any K in
2..16 at inference, probabilities and labels at the input resolution.

Named sizes live in ``STUDENTS``; docs/models.md lists their parameter counts and CPU latency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, HeadConfig, ModelConfig, RefineConfig, StudentConfig, apply_overrides
from .layers import INPUT_MODES, conv_norm_act, encoder_input
from .segmenter import Segmenter

__all__ = ["STUDENTS", "StudentBackbone", "StudentModelConfig", "StudentSegmenter", "student_shape"]

# Named sizes: (coarse, mid, fine) widths and 3x3 blocks per slice.
STUDENTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "tiny": {"dims": (64, 48, 32), "depths": (1, 1, 0)},  # no 3x3 block at stride 4
    "small": {"dims": (96, 64, 48), "depths": (2, 1, 1)},
    "base": {"dims": (192, 128, 96), "depths": (3, 2, 1)},
}
SLICES = ("coarse", "mid", "fine")  # strides 16, 8 and 4


def student_shape(cfg: StudentConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dims, depths) of a student config: the named size, with explicit dims/depths winning."""
    if cfg.size not in STUDENTS:
        raise ValueError(f"unknown student size {cfg.size!r}; choose one of {', '.join(STUDENTS)}")
    base = STUDENTS[cfg.size]
    dims = tuple(cfg.dims) or base["dims"]
    depths = tuple(cfg.depths) or base["depths"]
    if len(dims) != 3 or len(depths) != 3 or min(dims) < 8 or min(depths) < 0:
        raise ValueError(f"student dims and depths need 3 values each (coarse,mid,fine), got {dims} and {depths}")
    return dims, depths


def _blocks(channels: int, depth: int, norm: str) -> nn.Sequential:
    return nn.Sequential(*[conv_norm_act(channels, channels, norm=norm) for _ in range(depth)])


class StudentBackbone(nn.Module):
    """The student's network: a three-slice encoder-decoder (``StudentSegmenter`` adds the head
    and the lanes). ``StudentBackbone()`` builds the ``base`` size.

    Arguments:
      dims: widths of the (coarse, mid, fine) slices.
      depths: 3x3 blocks in each slice.
      embed_dim: channels of each slice's embedding (the teacher's learned width).
      norm: group | batch | instance | none.
      input_mode: what the network reads (``seglib.models.layers.encoder_input``); the student
        reads what its teacher's encoder reads.
    """

    def __init__(
        self,
        *,
        dims: tuple[int, int, int] = (192, 128, 96),
        depths: tuple[int, int, int] = (3, 2, 1),
        embed_dim: int = 32,
        norm: str = "group",
        input_mode: str = "highpass",
        stem: str = "conv",
    ):
        super().__init__()
        dc, dm, df = dims
        self.dims, self.input_mode = tuple(dims), input_mode
        cin = INPUT_MODES[input_mode]
        if stem == "conv":
            self.stem = nn.Sequential(
                conv_norm_act(cin, 32, stride=2, norm=norm), conv_norm_act(32, df, stride=2, norm=norm)
            )
        elif stem == "unshuffle":
            self.stem = nn.Sequential(nn.PixelUnshuffle(4), conv_norm_act(16 * cin, df, norm=norm))
        else:
            raise ValueError(f"unknown student stem {stem!r}; choose conv or unshuffle")
        self.down_mid = conv_norm_act(df, dm, stride=2, norm=norm)  # stride 8
        self.down_coarse = conv_norm_act(dm, dc, stride=2, norm=norm)  # stride 16
        self.coarse = _blocks(dc, depths[0], norm)
        self.merge_mid = nn.Conv2d(dc, dm, 1)
        self.mid = _blocks(dm, depths[1], norm)
        self.merge_fine = nn.Conv2d(dm, df, 1)
        self.fine = _blocks(df, depths[2], norm)
        self.heads = nn.ModuleDict({name: nn.Conv2d(d, embed_dim, 1) for name, d in zip(SLICES, dims, strict=True)})

    def forward_all(self, rgb: torch.Tensor, slices: tuple[str, ...] = SLICES) -> dict[str, torch.Tensor]:
        """Embeddings of the three slices (of ``slices``: a segmenter clusters the fine one
        alone) and ``fine_features``, the fine slice before its projection (the autoencoder
        decoder reads these)."""
        h, w = rgb.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"the student needs H and W divisible by 16, got {h}x{w}; pad the image first")
        s4 = self.stem(encoder_input(rgb, self.input_mode))  # (B, df, H/4, W/4)
        s8 = self.down_mid(s4)  # (B, dm, H/8, W/8)
        coarse = self.coarse(self.down_coarse(s8))  # (B, dc, H/16, W/16)
        mid = self.mid(s8 + self.merge_mid(F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)))
        fine = self.fine(s4 + self.merge_fine(F.interpolate(mid, scale_factor=2, mode="bilinear", align_corners=False)))
        feats = {"coarse": coarse, "mid": mid, "fine": fine}
        out = {name: self.heads[name](x) for name, x in feats.items() if name in slices}
        out["fine_features"] = fine
        return out

    def forward(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"coarse": (B, E, H/16, W/16), "mid": (B, E, H/8, W/8), "fine": (B, E, H/4, W/4)}."""
        out = self.forward_all(rgb)
        return {name: out[name] for name in SLICES}


@dataclass
class StudentModelConfig:
    """Everything a ``StudentSegmenter`` needs: its CNN (``student``) and the model settings it
    shares with its teacher (``model``: the teacher's encoder input and colour channels, and the
    head, lanes and downsample the student runs at inference). ``from_config`` builds it."""

    student: StudentConfig = field(default_factory=StudentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def from_config(cls, cfg: Config) -> StudentModelConfig:
        """The student clusters the kind of embedding its teacher (``cfg.model``) clusters; the
        inference-cost settings are the teacher's with ``cfg.student``'s overrides."""
        return cls.from_sections(cfg.model, cfg.student)

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any]) -> StudentModelConfig:
        """From a checkpoint's config dict: its ``model`` and ``student`` sections."""
        model = apply_overrides(ModelConfig(), config["model"], prefix="model.")
        return cls.from_sections(model, apply_overrides(StudentConfig(), config["student"], prefix="student."))

    @classmethod
    def from_sections(cls, m: ModelConfig, st: StudentConfig) -> StudentModelConfig:
        model = dataclasses.replace(
            m,
            head=dataclasses.replace(m.head, **st.head),
            refine=dataclasses.replace(m.refine, **st.refine),
            downsample=st.downsample or m.downsample,
        )
        return cls(student=st, model=model)

    # What ``Segmenter`` reads from every model's config.
    @property
    def head(self) -> HeadConfig:
        return self.model.head

    @property
    def refine(self) -> RefineConfig:
        return self.model.refine

    @property
    def downsample(self) -> int:
        return self.model.downsample


class StudentSegmenter(Segmenter):
    """Student CNN + soft k-means head + refinement lanes, with the teacher's forward contract.

    Arguments:
      config: a ``StudentModelConfig`` (defaults: the ``base`` student).
    """

    input_multiple = 16

    def __init__(self, config: StudentModelConfig | None = None):
        super().__init__()
        self.config = config = config or StudentModelConfig()
        dims, depths = student_shape(config.student)
        enc = config.model.encoder
        self.backbone = StudentBackbone(
            dims=dims,
            depths=depths,
            embed_dim=enc.embed_dim,
            norm=config.student.norm,
            input_mode=enc.input_mode,
            stem=config.student.stem,
        )
        self.init_head(config.head, colour_weight=enc.colour_weight)

    @property
    def embed_dim(self) -> int:
        return self.config.model.encoder.embed_dim + 3

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_all(rgb, slices=("fine",))["fine"]

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> StudentSegmenter:
        """Load ``student.pt`` (or a student training checkpoint) on CPU, in eval mode."""
        from ..checkpoint import CheckpointError, load_checkpoint

        state = load_checkpoint(path, kind=("student", "train-state"))
        if state["kind"] == "train-state" and state.get("task") != "student":
            raise CheckpointError(f"{path} is a {state.get('task')} training checkpoint, not a student's")
        model = cls(StudentModelConfig.from_checkpoint_config(state["config"]))
        weights = state["model"]
        if state["kind"] == "train-state":  # the training state also holds the decoder
            weights = {k[len("student.") :]: v for k, v in weights.items() if k.startswith("student.")}
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit the student its config describes: {exc}") from exc
        return model.eval()
