"""Configuration: nested dataclasses whose defaults run a CPU smoke experiment in seconds.

A config file is a Python file that exports ``get_config()`` or ``CONFIG``, returning either a
``Config`` or a nested dict of overrides::

    # my_run.py
    def get_config():
        return {"train": {"steps": 2000, "lr": 1e-3}, "loss": {"smoothness": 0.5}}

Overrides are checked: an unknown key raises ``ConfigError`` naming the key (and the closest
valid one), a value of the wrong type raises ``ConfigError`` naming the key and both types.
``Config.to_dict()`` is what every checkpoint and TensorBoard run stores.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "K_MIN",
    "K_MAX",
    "LANES",
    "check_k",
    "check_lane",
    "ConfigError",
    "EncoderConfig",
    "HeadConfig",
    "RefineConfig",
    "ModelConfig",
    "LossConfig",
    "AugmentConfig",
    "RandomizeConfig",
    "DataConfig",
    "TrainConfig",
    "StudentConfig",
    "DistillConfig",
    "AutoencoderConfig",
    "Config",
    "apply_overrides",
    "load_config_file",
    "parse_set",
]


K_MIN, K_MAX = 2, 16  # the numbers of segments a user may ask for
LANES = ("fast", "learned", "none")  # refinement lanes (seglib.models.refine)


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


def check_k(k: object) -> int:
    """The number of clusters as an int; ``ValueError`` naming the allowed range otherwise."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # NumPy integers are Integral
        raise ValueError(f"K must be an integer in {K_MIN}..{K_MAX}, got {type(k).__name__} {k!r}")
    k = int(k)
    if not K_MIN <= k <= K_MAX:
        raise ValueError(f"K must be in {K_MIN}..{K_MAX} (got {k}); pick a number of segments in that range")
    return k


def check_lane(lane: object) -> None:
    """``ValueError`` unless ``lane`` is None (the model's default) or a refinement lane name."""
    if lane is not None and lane not in LANES:
        raise ValueError(f"unknown refinement lane {lane!r}; choose one of {', '.join(LANES)} (or None: the model's)")


@dataclass
class EncoderConfig:
    width: int = 64  # channels of the stride-4 residual trunk
    depth: int = 3  # residual blocks (dilations cycle through 1, 2, 4)
    embed_dim: int = 32  # learned embedding channels (unit-normalised)
    colour_weight: float = 3.0  # weight of the stride-4 colour channels appended to the embedding
    colour_blur: int = 0  # extra box blur of those channels, radius in embedding cells
    input_mode: str = "highpass"  # highpass (luminance texture, no colour) | rgb | both
    highpass_clip: float = 2.0  # soft clip of the high-pass input (0: linear)
    norm: str = "group"  # group | batch | instance | none


@dataclass
class HeadConfig:
    iters: int = 6  # soft k-means EM iterations
    temperature: float = 0.1  # softmax temperature on squared distances
    size_prior: float = 0.0  # weight of log(cluster share) added to the final logits (0: off)
    init_pool: int = 2  # farthest-point initialisation runs on embeddings pooled by this factor
    denoise_iters: int = 5  # feature-space bilateral filter passes before clustering (0: off)
    denoise_radius: int = 2  # its neighbourhood radius, in embedding cells
    denoise_bandwidth: float = 0.4  # its feature-distance bandwidth
    denoise_dilations: tuple[int, ...] = (1,)  # neighbour spacing of pass i: dilations[i % len]


@dataclass
class RefineConfig:
    lane: str = "fast"  # fast | learned | none (default lane of a forward call)
    radius: int = 2  # guided-filter box radius, in stride-4 pixels
    eps: float = 1e-3  # guided-filter regulariser: larger smooths across weaker edges
    smooth_iters: int = 1  # guided-filter passes at stride 4 before upsampling
    guide_scale: int = 1  # 1: the filter is applied at full resolution; 2: at half, then bilinear
    learned_width: int = 12  # channels of the learned refiner


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    downsample: int = 1  # 1 or 2: run the encoder on the image downsampled by this factor


@dataclass
class LossConfig:
    consistency: float = 1.0  # symmetric KL between the two views after warping
    pixel_entropy: float = 1.0  # minimised: confident pixels
    marginal_entropy: float = 1.0  # maximised: every cluster used
    smoothness: float = 1.0  # edge-aware total variation of the probabilities
    edge_sigma: float = 0.05  # RGB gradient at which the smoothness weight falls to 1/e
    invariance: float = 1.0  # raw features of corresponding positions agree across views
    invariance_radius: int = 0  # ... with the mean over this neighbourhood radius (stride-4 cells)
    variance: float = 1.0  # hinge keeping each raw feature channel's spread above a floor
    variance_floor: float = 1.0  # the floor (std over the batch's positions)
    covariance: float = 0.04  # decorrelates the raw feature channels
    refine: float = 1.0  # full-resolution terms that train the learned refinement lane


@dataclass
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    scale_min: float = 0.7  # view B is a crop of this fraction of the side (up to 1), resized back
    brightness: float = 0.08  # additive, per image
    contrast: float = 0.15  # multiplicative around the mean, +-
    saturation: float = 0.15
    hue: float = 0.03  # rotation of the chroma plane, in turns
    noise: float = 0.01


@dataclass
class RandomizeConfig:
    """Knobs drawn afresh for every batch so that one model serves every setting."""

    ks: tuple[int, ...] = (2, 4, 8, 16)
    downsample: tuple[int, ...] = (1, 2)
    cluster_iters: tuple[int, int] = (3, 8)  # inclusive range
    smooth_iters: tuple[int, int] = (0, 2)  # inclusive range
    lanes: tuple[str, ...] = ("fast", "learned", "none")


@dataclass
class DataConfig:
    synthetic: bool = True  # procedural tiles with labels; False reads data_dir
    data_dir: str = "data/images"
    size: int = 128  # training crop side (multiple of 16)
    downscale: int = 1  # real tiles are shrunk by this factor (area average) before cropping
    extent: int = 0  # synthetic tiles are windows of a scene this wide (0: the crop is the scene)
    batch_size: int = 4
    num_workers: int = 0
    eval_images: int = 8  # synthetic evaluation tiles
    eval_size: int = 256


@dataclass
class TrainConfig:
    steps: int = 20
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 5
    grad_accum: int = 1
    clip: float = 1.0
    amp: bool = False  # bf16 autocast where supported
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_dir: str = ""  # empty: runs/train
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1
    image_every: int = 50
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    sync_batchnorm: bool = True  # under DDP on CUDA, BatchNorm layers become SyncBatchNorm
    # > 0: also keep an exponential moving average of the weights (and float buffers) with this
    # decay; teacher.pt / student.pt then hold the average, which smooths out the step-to-step
    # noise of the last steps. Training checkpoints keep both (resume continues either).
    ema_decay: float = 0.0


@dataclass
class StudentConfig:
    size: str = "base"  # a name from seglib.models.student.STUDENTS; dims/depths override it
    dims: tuple[int, ...] = ()
    depths: tuple[int, ...] = ()
    norm: str = "group"
    dropout: float = 0.0
    multires: bool = True
    stem: str = "conv"  # conv (two strided 3x3 convs) | unshuffle (space-to-depth, then one conv)
    # Inference settings of the student's head (the rest is the teacher's); stored in student.pt.
    # These defaults: the teacher's denoising and clustering, the guided filter at half
    # resolution. The recipes ship a cheaper head,
    # seglib.recipes.FAST_STUDENT (radius-1 passes at spacings 1, 2, 4): docs/models.md.
    denoise_iters: int = 5
    denoise_radius: int = 2
    denoise_dilations: tuple[int, ...] = (1,)
    head_iters: int = 6  # soft k-means iterations at inference
    size_prior: float = 0.0  # the head's size prior at inference (HeadConfig.size_prior)
    downsample: int = 0  # 1 or 2: the student reads the image shrunk by this factor; 0: the teacher's
    smooth_iters: int = 0
    guide_scale: int = 2  # the guided filter runs at 1/guide_scale of the input resolution


@dataclass
class DistillConfig:
    teacher_checkpoint: str = ""
    feature: float = 1.0
    affinity: float = 1.0
    affinity_samples: int = 256
    pseudo_label: float = 1.0
    agreement: float = 1.0
    tv: float = 0.5
    consistency_weight: float = 0.5
    ema_decay: float = 0.99
    cluster_iters: int = 5
    teacher_steps: int = 300  # teacher trained first when no checkpoint is given


@dataclass
class AutoencoderConfig:
    enabled: bool = True
    lambda_recon: float = 0.01
    ema_decay: float = 0.99
    blur_sigma: float = 1.0
    blur_kernel: int = 5
    grad_weight: float = 0.5
    detach_backbone: bool = False
    hidden_channels: int = 32
    num_blocks: int = 2


@dataclass
class Config:
    stage: str = "teacher"  # teacher | student
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    randomize: RandomizeConfig = field(default_factory=RandomizeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON- and ``weights_only``-safe)."""
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> Config:
        """Check the values that types alone do not; ``ConfigError`` names the key. Every entry
        point (the training CLI, ``seglib.training.run.run``, the demo) calls it."""
        if self.stage not in ("teacher", "student"):
            raise ConfigError(f"stage must be 'teacher' or 'student', got {self.stage!r}")
        if self.data.size <= 0 or self.data.size % 16:
            raise ConfigError(f"data.size must be a positive multiple of 16, got {self.data.size}")
        if self.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.train.steps}")
        if self.train.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {self.train.grad_accum}")
        if self.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.data.batch_size}")
        bad = [k for k in self.randomize.ks if not K_MIN <= k <= K_MAX]
        if bad:
            raise ConfigError(f"randomize.ks must lie in {K_MIN}..{K_MAX}, got {bad}")
        return self

    @classmethod
    def from_dict(cls, overrides: dict[str, Any] | None = None) -> Config:
        """Defaults with ``overrides`` applied (validated)."""
        cfg = cls()
        if overrides:
            apply_overrides(cfg, overrides)
        return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_overrides(obj: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Set nested ``overrides`` on the dataclass ``obj`` in place, validating keys and types."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides for '{prefix or 'config'}' must be a dict, got {type(overrides).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_overrides(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))
    return obj


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' expects a list/tuple, got {type(value).__name__} {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"config key '{path}' expects {len(args)} items, got {len(value)}")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{path}' expects a bool (true/false), got {type(value).__name__} {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"config key '{path}' expects an int, got bool {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"config key '{path}' expects {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a Python config file exporting ``get_config()`` or ``CONFIG``; returns overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"seglib_user_config_{path.stem}", path)
    module = types.ModuleType(spec.name)
    module.__file__ = str(path)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report it as a config problem
        raise ConfigError(f"config file {path} failed to run: {type(exc).__name__}: {exc}") from exc
    if hasattr(module, "get_config"):
        value = module.get_config()
    elif hasattr(module, "CONFIG"):
        value = module.CONFIG
    else:
        raise ConfigError(
            f"config file {path} defines neither get_config() nor CONFIG; "
            "add `def get_config(): return {...}` returning a dict of overrides or a seglib.Config"
        )
    if isinstance(value, Config):
        return value.to_dict()
    if not isinstance(value, dict):
        raise ConfigError(f"config file {path} must return a dict or a seglib.Config, got {type(value).__name__}")
    return value


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-3", "randomize.ks=[4,8]"]`` into a nested override dict.

    Values are read as Python literals when they parse, else kept as strings.
    """
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
