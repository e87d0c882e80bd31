"""Swapped prediction: dense, balanced self-labelling of two views (what ``seglib.adapt`` adapts
a model with; the research stage ``cluster`` of ``experiments/stages`` trains with it too).

The idea is SwAV's (Caron et al., NeurIPS 2020) made dense, with PiCIE's use of geometric
equivariance (Cho et al., CVPR 2021): a set of C prototypes is shared by every image; each
position of view A is assigned to them, the assignment is *balanced* over the batch by a few
Sinkhorn-Knopp iterations (every prototype receives the same share of positions), warped into
view B's frame with the exact geometric transform, and view B has to predict it (and the other
way round). The balanced target is the anti-collapse term: giving every position the same
prototype, or the uniform distribution, is as expensive as it can be.

``window`` > 0 averages the target over a (2w+1)^2 neighbourhood first (the same spirit as
IIC's displacement window, Ji et al. ICCV 2019): a position must predict what its
surroundings are assigned to, which favours region-level rather than pixel-level clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..augment import ViewTransform

__all__ = ["sinkhorn", "balanced_codes", "swapped_prediction"]


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
