"""The losses of the research stage ``cluster``: dataset-level clustering on real imagery.

``sinkhorn``, ``balanced_codes`` and ``swapped_prediction`` (SwAV's balanced codes made dense,
with PiCIE's exact warps between the views) are the core's (``seglib.losses.swap``: what
``seglib.adapt`` adapts a model with), re-exported here. Over-clustering (C several times the
number of classes one expects) lets a big class take several prototypes instead of being split
from its neighbours by the balance.

``mutual_information`` is IIC's objective itself (Ji, Henriques and Vedaldi, ICCV 2019): no
targets, the joint distribution of the two views' assignments over every displacement within a
small window is made as informative as possible (confident, consistent and balanced).

Every function works on (B, C, h, w) maps; the positions of the whole batch form one
assignment problem, as in SwAV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seglib.augment import ViewTransform
from seglib.losses.swap import balanced_codes, sinkhorn, swapped_prediction  # noqa: F401  (re-exported)

__all__ = [
    "sinkhorn",
    "balanced_codes",
    "swapped_prediction",
    "mutual_information",
    "assignment_stats",
    "colour_statistics",
]


def mutual_information(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    transform: ViewTransform,
    *,
    window: int = 0,
    lamb: float = 1.0,
) -> torch.Tensor:
    """Minus the mutual information of the two views' cluster assignments (IIC's loss).

    ``logits_a`` (B, C, h, w) live in the source frame, ``logits_b`` in view B's frame;
    ``transform`` maps A's frame to B's. B's probabilities are warped back into A's frame and
    only the positions B covers count. The joint P (C, C) pairs the assignment of each position
    of A with that of every position of B up to ``window`` cells away (summed over the
    displacements, as IIC does), over the whole batch, symmetrised and normalised. The loss is
    -sum P log(P / (P_i^lamb P_j^lamb)): 0 when every position gets the same cluster,
    -log C at best (confident, consistent, every cluster used equally). ``lamb`` > 1 favours
    balanced marginals more. Under DDP each process scores its own batch."""
    probs_a = logits_a.float().softmax(1)
    probs_b, covered = transform.to_source(logits_b.float().softmax(1))  # (B, C, h, w), (B, 1, h, w)
    a = (probs_a * covered).transpose(0, 1)  # (C, B, h, w)
    b = (probs_b * covered).transpose(0, 1)
    # conv2d with B's maps as the kernel: out[i, j, dy, dx] = sum over the batch and the
    # positions of a[i] at p + d times b[j] at p, for every displacement d in the window.
    joint = F.conv2d(a, b, padding=window).sum((2, 3))  # (C, C)
    joint = 0.5 * (joint + joint.t())
    joint = (joint / joint.sum()).clamp_min(1e-8)
    p_i = joint.sum(1, keepdim=True)  # (C, 1)
    p_j = joint.sum(0, keepdim=True)  # (1, C)
    return -(joint * (joint.log() - lamb * p_i.log() - lamb * p_j.log())).sum()


@torch.no_grad()
def colour_statistics(rgb: torch.Tensor, size: tuple[int, int], radii: tuple[int, ...]) -> torch.Tensor:
    """Targets of the cross-channel prediction: for each radius r, the mean and the standard
    deviation of the colour over (2r+1)^2 cells of the stride grid ``size``, as
    (B, 6 * len(radii), h, w). Region-level colour statistics: a network that sees only
    luminance texture must recognise what kind of surface a region is to predict them."""
    cells = F.adaptive_avg_pool2d(rgb.float(), size)  # (B, 3, h, w)
    out = []
    for r in radii:
        mean = F.avg_pool2d(cells, 2 * r + 1, 1, r, count_include_pad=False)
        sq = F.avg_pool2d(cells.square(), 2 * r + 1, 1, r, count_include_pad=False)
        out += [mean - 0.5, (sq - mean.square()).clamp_min(0).sqrt()]
    return torch.cat(out, 1)


@torch.no_grad()
def assignment_stats(logits: torch.Tensor) -> dict[str, float]:
    """Collapse diagnostics of logit maps (B, C, h, w): mean per-position entropy and the
    entropy of the mean assignment (cluster usage), both divided by log C, and the number
    of prototypes that win at least one position."""
    c = logits.shape[1]
    p = logits.float().softmax(1)
    log_c = torch.log(torch.tensor(float(c)))
    pixel = -(p * p.clamp_min(1e-12).log()).sum(1).mean() / log_c
    usage = p.mean((0, 2, 3))
    marginal = -(usage * usage.clamp_min(1e-12).log()).sum() / log_c
    used = torch.bincount(logits.argmax(1).flatten(), minlength=c).gt(0).sum()
    return {"pixel_entropy": float(pixel), "usage_entropy": float(marginal), "prototypes_used": float(used)}
