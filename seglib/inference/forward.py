"""A segmenter on one piece: an image tensor padded to the model's stride, the model run, the
probabilities cropped back and the clusters put in the stable order.

    probs = predict_probs(model, to_tensor(image), k)   # (1, K, H, W)
    labels = predict_labels(model, image, k)            # (H, W) int64

The window engine (``seglib.inference.engine``) runs every window through these helpers too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..models.head import brightness_order

__all__ = [
    "model_stride",
    "model_device",
    "to_tensor",
    "bands_tensor",
    "valid_tensor",
    "pad_to_stride",
    "pad_valid",
    "forward_padded",
    "predict_probs",
    "predict_labels",
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


@torch.no_grad()
def forward_padded(model: torch.nn.Module, rgb: torch.Tensor, k: int, **kwargs) -> dict[str, torch.Tensor]:
    h, w = rgb.shape[-2:]
    multiple = model_stride(model, kwargs.get("downsample"))
    x = pad_to_stride(rgb.to(model_device(model)), multiple)
    if kwargs.get("valid") is not None:
        kwargs["valid"] = pad_valid(kwargs["valid"], multiple)
    out = model(x, k, **kwargs)
    out["probs"] = out["probs"][..., :h, :w]
    if kwargs.get("clusters") is None:  # clusters fitted here, per image: stable ids
        _renumber(out)
    return out


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


def predict_probs(model: torch.nn.Module, rgb: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
    """Probabilities (B, K, H, W) for rgb (B, 3, H, W) of any size, in one piece: padded up to
    the model's stride, cropped back. ``kwargs`` are the model's per-call overrides."""
    return forward_padded(model, rgb, k, **kwargs)["probs"]


def predict_labels(model: torch.nn.Module, image: np.ndarray, k: int, **kwargs) -> np.ndarray:
    """Labels (H, W) int64 for one (H, W, 3) image, in one piece."""
    return predict_probs(model, to_tensor(image), k, **kwargs)[0].argmax(0).cpu().numpy()


def argmax_labels(probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (h, w) index of the largest of the K values (K, h, w), the first one on ties.

    ``torch.max`` over K, not ``np.argmax``: the model's probabilities come out channels-last
    (the fast lane's layout), where NumPy's argmax over K is several times slower."""
    return torch.as_tensor(probs).max(0).indices.to(torch.uint8).numpy()
