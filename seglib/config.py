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
    "check_patterns",
    "stage_settings",
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
    "ProbeConfig",
    "StudentConfig",
    "DistillConfig",
    "AutoencoderConfig",
    "Config",
    "apply_overrides",
    "load_config_file",
    "parse_set",
    "nest",
    "merge",
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


def check_patterns(patterns: object, what: str) -> tuple[str, ...]:
    """Validate a list of file-name glob patterns (``data.include`` / ``data.exclude``);
    ``ValueError`` naming ``what`` and the fix."""
    if isinstance(patterns, str):
        raise ValueError(
            f"{what} must be a list of glob patterns, got the string {patterns!r}; wrap it: [{patterns!r}]"
        )
    out = []
    for p in patterns or ():
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{what} holds {p!r}; every pattern must be a non-empty glob such as '*_t1*'")
        if "/" in p or "\\" in p:
            raise ValueError(f"{what} pattern {p!r} contains a path separator; patterns match file names only")
        out.append(p)
    return tuple(out)


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
    input_mode: str = "highpass"  # highpass (luminance texture, no colour) | rgb | both


@dataclass
class HeadConfig:
    iters: int = 6  # soft k-means EM iterations
    temperature: float = 0.1  # softmax temperature on squared distances
    size_prior: float = 0.0  # weight of log(cluster share) added to the final logits (0: off)
    denoise_iters: int = 5  # feature-space bilateral filter passes before clustering (0: off)
    denoise_radius: int = 2  # its neighbourhood radius, in embedding cells
    denoise_dilations: tuple[int, ...] = (1,)  # neighbour spacing of pass i: dilations[i % len]


@dataclass
class RefineConfig:
    lane: str = "fast"  # fast | learned | none (default lane of a forward call)
    smooth_iters: int = 1  # guided-filter passes at stride 4 before upsampling
    guide_scale: int = 1  # 1: the filter is applied at full resolution; 2: at half, then bilinear
    learned_scale: int = 2  # the learned lane (guided filter, refiner, loss) runs at 1/this resolution, then bilinear


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    downsample: int = 1  # 1 or 2: run the encoder on the image downsampled by this factor


@dataclass
class LossConfig:
    """Weights of the teacher's terms (seglib.losses.teacher)."""

    consistency: float = 1.0  # symmetric KL between the two views after warping
    pixel_entropy: float = 1.0  # minimised: confident pixels
    marginal_entropy: float = 1.0  # maximised: every cluster used
    smoothness: float = 1.0  # edge-aware total variation of the probabilities
    invariance: float = 1.0  # raw features of corresponding positions agree across views
    variance: float = 1.0  # hinge keeping each raw feature channel's spread above a floor
    covariance: float = 0.04  # decorrelates the raw feature channels
    refine: float = 1.0  # full-resolution terms that train the learned refinement lane


@dataclass
class AugmentConfig:
    """View B of the teacher's pair is always turned by a random multiple of 90 degrees too: aerial
    images have no up."""

    flip: bool = True  # view B may be mirrored (and the student's batches flipped)
    scale_min: float = 0.7  # view B is a crop of this fraction of the side (up to 1), resized back
    brightness: float = 0.08  # additive, per image
    contrast: float = 0.15  # multiplicative around the mean, +-
    saturation: float = 0.15  # multiplicative around the grey value, +-
    hue: float = 0.03  # rotation of the chroma plane, in turns
    noise: float = 0.01  # std of additive Gaussian pixel noise


@dataclass
class RandomizeConfig:
    """Drawn afresh for every batch so that one model serves every K (the teacher's other knobs,
    seglib.training.teacher.KNOB_RANGES, likewise)."""

    ks: tuple[int, ...] = (2, 4, 8, 16)  # numbers of clusters


@dataclass
class DataConfig:
    synthetic: bool = True  # procedural tiles with labels; False reads data_dir
    data_dir: str = "data/images"  # folder of RGB tiles (PNG, JPEG, GeoTIFF) when not synthetic
    # Glob patterns on file names or stems (a pattern matching no file is an error):
    include: tuple[str, ...] = ()  # train only on the images of data_dir that match one (empty: all), e.g. ["*t1"]
    exclude: tuple[str, ...] = ()  # then leave out those that match one (seglib.loto's held-out tile)
    # Ground truth is never trained on: with masks the quality probe (ProbeConfig) adds mIoU.
    mask_dir: str = ""  # label PNGs of data_dir's images (<stem>.png), scored by the probe; "": none
    mask_ignore: tuple[int, ...] = ()  # label ids the probe's mIoU ignores (e.g. 5, 255)
    size: int = 128  # training crop side (multiple of 16)
    downscale: int = 1  # real tiles are shrunk by this factor (area average) before cropping
    batch_size: int = 4  # images per micro-batch and process
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class TrainConfig:
    steps: int = 20  # optimizer steps
    lr: float = 2e-3  # peak learning rate (AdamW)
    warmup: int = 5  # steps of linear warm-up before the cosine decay
    grad_accum: int = 1  # micro-batches per optimizer step
    amp: bool = False  # bf16 autocast where supported
    seed: int = 0  # run seed: data, augmentations, initial weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_dir: str = ""  # checkpoints, teacher.pt / student.pt and TensorBoard logs; empty: runs/train
    checkpoint_every: int = 50  # steps between checkpoints (and TensorBoard images)
    # A kill at any moment loses at most checkpoint_minutes of work; such a time-triggered
    # checkpoint is removed once a later one exists (the folder ends with step checkpoints only).
    checkpoint_minutes: float = 5.0  # also checkpoint when this many minutes passed since the last one (0: off)
    keep_checkpoints: int = 3  # newest step checkpoints kept (0: all)
    log_every: int = 1  # steps between TensorBoard scalars (each read waits for the device: 10 or more on a GPU)
    # 0 is 1 thread on a 2-core machine: 2 threads were 8-17x slower per step on the busy
    # 2-core machine (README, "Train on your own imagery"); seglib.device.training_threads.
    threads: int = 0  # torch CPU threads while training; 0: half the cores (OMP_NUM_THREADS when set)
    compile: str = ""  # torch.compile mode of the forward ("", default, reduce-overhead, max-autotune)
    weight_average_decay: float = 0.0  # > 0: teacher.pt / student.pt hold an EMA of the weights with this decay


def _overrides(of: type, **defaults: Any) -> Any:
    """A field holding overrides of the dataclass ``of`` (a dict of some of its fields, checked
    like the dataclass's own; ``apply_overrides`` merges into it)."""
    return field(default_factory=lambda: dict(defaults), metadata={"overrides": of})


@dataclass
class ProbeConfig:
    """The quality signal logged while training: a few fixed images segmented every ``every``
    steps (and before the first step, and after the last) with the model being trained
    (seglib.training.probe), scored by label-free proxies and, with ground truth, mIoU."""

    every: int = 100  # steps between probes (0: off)


@dataclass
class StudentConfig:
    """The student's CNN, and how it runs at inference: with its teacher's head and lanes, changed
    by ``head`` and ``refine`` (e.g. ``{"iters": 1}``; stored in student.pt, docs/models.md)."""

    size: str = "base"  # a name from seglib.models.student.STUDENTS; dims/depths override it
    dims: tuple[int, ...] = ()  # (coarse, mid, fine) widths; empty: the size's
    depths: tuple[int, ...] = ()  # 3x3 blocks per slice; empty: the size's
    norm: str = "group"  # group | batch | instance | none
    multires: bool = True  # distil the coarse and mid slices too, not only the fine one
    stem: str = "conv"  # conv (two strided 3x3 convs) | unshuffle (space-to-depth, then one conv)
    head: dict[str, Any] = _overrides(HeadConfig)  # changes to the teacher's model.head at inference
    refine: dict[str, Any] = _overrides(RefineConfig, smooth_iters=0, guide_scale=2)  # changes to its model.refine
    downsample: int = 0  # 1 or 2: the student reads the image shrunk by this factor; 0: the teacher's


@dataclass
class DistillConfig:
    teacher_checkpoint: str = ""  # teacher.pt to distil from; empty: one is trained first
    feature: float = 1.0  # weight of 1 - cosine(student, teacher features)
    affinity: float = 1.0  # weight of the similarity-matrix term
    pseudo_label: float = 1.0  # weight of the sharpened self-labels term
    agreement: float = 1.0  # weight of KL(teacher assignments || student assignments)
    tv: float = 0.5  # weight of the edge-aware total variation
    consistency_weight: float = 0.5  # weight of the cross-resolution consistency
    loss_norm_decay: float = 0.99  # decay of the running means that normalise each slice's loss
    cluster_iters: int = 5  # soft k-means iterations on the student's embeddings
    teacher_steps: int = 300  # steps of the teacher trained first when no checkpoint is given


@dataclass
class AutoencoderConfig:
    enabled: bool = True  # train the reconstruction decoder beside the student
    lambda_recon: float = 0.01  # weight of the normalised reconstruction loss
    loss_norm_decay: float = 0.99  # decay of the running mean that normalises the reconstruction loss
    blur_sigma: float = 1.0  # Gaussian blur of the stride-4 target
    grad_weight: float = 0.5  # weight of the Sobel-gradient term
    detach_backbone: bool = False  # True: the decoder's gradient does not reach the student


@dataclass
class Config:
    stage: str = "teacher"  # teacher | student, or a stage a plugin registered (seglib.training.stages)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    randomize: RandomizeConfig = field(default_factory=RandomizeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    stage_options: dict[str, Any] = field(default_factory=dict)  # settings of a plugin stage, checked by that stage

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON- and ``weights_only``-safe)."""
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> Config:
        """Check the values that types alone do not; ``ConfigError`` names the key. Every entry
        point (the training CLI, ``seglib.training.run.run``, the demo) calls it; the stage's
        name is checked by the stage registry and ``stage_options`` by ``stage_settings`` when
        the run starts."""
        if not self.stage:
            raise ConfigError("stage must name a training stage: teacher, student or a registered plugin stage")
        if self.data.size <= 0 or self.data.size % 16:
            raise ConfigError(f"data.size must be a positive multiple of 16, got {self.data.size}")
        for key, low, note in _MINIMUMS:
            section, name = key.split(".")
            if (value := getattr(getattr(self, section), name)) < low:
                raise ConfigError(f"{key} must be >= {low}{note}, got {value}")
        bad = [k for k in self.randomize.ks if not K_MIN <= k <= K_MAX]
        if bad:
            raise ConfigError(f"randomize.ks must lie in {K_MIN}..{K_MAX}, got {bad}")
        lanes = [self.model.refine.lane, self.student.refine.get("lane", "fast")]
        if bad := [lane for lane in lanes if lane not in LANES]:
            raise ConfigError(f"unknown refinement lane(s) {bad} in the config; choose from {', '.join(LANES)}")
        if self.model.downsample not in (1, 2):
            raise ConfigError(f"model.downsample takes 1 or 2, got {self.model.downsample}")
        if self.student.downsample not in (0, 1, 2):
            raise ConfigError(f"student.downsample must be 0 (the teacher's), 1 or 2, got {self.student.downsample}")
        for key in ("include", "exclude"):
            try:
                check_patterns(getattr(self.data, key), f"data.{key}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if (self.data.include or self.data.exclude) and self.data.synthetic:
            raise ConfigError("data.include / data.exclude choose images of data.data_dir; give --data-dir")
        return self

    def check_paths(self) -> Config:
        """The folders the run reads must exist: ``data.data_dir`` (unless synthetic) and
        ``data.mask_dir`` (when set). ``ConfigError`` names the key, the path and the fix."""
        d = self.data
        if not d.synthetic and not Path(d.data_dir).expanduser().is_dir():
            raise ConfigError(
                f"data.data_dir not found: {d.data_dir}; pass --data-dir DIR (a folder of RGB tiles) or --synthetic"
            )
        if d.mask_dir and not Path(d.mask_dir).expanduser().is_dir():
            raise ConfigError(
                f"data.mask_dir not found: {d.mask_dir}; pass --mask-dir DIR (label PNGs named like the images) "
                "or leave it empty"
            )
        if d.mask_dir and d.synthetic:
            raise ConfigError("data.mask_dir is set but the run trains on synthetic tiles; add --data-dir DIR")
        return self

    @classmethod
    def from_dict(cls, overrides: dict[str, Any] | None = None) -> Config:
        """Defaults with ``overrides`` applied (validated)."""
        cfg = cls()
        if overrides:
            apply_overrides(cfg, overrides)
        return cfg


# Settings with a lower bound: (key, minimum, what the minimum means).
_MINIMUMS = [
    ("train.steps", 1, ""),
    ("train.grad_accum", 1, ""),
    ("data.batch_size", 1, ""),
    ("train.checkpoint_minutes", 0, " (0: off)"),
    ("train.threads", 0, " (0: automatic)"),
    ("probe.every", 0, " (0: off)"),
]


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
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        current = getattr(obj, key)
        target = fields[key].metadata.get("overrides")
        if dataclasses.is_dataclass(current):
            apply_overrides(current, value, prefix=f"{path}.")
        elif target is not None:  # checked against the dataclass it overrides, merged into the dict
            checked = apply_overrides(target(), value, prefix=f"{path}.")
            setattr(obj, key, {**current, **{name: getattr(checked, name) for name in value}})
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))
    return obj


def stage_settings(options: type | None, overrides: dict[str, Any], stage: str) -> Any:
    """A stage's settings: ``overrides`` (the config's ``stage_options``) checked against the
    stage's settings dataclass ``options``, an instance of it; None for a stage without settings
    of its own (``overrides`` must then be empty). ``ConfigError`` names the key."""
    if options is None:
        if overrides:
            raise ConfigError(f"stage {stage} has no settings of its own; stage_options must be empty")
        return None
    return apply_overrides(options(), overrides, prefix="stage_options.")


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
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' expects a dict, got {type(value).__name__} {value!r}")
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
        out = merge(out, nest(key.strip(), value))
    return out


def nest(path: str, value: Any) -> dict[str, Any]:
    """``nest("train.lr", 0.1)`` -> ``{"train": {"lr": 0.1}}``."""
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
