"""The soft k-means EM iterations and the farthest-point initialisation, each in its fused
form beside its reference form.

``em_steps`` runs the iterations

    r = softmax_k(-||x_n - mu_k||^2 / T);   mu_k = sum_n r_nk x_n / sum_n r_nk

(a cluster whose mass falls to ~0 keeps its prototype). With gradient, by default, they run as
``_EMSteps``, which drops the per-position constant |x|^2 from the logits and carries a
hand-written backward pass (13 operator calls per iteration instead of autograd's ~40); under
``reference_ops()`` and without gradient, as the plain loop. ``tests/test_kernels.py`` holds
the two against each other.
"""

from __future__ import annotations

import torch

from .numerics import fused_training

__all__ = ["distance_logits", "em_steps", "farthest_point_init", "farthest_points", "squared_norms"]

NORM_CHUNK = 1 << 16  # positions per piece of ``squared_norms`` without gradient
FPS_CHUNK = 1 << 14  # positions per piece of the farthest-point search's distances


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """|x|^2 (B, 1, N) of positions x (B, D, N): ``x.square().sum(1, keepdim=True)``, for a large
    fit without gradient piece by piece (``_pieces``; each position's sum over D is the same
    reduction, so the same numbers): no squared copy of x beside it (18 MiB for a shared legend's
    2^17 cells)."""
    pieces = _pieces(x)
    if pieces is None:
        return x.square().sum(1, keepdim=True)
    out = x.new_empty(x.shape[0], 1, x.shape[2])
    for a, b in pieces:
        out[:, :, a:b] = x[:, :, a:b].square().sum(1, keepdim=True)
    return out


def _pieces(x: torch.Tensor, chunk: int = NORM_CHUNK) -> list[tuple[int, int]] | None:
    """The ranges of positions, about ``chunk`` each, that ``squared_norms`` and the farthest-point
    search work through; None (all at once) for at most ``chunk`` positions or with gradient. Of
    equal length (edges at multiples of 64): a short last piece (one position, say) would be
    reduced by another kernel, whose rounding differs."""
    n = x.shape[2]
    if n <= chunk or (torch.is_grad_enabled() and x.requires_grad):
        return None
    count = -(-n // chunk)
    edges = [0, *(n * i // count // 64 * 64 for i in range(1, count)), n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def distance_logits(x: torch.Tensor, x2: torch.Tensor, mu: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K, N) logits -||x - mu||^2 / T of positions x (B, D, N) (with x2 = |x|^2, (B, 1, N))
    and prototypes mu (B, K, D), by the matmul form: no (B, K, D, N) intermediate. Without
    gradient, every step after the matmul is done in its result (the same operations, the same
    numbers): one (B, K, N) tensor instead of three or four at once, which for a fit on many
    positions (a shared legend's 2^17 cells) is most of its working memory."""
    if torch.is_grad_enabled() and (x.requires_grad or mu.requires_grad or x2.requires_grad):
        d2 = x2 - 2 * torch.bmm(mu, x) + mu.square().sum(-1, keepdim=True)
        return -d2.clamp_min(0) / temperature
    d2 = torch.bmm(mu, x).mul_(2)
    torch.sub(x2, d2, out=d2)
    return d2.add_(mu.square().sum(-1, keepdim=True)).clamp_min_(0).neg_().div_(temperature)


def em_steps(x: torch.Tensor, mu: torch.Tensor, *, iters: int, temperature: float, x2: torch.Tensor) -> torch.Tensor:
    """Prototypes (B, K, D) after ``iters`` EM iterations from ``mu`` on x (B, D, N) (float32;
    x2 = |x|^2 as (B, 1, N)). Gradients flow into x and mu."""
    if fused_training():
        return _EMSteps.apply(x, mu, iters, temperature)
    for _ in range(iters):
        r = distance_logits(x, x2, mu, temperature).softmax(1)  # (B, K, N)
        mass = r.sum(2, keepdim=True)  # (B, K, 1)
        # A cluster that lost all mass keeps its previous prototype instead of dividing by 0.
        mu = torch.where(mass > 1e-6, torch.bmm(r, x.transpose(1, 2)) / mass.clamp_min(1e-6), mu)
        del r  # else it lives on beside the next iteration's logits and assignments
    return mu


class _EMSteps(torch.autograd.Function):
    """The EM iterations (training): prototypes (B, K, D) from the initial ones and x (B, D, N),
    with a hand-written backward pass.

    Forward: 9 operator calls per iteration (the reference loop takes 17, and autograd about
    40 more in the backward pass; this backward takes 13). The softmax over clusters ignores a
    per-position constant, so |x|^2 is left out of the logits, which are one batched
    multiply-add: (2 mu.x - |mu|^2) / T. A cluster whose mass fell to (near) zero keeps its
    prototype, as in the reference.
    """

    @staticmethod
    def forward(ctx, x, mu, iters, temperature):  # noqa: D102
        xt = x.transpose(1, 2)  # (B, N, D)
        # The mass floor as a tensor: a Python number in a comparison is converted to a tensor
        # on the host at every call (four operator calls).
        floor = x.new_full((), 1e-6)
        saved = []
        for _ in range(iters):
            # (B, K, N) logits up to a per-position constant, then the assignments.
            logits = torch.baddbmm(
                torch.linalg.vecdot(mu, mu)[..., None], mu, x, beta=-1 / temperature, alpha=2 / temperature
            )
            r = logits.softmax(1)
            mass = r.sum(2, keepdim=True)  # (B, K, 1)
            keep = mass > floor
            mass = mass.clamp_min_(1e-6)
            mean = torch.bmm(r, xt).div_(mass)  # (B, K, D)
            saved += [mu, r, mass, keep, mean]
            mu = torch.where(keep, mean, mu)
        ctx.save_for_backward(x, *saved)
        ctx.iters, ctx.temperature = iters, temperature
        return mu

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, *saved = ctx.saved_tensors
        xt, alpha = x.transpose(1, 2), 2 / ctx.temperature
        grad_x = torch.zeros_like(x)
        zero = grad.new_zeros(())  # (a Python 0.0 in ``where`` would be converted at every call)
        for it in reversed(range(ctx.iters)):
            mu, r, mass, keep, mean = saved[5 * it : 5 * it + 5]
            # mu' = where(keep, mean, mu), mean = (r @ x^T) / mass: d mean, then d r.
            grad_mean = torch.where(keep, grad, zero)
            grad_num = grad_mean / mass  # (B, K, D)
            # d r = d num @ x - (d num . mean) (the mass term), as one multiply-add.
            grad_r = torch.baddbmm(torch.linalg.vecdot(grad_num, mean)[..., None], grad_num, x, beta=-1)
            grad_x.baddbmm_(grad_num.transpose(1, 2), r)
            # r = softmax(logits), logits = (2 mu.x - |mu|^2) / T. The private op is softmax's
            # own backward, one call where the written-out form takes three.
            grad_logits = torch._softmax_backward_data(grad_r, r, 1, r.dtype)
            grad_x.baddbmm_(mu.transpose(1, 2), grad_logits, alpha=alpha)
            through = torch.baddbmm(mu * grad_logits.sum(2, keepdim=True), grad_logits, xt, beta=-alpha, alpha=alpha)
            grad = (grad - grad_mean).add_(through)
        return grad_x, grad, None, None


def farthest_point_init(x: torch.Tensor, k: int, *, fused: bool = False) -> torch.Tensor:
    """Indices (B, K) of K mutually far points of ``x`` (B, D, N); no gradient. The first is
    the point farthest from the mean, each next one the point farthest from all chosen so far.

    ``fused`` (training): distances (not squared: the same farthest points up to rounding) in
    one ``vector_norm`` call per point instead of three small ops, and the chosen point read
    with one flat ``take`` (a gather along N issues ten operator calls on the CPU)."""
    with torch.no_grad():
        b, d, n = x.shape
        if fused:
            # (B, D, 1): the flat index of x[b, d, 0]; adding a point's index n reads x[b, :, n].
            offsets = torch.arange(0, b * d * n, n, device=x.device).view(b, d, 1)
            # (B, 1, N): distance of every point to the mean, then to the nearest chosen point.
            nearest = torch.linalg.vector_norm(x - x.mean(2, keepdim=True), dim=1, keepdim=True)
            picks = []
            for j in range(k):
                picks.append(nearest.argmax(2, keepdim=True))  # (B, 1, 1)
                if j < k - 1:
                    chosen = x.take(offsets + picks[-1])  # (B, D, 1)
                    dist = torch.linalg.vector_norm(x - chosen, dim=1, keepdim=True)
                    nearest = dist if j == 0 else torch.minimum(nearest, dist)
            return torch.cat(picks, 2).view(b, k)  # (B, K)
        centre = x.mean(2, keepdim=True)  # (B, D, 1)
        picks = []
        # Sequential over K (at most 16 steps of O(B*N*D) work). The differences to a point go
        # through one buffer, of FPS_CHUNK positions at a time for a fit on many (a shared
        # legend's pooled cells: 2.3 MiB instead of 2K copies of 9 MiB); the same numbers.
        pieces = _pieces(x, FPS_CHUNK)
        diff = torch.empty_like(x) if pieces is None else x.new_empty(b, d, max(e - a for a, e in pieces))

        def distance(point: torch.Tensor) -> torch.Tensor:  # (B, N) squared distances to (B, D, 1)
            if pieces is None:
                return torch.sub(x, point, out=diff).square_().sum(1)
            out = x.new_empty(b, n)
            for a, e in pieces:
                out[:, a:e] = torch.sub(x[:, :, a:e], point, out=diff[:, :, : e - a]).square_().sum(1)
            return out

        nearest = distance(centre)  # (B, N)
        for j in range(k):
            pick = nearest.argmax(1)  # (B,)
            picks.append(pick)
            if j == k - 1:
                break
            chosen = torch.gather(x, 2, pick.view(b, 1, 1).expand(-1, x.shape[1], 1))  # (B, D, 1)
            dist = distance(chosen)
            nearest = dist if j == 0 else torch.minimum(nearest, dist)
        return torch.stack(picks, 1)  # (B, K)


def farthest_points(x: torch.Tensor, k: int, *, fused: bool = False) -> torch.Tensor:
    """The points (B, K, D) of ``farthest_point_init``: K mutually far points of x (B, D, N)."""
    idx = farthest_point_init(x, k, fused=fused)  # (B, K)
    return torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1)).transpose(1, 2)
