"""Dataset-level clustering losses for training on real imagery without labels.

The idea is SwAV's (Caron et al., NeurIPS 2020) made dense, with PiCIE's use of geometric
equivariance (Cho et al., CVPR 2021): a set of C prototypes is shared by every image of the
training set; each position of view A is assigned to them, the assignment is *balanced* over
the batch by a few Sinkhorn-Knopp iterations (every prototype receives the same share of
positions), warped into view B's frame with the exact geometric transform, and view B has to
predict it (and the other way round). The balanced target is the anti-collapse term: giving
every position the same prototype, or the uniform distribution, is as expensive as it can be.
Over-clustering (C several times the number of classes one expects) lets a big class take
several prototypes instead of being split from its neighbours by the balance.

``window`` > 0 averages the target over a (2w+1)^2 neighbourhood first (the same spirit as
IIC's displacement window, Ji et al. ICCV 2019): a position must predict what its
surroundings are assigned to, which favours region-level rather than pixel-level clusters.

``mutual_information`` is IIC's objective itself (Ji, Henriques and Vedaldi, ICCV 2019): no
targets, the joint distribution of the two views' assignments over every displacement within a
small window is made as informative as possible (confident, consistent and balanced).

Every function works on (B, C, h, w) maps; the positions of the whole batch form one
assignment problem, as in SwAV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..augment import ViewTransform

__all__ = [
    "sinkhorn",
    "balanced_codes",
    "swapped_prediction",
    "mutual_information",
    "assignment_stats",
    "colour_statistics",
]


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, *, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment of N positions to C prototypes from ``logits`` (N, C).

    Returns Q (N, C): each row sums to 1, each column sums to about N / C (exactly after
    enough iterations). Works in log space so small ``eps`` cannot overflow."""
    n, c = logits.shape
    log_q = logits.float() / eps  # (N, C)
    for _ in range(iters):
        # Columns: every prototype gets total mass N / C (global over processes under DDP).
        col = torch.logsumexp(log_q, 0, keepdim=True)  # (1, C)
        if dist.world_size() > 1:
            col = _global_logsumexp(col)
        log_q = log_q - col + torch.log(torch.tensor(n * dist.world_size() / c, device=log_q.device))
        # Rows: every position is a distribution over prototypes.
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    return log_q.exp()


def _global_logsumexp(col: torch.Tensor) -> torch.Tensor:
    peak = col.max().detach()
    total = (col - peak).exp()
    torch.distributed.all_reduce(total)
    return total.log() + peak


@torch.no_grad()
def balanced_codes(logits: torch.Tensor, *, eps: float, iters: int, window: int = 0) -> torch.Tensor:
    """Sinkhorn codes of a batch of logit maps (B, C, h, w) -> (B, C, h, w), each position a
    distribution over C; ``window`` > 0 then averages them over (2w+1)^2 cells."""
    b, c, h, w = logits.shape
    flat = logits.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
    q = sinkhorn(flat, eps=eps, iters=iters).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)
    if window > 0:
        q = F.avg_pool2d(q, 2 * window + 1, 1, window, count_include_pad=False)
    return q.contiguous()


def swapped_prediction(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    transform: ViewTransform,
    *,
    eps: float = 0.05,
    iters: int = 3,
    window: int = 0,
) -> torch.Tensor:
    """Cross-entropy of each view's prediction against the other view's balanced codes.

    ``logits_a`` (B, C, h, w) live in the source frame (view A is photometric only),
    ``logits_b`` in view B's frame; ``transform`` maps A's frame to B's. A's codes are warped
    into B's frame (B covers a crop of A, so every position of B has a source); B's codes are
    warped back into A's frame, where only the positions B covers count."""
    q_a = balanced_codes(logits_a, eps=eps, iters=iters, window=window)
    q_b = balanced_codes(logits_b, eps=eps, iters=iters, window=window)
    q_a_in_b = transform.to_view(q_a)  # (B, C, h, w), B's frame
    q_b_in_a, covered = transform.to_source(q_b)  # (B, C, h, w), (B, 1, h, w)
    ce_b = -(q_a_in_b * F.log_softmax(logits_b.float(), 1)).sum(1).mean()
    ce_a = -(q_b_in_a * F.log_softmax(logits_a.float(), 1)).sum(1, keepdim=True)
    ce_a = (ce_a * covered).sum() / covered.sum().clamp_min(1.0)
    return 0.5 * (ce_a + ce_b)


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
