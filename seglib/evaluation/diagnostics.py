"""Looking inside a model (notebooks 01, 04 and 05): the soft k-means objective, the clusters
of each student slice, the decoder's reconstruction and how much colour a linear probe reads
back from the student's features. The student's CNN reads images whose sides are multiples of
16; the functions that run it alone crop other images to that grid (top-left kept)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..inference.predictor import to_tensor
from ..losses.recon import reconstruction_loss, reconstruction_target
from ..models.autoencoder import ReconstructionDecoder
from ..models.segmenter import head_embedding
from ..viz import pca_rgb

__all__ = ["colour_embedding", "head_objective", "slice_maps", "reconstruct", "colour_probe_r2"]


def colour_embedding(rgb: np.ndarray, stride: int = 4) -> torch.Tensor:
    """(1, 3, H/stride, W/stride): the mean colour of each cell, standardised per channel over
    the image (zero mean, unit variance). What the head clusters when a model knows nothing but
    colour, at the scale of the model's unit-norm embeddings, so the head's default temperature
    means what it means in the model."""
    x = to_tensor(rgb)
    cells = F.adaptive_avg_pool2d(x, (x.shape[-2] // stride, x.shape[-1] // stride))  # (1, 3, h, w)
    return (cells - cells.mean((2, 3), keepdim=True)) / cells.std((2, 3), keepdim=True).clamp_min(1e-6)


def head_objective(emb: torch.Tensor, probs: torch.Tensor, prototypes: torch.Tensor) -> float:
    """Soft k-means objective: mean over positions of sum_k r[n, k] * ||x[n] - mu[k]||^2, for
    emb (B, D, h, w), probs (B, K, h, w) and prototypes (B, K, D)."""
    x = emb.flatten(2).transpose(1, 2).float()  # (B, N, D)
    d2 = torch.cdist(x, prototypes.float()).pow(2)  # (B, N, K)
    r = probs.flatten(2).transpose(1, 2)  # (B, N, K)
    return float((r * d2).sum(-1).mean())


def _student_input(rgb: np.ndarray) -> torch.Tensor:
    """(1, 3, H', W'): the image cropped to the largest multiple of 16 per side (at least 16)."""
    x = to_tensor(rgb)
    h, w = (max(16, side // 16 * 16) for side in x.shape[-2:])
    if h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"the student needs images of at least 16x16 px, got {x.shape[-1]}x{x.shape[-2]}")
    return x[..., :h, :w]


@torch.no_grad()
def slice_maps(student: torch.nn.Module, rgb: np.ndarray, k: int) -> dict[str, dict[str, np.ndarray]]:
    """For each slice of a ``StudentSegmenter`` (coarse stride 16, mid 8, fine 4): its embedding
    as a false-colour image (``pca``, at the slice's resolution) and the K clusters the head finds
    on that slice alone (``labels``, nearest-upsampled to the image cropped to multiples of 16).
    Only ``fine`` is used at inference."""
    x = _student_input(rgb)
    out = {}
    for name, z in student.backbone(x).items():  # (1, E, H/s, W/s)
        emb = head_embedding(z, x, colour_weight=student.colour_weight)
        probs = F.interpolate(student.head(emb, k).probs, size=x.shape[-2:], mode="nearest")  # (1, K, H, W)
        out[name] = {"pca": pca_rgb(z[0]), "labels": probs[0].argmax(0).numpy()}
    return out


@torch.no_grad()
def reconstruct(student: torch.nn.Module, decoder: ReconstructionDecoder, rgb: np.ndarray) -> dict[str, Any]:
    """The decoder's stride-4 RGB prediction for one image beside its training target (the image
    pooled to stride 4 and blurred as ``decoder.config`` says), as (H/4, W/4, 3) arrays, the
    reconstruction loss, and ``flat_loss``: the loss of predicting the image's mean colour
    everywhere (a decoder that learned nothing of the image). ``decoder`` comes from
    ``ReconstructionDecoder.from_checkpoint``."""
    ae = decoder.config
    x = _student_input(rgb)
    pred = decoder(student.backbone.forward_all(x)["fine_features"])  # (1, 3, H/4, W/4)
    target = reconstruction_target(x, sigma=ae.blur_sigma)
    flat = target.mean((2, 3), keepdim=True).expand_as(target)  # (1, 3, H/4, W/4)
    return {
        "target": target[0].permute(1, 2, 0).clamp(0, 1).numpy(),
        "pred": pred[0].permute(1, 2, 0).numpy(),
        "loss": float(reconstruction_loss(pred, target, ae.grad_weight)),
        "flat_loss": float(reconstruction_loss(flat, target, ae.grad_weight)),
    }


@torch.no_grad()
def colour_probe_r2(student: torch.nn.Module, images: Sequence[np.ndarray]) -> float:
    """How much of the stride-4 colour a linear map reads back from the student's learned fine
    embedding (unit-normalised, as the head sees it; without the appended colour channels): R^2
    of a least-squares fit pooled over all positions of ``images``. The autoencoder loss exists
    to keep this information in the student."""
    feats, colours = [], []
    for rgb in images:
        x = _student_input(rgb)
        z = F.normalize(student.backbone(x)["fine"], dim=1)  # (1, E, h, w)
        feats.append(z[0].flatten(1).T)  # (N, E)
        colours.append(F.adaptive_avg_pool2d(x, z.shape[-2:])[0].flatten(1).T)  # (N, 3)
    a = torch.cat(feats).double()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)  # with an intercept
    y = torch.cat(colours).double()
    coef = torch.linalg.lstsq(a, y).solution
    residual = (y - a @ coef).pow(2).sum()
    return float(1 - residual / (y - y.mean(0)).pow(2).sum())
