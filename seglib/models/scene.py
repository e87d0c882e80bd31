"""A plain CNN trained to tell scene classes apart, whose maps are the features the head clusters.

``SceneCNN``: stages of 3x3 conv-BatchNorm-ReLU blocks, the first block of each strided, at
strides 2, 4, 8 and 16; ``classify`` pools the last stage and applies a linear layer (the scene
classes of its pretraining, ``seglib.training.scene``). Telling farmland from a harbour or a
parking lot from a freeway makes the maps describe texture and context, which colour alone
does not; the segmenter clusters them per image beside colour.

``SceneSegmenter`` (checkpoint kind ``scene``): the maps of ``levels`` (``s4``, ``s8``, ``s16``,
or ``cls``: the scene classifier applied at every stride-16 cell, as square roots of its class
posteriors) are upsampled to stride 4 of the (downsampled) input, each unit-normalised per
position and scaled by the square root of its weight, then concatenated; the base class
unit-normalises the result and appends the weighted colour channels, and the soft k-means head
and refinement lane run as for every seglib model (``seglib.models.segmenter``). ``zoom``
resizes the image the CNN reads (not the grid the head clusters), for pixels of another ground
size than the pretraining's.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HeadConfig, RefineConfig
from .segmenter import Segmenter

__all__ = ["SceneCNN", "SceneModelConfig", "SceneSegmenter", "LEVELS", "calibrate_batchnorm"]

LEVELS = ("s4", "s8", "s16", "cls")


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SceneCNN(nn.Module):
    """Arguments:
    widths: channels of the stages at strides 2, 4, 8 and 16.
    depths: 3x3 blocks per stage, the first of each strided.
    classes: outputs of the linear scene classifier on the pooled stride-16 map (0: none).
    """

    def __init__(
        self, *, widths: tuple[int, ...] = (32, 64, 128, 256), depths: tuple[int, ...] = (1, 2, 2, 2), classes: int = 21
    ):
        super().__init__()
        if len(widths) != 4 or len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"SceneCNN needs 4 widths and 4 depths >= 1 (strides 2, 4, 8, 16), got {widths}, {depths}")
        self.stages = nn.ModuleList(
            nn.Sequential(_block(cin, cout, 2), *[_block(cout, cout) for _ in range(depth - 1)])
            for cin, cout, depth in zip((3, *widths[:-1]), widths, depths, strict=True)
        )
        self.fc = nn.Linear(widths[-1], classes) if classes else None
        # RGB in [0, 1] -> roughly zero-mean, unit-variance inputs
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25), persistent=False)

    def pyramid(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"s4": (B, w1, H/4, W/4), "s8": (B, w2, H/8, W/8), "s16": (B, w3, H/16, W/16)}."""
        x = (rgb - self.mean) / self.std
        out = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                out[f"s{2 ** (i + 1)}"] = x
        return out

    def class_logits(self, s16: torch.Tensor) -> torch.Tensor:
        """The classifier at every cell of a stride-16 map: (B, C, h, w) -> (B, classes, h, w)."""
        if self.fc is None:
            raise ValueError("this SceneCNN has no classifier (classes=0); the 'cls' level needs one")
        return torch.einsum("bchw,kc->bkhw", s16, self.fc.weight) + self.fc.bias[:, None, None]

    def classify(self, rgb: torch.Tensor) -> torch.Tensor:
        """Scene-class logits (B, classes) of whole images: the classifier on the pooled stride-16 map."""
        if self.fc is None:
            raise ValueError("this SceneCNN has no classifier (classes=0)")
        return self.fc(F.adaptive_avg_pool2d(self.pyramid(rgb)["s16"], 1).flatten(1))  # (B, classes)


# Head and lane settings that are constants of the code now, at the values they have there:
# scene checkpoints written while they were settings (by the pretraining runs of the UC Merced
# study) still load when they hold these values, and are refused otherwise.
_CONSTANTS = {
    "head": {"init_pool": 2, "denoise_bandwidth": 0.4},
    "refine": {"radius": 2, "eps": 1e-3, "learned_width": 4},
}


def _without_constants(section: dict[str, Any], name: str) -> dict[str, Any]:
    section = dict(section)
    for key, value in _CONSTANTS[name].items():
        if key in section and section.pop(key) != value:
            raise ValueError(f"this scene checkpoint's {name}.{key} is not {value}, the value the code has now")
    return section


def _bundled_head() -> HeadConfig:
    # the bundled student's head on real imagery (seglib.recipes.STUDENT_DUBAI_CPU)
    return HeadConfig(iters=1, size_prior=3.0, denoise_iters=4, denoise_radius=1, denoise_dilations=(1, 2, 4))


@dataclass
class SceneModelConfig:
    """Everything a ``SceneSegmenter`` is built from (stored in its checkpoint)."""

    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 2, 2, 2)
    classes: int = 21
    levels: dict[str, float] = field(default_factory=lambda: {"s8": 1.0})  # maps clustered, and their weights
    colour_weight: float = 3.0  # weight of the colour channels appended to the embedding
    head: HeadConfig = field(default_factory=_bundled_head)
    refine: RefineConfig = field(default_factory=lambda: RefineConfig(smooth_iters=0, guide_scale=4))
    downsample: int = 2  # the model reads the image shrunk by this factor (1 or 2)
    # The CNN reads the (downsampled) image resized by this factor (bilinear), its maps brought back
    # to stride 4 of the image: pixels of another size than the pretraining's (UC Merced: 0.3 m)
    # seen at that size. The head, its colour channels and the labels keep the image's own grid.
    zoom: float = 1.0

    def __post_init__(self) -> None:
        unknown = [level for level in self.levels if level not in LEVELS]
        if unknown or not self.levels:
            raise ValueError(f"levels must name some of {', '.join(LEVELS)}, got {list(self.levels)}")
        if self.downsample not in (1, 2):
            raise ValueError(f"downsample must be 1 or 2, got {self.downsample}")
        if not 0.25 <= self.zoom <= 4:
            raise ValueError(f"zoom must lie in [0.25, 4], got {self.zoom}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneModelConfig:
        d = dict(d)
        head, refine = _without_constants(d.get("head", {}), "head"), _without_constants(d.get("refine", {}), "refine")
        d["head"] = HeadConfig(**{**head, "denoise_dilations": tuple(head.get("denoise_dilations", (1,)))})
        d["refine"] = RefineConfig(**refine)
        d["widths"], d["depths"] = tuple(d["widths"]), tuple(d["depths"])
        return cls(**d)


class SceneSegmenter(Segmenter):
    """A ``SceneCNN`` under the soft k-means head, with the forward contract of every segmenter.

    Arguments:
      config: a ``SceneModelConfig`` (default: the shape of the bundled scene model, random weights).
    """

    input_multiple = 16

    def __init__(self, config: SceneModelConfig | None = None):
        super().__init__()
        self.config = config = config or SceneModelConfig()
        self.cnn = SceneCNN(widths=config.widths, depths=config.depths, classes=config.classes)
        self.levels = dict(config.levels)  # an attribute, so that a protocol can score other levels (Method.attrs)
        self.zoom = float(config.zoom)  # likewise
        self.init_head(config.head, colour_weight=config.colour_weight)

    @property
    def embed_dim(self) -> int:
        dims = {"s4": self.config.widths[1], "s8": self.config.widths[2], "s16": self.config.widths[3]}
        return sum(dims.get(level, self.config.classes) for level in self.levels) + 3

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        size = (rgb.shape[-2] // 4, rgb.shape[-1] // 4)
        maps = self.cnn.pyramid(_resized(rgb, self.zoom))
        parts = []
        for level, weight in self.levels.items():
            if level == "cls":  # class posteriors, square-rooted: a unit vector per position
                logits = _to_size(self.cnn.class_logits(maps["s16"].float()), size)
                parts.append(logits.softmax(1).sqrt() * weight**0.5)
                continue
            parts.append(F.normalize(_to_size(maps[level].float(), size), dim=1) * weight**0.5)
        return torch.cat(parts, 1)  # (B, F, H/4, W/4)

    def with_settings(self, **changes: Any) -> SceneSegmenter:
        """A copy with the same weights and other inference settings: ``levels``,
        ``colour_weight``, ``downsample``, ``zoom``, or a field of the head (``size_prior``, ``iters``...)."""
        cfg = copy.deepcopy(self.config)
        head_fields = {f.name for f in dataclasses.fields(HeadConfig)}
        for key, value in changes.items():
            if key in head_fields:
                setattr(cfg.head, key, value)
            elif hasattr(cfg, key) and key not in ("widths", "depths", "classes"):
                setattr(cfg, key, value)
            else:
                raise ValueError(f"unknown scene model setting {key!r}")
        cfg.__post_init__()
        model = SceneSegmenter(cfg)
        model.cnn.load_state_dict(self.cnn.state_dict())
        return model.eval()

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """The ``scene`` checkpoint of this model (``seglib.checkpoint.save_atomic`` writes it)."""
        from ..checkpoint import model_checkpoint

        return model_checkpoint("scene", self.config.to_dict(), self.cnn.state_dict(), **extra)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> SceneSegmenter:
        """Load a ``scene`` checkpoint (or the ``state.pt`` of a scene pretraining run, its weights
        at the last saved step) on CPU, in eval mode."""
        from ..checkpoint import CheckpointError, load_checkpoint

        state = load_checkpoint(path, kind=("scene", "train-state"))
        if state["kind"] == "train-state" and state.get("task") != "scene":
            raise CheckpointError(f"{path} is a {state.get('task')} training checkpoint, not a scene model's")
        try:
            model = cls(SceneModelConfig.from_dict(state["config"]))
            model.cnn.load_state_dict(state["model"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a usable scene model ({exc})") from exc
        return model.eval()


def _to_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps (B, C, h, w) to ``size``, low-pass filtered when it shrinks them."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinks = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinks)


def _resized(rgb: torch.Tensor, zoom: float) -> torch.Tensor:
    """``rgb`` (B, 3, H, W) resized by ``zoom`` (the input itself at zoom 1), values kept in [0, 1]."""
    if zoom == 1:
        return rgb
    size = (max(1, round(rgb.shape[-2] * zoom)), max(1, round(rgb.shape[-1] * zoom)))
    return _to_size(rgb.float(), size).clamp(0, 1)


@torch.no_grad()
def calibrate_batchnorm(cnn: nn.Module, batches) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches``
    (each a (B, 3, H, W) tensor fed to ``cnn.pyramid``), in place; returns ``cnn`` in eval mode.
    A network at random weights is compared with its BatchNorm calibrated this way on the data
    the trained one saw, so that the comparison is of the weights, not of the normalisation."""
    for m in cnn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    cnn.train()
    for x in batches:
        cnn.pyramid(x)
    return cnn.eval()
