"""Inference on arrays of any size: padding to the model's stride, batching, label maps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["to_tensor", "predict_probs", "predict_labels", "model_stride"]


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


@torch.no_grad()
def predict_probs(model: torch.nn.Module, rgb: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
    """Probabilities (B, K, H, W) for rgb (B, 3, H, W) of any size: reflect-padded up to the
    model's stride, cropped back."""
    device = next(model.parameters()).device
    h, w = rgb.shape[-2:]
    m = model_stride(model, kwargs.get("downsample"))
    ph, pw = (-h) % m, (-w) % m
    x = rgb.to(device)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    probs = model(x, k, **kwargs)["probs"]
    return probs[..., :h, :w]


def predict_labels(model: torch.nn.Module, image: np.ndarray, k: int, **kwargs) -> np.ndarray:
    """Labels (H, W) int64 for one (H, W, 3) image."""
    return predict_probs(model, to_tensor(image), k, **kwargs)[0].argmax(0).cpu().numpy()
