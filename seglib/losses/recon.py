"""The autoencoder reconstruction loss (student training only).

Target: the RGB image the student sees, average-pooled to stride 4 and Gaussian-blurred
(``autoencoder.blur_sigma``, a kernel reaching 2 sigma each way): the decoder should reproduce
colour and coarse structure, not pixel noise. Loss:
``L1(pred, target) + grad_weight * L1(|Sobel(pred)|, |Sobel(target)|)``; the gradient term keeps
edges where a plain L1 would settle for blur.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["blur_kernel", "gaussian_blur", "reconstruction_target", "sobel_magnitude", "reconstruction_loss"]


def blur_kernel(sigma: float) -> int:
    """The odd kernel size of a Gaussian blur that reaches 2 sigma each way (5 for sigma 1)."""
    return 2 * math.ceil(2 * sigma) + 1


def gaussian_blur(x: torch.Tensor, sigma: float, kernel: int) -> torch.Tensor:
    """Depthwise Gaussian blur of x (B, C, H, W) with an odd ``kernel`` size (reflect padding)."""
    if sigma <= 0 or kernel <= 1:
        return x
    if kernel % 2 == 0:
        raise ValueError(f"blur kernel size must be odd, got {kernel}")
    r = kernel // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect" if min(x.shape[-2:]) > r else "replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # horizontal
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # vertical


def reconstruction_target(rgb: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """rgb (B, 3, H, W) -> blurred stride-4 target (B, 3, H/4, W/4)."""
    return gaussian_blur(F.avg_pool2d(rgb.float(), 4), sigma, blur_kernel(sigma))


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """|d/dx| + |d/dy| per channel, by 3x3 Sobel filters (replicate padding)."""
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    c = x.shape[1]
    weight = torch.stack([kx, kx.T])[:, None].repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=c)  # (B, 2C, H, W)
    return g.abs().reshape(x.shape[0], c, 2, *x.shape[-2:]).sum(2)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, grad_weight: float = 0.5) -> torch.Tensor:
    """L1 on values plus ``grad_weight`` times L1 on Sobel gradient magnitudes."""
    loss = F.l1_loss(pred, target)
    if grad_weight:
        loss = loss + grad_weight * F.l1_loss(sobel_magnitude(pred), sobel_magnitude(target))
    return loss
