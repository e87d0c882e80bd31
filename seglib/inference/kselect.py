"""Choosing K without labels: label-free criteria over the embeddings the head clusters.

    k, scores = choose_k(model, [source], ks=range(2, 9))   # what --k auto / k="auto" runs

For each K in a range, the head's soft k-means is fitted on the same window sample a fit uses
(``seglib.inference.legend``), and label-free numbers are computed from that fit:

* ``silhouette``: mean simplified silhouette ``(b - a) / max(a, b)``, ``a`` the distance of a
  position to its cluster's centroid, ``b`` to the nearest other centroid (highest wins);
* ``calinski_harabasz`` (highest wins) and ``davies_bouldin`` (lowest wins) on hard labels;
* ``elbow``: the smallest K after which one more cluster removes less than ``1 - theta`` of
  the within-cluster squared distance (``W(K+1) / W(K) >= theta``);
* ``jump`` (Sugar & James 2003): the K with the largest jump of ``W(K) ** -theta``;
* ``gap`` (Tibshirani, Walther & Hastie 2001): the smallest K whose gap to uniform reference data
  (in the data's principal axes) is within one standard error of the next K's;
* ``flip_agreement``: the largest K whose clusters agree (one-to-one matched) at least ``theta``
  with the clusters fitted on the horizontally flipped windows, flipped back (notebook 06's
  two-view proxy);
* ``min_share`` / ``utilization``: the largest K whose smallest cluster holds at least
  ``theta`` of the positions / whose cluster-size entropy over log K is at least ``theta``;
* ``boundary_density``: the largest K whose label maps change between neighbouring cells at
  most ``theta`` of the time;
* ``occupied``: fitted at the largest K of the range, the number of clusters holding at least
  ``theta`` of the positions (clusters the data does not need stay small, more so with the
  head's size prior);
* ``effective``: ``theta`` times the effective number of clusters ``exp(entropy of the shares)``
  at the largest K, rounded.

Every statistic counts clusters whose prototypes coincide (closer than ``COINCIDENT`` times the
data's RMS spread) as one. Asked for more clusters than the data has distinct points (flat
colours), the head leaves several prototypes on one point; which of them a position's argmax
picks is then decided by rounding, so the shares, and the rules read from them, changed with the
CPU's vector kernels. On the 44 dev images (bundled student, K = 2..8) the closest two prototypes
of a fit are 0.25 of the RMS spread apart or more; coincident ones about 1e-6.

The study that scores every criterion and threshold against the number of ground-truth classes
present and picks the shipped rule inside leave-one-tile-out folds is an experiment
(``python -m experiments.k_auto``); docs/inference.md ("GIS workflows") has the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch

from ..config import K_MAX, K_MIN
from .legend import MAX_POSITIONS, Legend, fit_embeddings, legend_from_fit, sample_embeddings
from .predictor import model_stride
from .windows import Tiling

__all__ = [
    "DEFAULT_RANGE",
    "AUTO_RULE",
    "RULES",
    "check_k_range",
    "k_statistics",
    "pick_k",
    "choose_k",
    "fit_sources_auto",
    "rule_name",
    "label_agreement",
]

log = logging.getLogger("seglib.inference.kselect")

DEFAULT_RANGE = (2, 8)  # --k auto searches K in this range unless told otherwise
COINCIDENT = 1e-3  # prototypes closer than this times the data's RMS spread are one cluster
STAT_POSITIONS = 1 << 15  # positions the silhouette and the other statistics are computed on
GAP_POSITIONS = 1 << 13  # positions of the gap statistic's data and reference sets
GAP_REFERENCES = 5

# criterion -> thresholds tried by the study (None: the criterion has no threshold)
RULES: dict[str, tuple[float | None, ...]] = {
    "silhouette": (None,),
    "calinski_harabasz": (None,),
    "davies_bouldin": (None,),
    "gap": (None,),
    "elbow": (0.70, 0.75, 0.80, 0.85, 0.90, 0.95),
    "jump": (0.25, 0.5, 1.0, 2.0, 4.0),
    "flip_agreement": (0.80, 0.85, 0.90, 0.95, 0.98),
    "min_share": (0.005, 0.01, 0.02, 0.05, 0.10),
    "utilization": (0.6, 0.7, 0.8, 0.9),
    "boundary_density": (0.05, 0.10, 0.15, 0.20, 0.30),
    "occupied": (0.01, 0.02, 0.05, 0.10),
    "effective": (0.8, 1.0, 1.2, 1.5),
}

# The rule --k auto uses: picked inside the leave-one-tile-out folds of the dev split
# (docs/inference.md, "GIS workflows"): 4 of the 5 folds chose it (experiments/k_auto).
AUTO_RULE: tuple[str, float | None] = ("effective", 0.8)


def check_k_range(ks: object) -> tuple[int, int]:
    """``(lo, hi)`` from ``(lo, hi)`` or ``"lo..hi"`` / ``"lo-hi"``; ``ValueError`` naming the fix."""
    text = ks
    if isinstance(ks, str):
        for sep in ("..", "-", ":", ","):
            if sep in ks:
                ks = ks.split(sep, 1)
                break
    try:
        lo, hi = (int(v) for v in ks)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"K range must be two integers like 2..8, got {text!r}") from None
    if not (K_MIN <= lo < hi <= K_MAX):
        raise ValueError(
            f"K range for auto must satisfy {K_MIN} <= lo < hi <= {K_MAX}, got {lo}..{hi}; e.g. "
            f"{DEFAULT_RANGE[0]}..{DEFAULT_RANGE[1]}"
        )
    return lo, hi


# ----------------------------------------------------------------------------- statistics


def _subsample(n: int, size: int, seed: int) -> torch.Tensor | None:
    if n <= size:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def _hard_stats(x: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, float]:
    """Distortion, silhouette, Calinski-Harabasz, Davies-Bouldin, shares of hard labels.
    ``x`` (N, D) float64, ``labels`` (N,)."""
    n = x.shape[0]
    counts = torch.bincount(labels, minlength=k).double()
    used = counts > 0
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    centroids = sums[used] / counts[used, None]  # (K', D)
    remap = torch.cumsum(used.long(), 0) - 1
    own = remap[labels]
    d = torch.cdist(x, centroids)  # (N, K')
    a = d.gather(1, own[:, None])[:, 0]
    within = a.square()
    mean = x.mean(0)
    between = (counts[used] * (centroids - mean).square().sum(1)).sum()
    kk = int(used.sum())
    out = {"distortion": float(within.mean())}
    if kk > 1:
        b = d.scatter(1, own[:, None], float("inf")).min(1).values
        out["silhouette"] = float(((b - a) / torch.maximum(a, b).clamp_min(1e-12)).mean())
        out["calinski_harabasz"] = float((between / (kk - 1)) / (within.sum() / max(n - kk, 1)).clamp_min(1e-12))
        scatter = torch.zeros(kk, dtype=x.dtype).index_add_(0, own, a) / counts[used]
        sep = torch.cdist(centroids, centroids).fill_diagonal_(float("inf"))
        out["davies_bouldin"] = float(((scatter[:, None] + scatter[None]) / sep).max(1).values.mean())
    else:
        out.update(silhouette=-1.0, calinski_harabasz=0.0, davies_bouldin=float("inf"))
    shares = counts / n
    nz = shares[shares > 0]
    out["shares"] = sorted(shares.tolist(), reverse=True)
    out["min_share"] = float(shares.min())
    out["utilization"] = float(-(nz * nz.log()).sum() / np.log(k))
    return out


def label_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of positions with the same label once the ids of ``b`` are matched one-to-one to those
    of ``a`` (Hungarian on the joint counts); two label arrays of one shape with ids 0..k-1."""
    from scipy.optimize import linear_sum_assignment

    matrix = np.bincount(a.ravel().astype(np.int64) * k + b.ravel(), minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return float(matrix[rows, cols].sum() / max(matrix.sum(), 1))


def _boundary_density(labels: np.ndarray, shapes: Sequence[tuple[int, int]]) -> float:
    changes = pairs = 0
    start = 0
    for h, w in shapes:
        grid = labels[start : start + h * w].reshape(h, w)
        start += h * w
        changes += int((grid[:, 1:] != grid[:, :-1]).sum() + (grid[1:] != grid[:-1]).sum())
        pairs += h * (w - 1) + (h - 1) * w
    return changes / max(pairs, 1)


def _distinct_labels(fit, scale: float) -> torch.Tensor:
    """Hard labels (N,) of a head fit, each cluster whose prototype coincides with a lower-numbered
    one's (within ``COINCIDENT * scale``) relabelled to that one: one point, one cluster."""
    p = fit.prototypes[0].double().cpu()  # (K, D)
    near = torch.cdist(p, p) <= COINCIDENT * scale  # (K, K), reflexive
    first = near.int().argmax(0)  # (K,): the lowest-numbered prototype coinciding with each
    return first[fit.probs[0].argmax(0).cpu()]


def _log_w(x: torch.Tensor, head, k: int) -> float:
    """log of the mean within-cluster squared distance of the head's fit on points x (N, D)."""
    out = fit_embeddings(head, [x.T[None, :, None, :].float()], k)
    labels = out.probs[0].argmax(0)
    return float(np.log(max(_hard_stats(x.double(), labels, k)["distortion"], 1e-12)))


@torch.no_grad()
def k_statistics(
    head: torch.nn.Module,
    embs: Sequence[torch.Tensor],
    ks: Sequence[int],
    *,
    flipped: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    max_positions: int | None = None,
) -> dict[int, dict]:
    """Per K: the head's fit on ``embs`` (denoised (1, D, h, w) embeddings) and its label-free
    statistics; ``flipped`` (the same windows' flipped-view embeddings, aligned) adds
    ``flip_agreement``. Returns ``{k: {"fit": HeadOutput, <statistic>: value}}``."""
    shapes = [tuple(e.shape[-2:]) for e in embs]
    x_all = torch.cat([e.flatten(2) for e in embs], 2)[0].T.double().cpu()  # (N, D)
    pick = _subsample(x_all.shape[0], STAT_POSITIONS, seed)
    x = x_all if pick is None else x_all[pick]
    scale = float((x - x.mean(0)).square().sum(1).mean().sqrt())  # the data's RMS spread
    # Gap statistic reference: uniform in the box of the data's principal axes (Tibshirani's
    # method b), GAP_REFERENCES sets, each clustered by the head like the data.
    gpick = _subsample(x_all.shape[0], GAP_POSITIONS, seed + 1)
    xg = x_all if gpick is None else x_all[gpick]
    centre = xg.mean(0)
    _, _, vt = torch.linalg.svd(xg - centre, full_matrices=False)
    proj = (xg - centre) @ vt.T
    lo, hi = proj.min(0).values, proj.max(0).values
    gen = torch.Generator().manual_seed(seed + 2)
    refs = [
        (lo + (hi - lo) * torch.rand(xg.shape[0], xg.shape[1], generator=gen, dtype=torch.float64)) @ vt + centre
        for _ in range(GAP_REFERENCES)
    ]
    out: dict[int, dict] = {}
    k_list = sorted(set(ks))
    for k in k_list:
        fit = fit_embeddings(head, embs, k, max_positions=max_positions, seed=seed)
        labels_all = _distinct_labels(fit, scale)
        labels = labels_all if pick is None else labels_all[pick]
        row: dict = {"fit": fit, **_hard_stats(x, labels, k)}
        row["boundary_density"] = _boundary_density(labels_all.numpy(), shapes)
        if flipped is not None:
            other = _distinct_labels(fit_embeddings(head, flipped, k, max_positions=max_positions, seed=seed), scale)
            row["flip_agreement"] = label_agreement(labels_all.numpy(), other.numpy(), k)
        ref_logs = np.array([_log_w(r, head, k) for r in refs])
        row["gap"] = float(ref_logs.mean() - _log_w(xg, head, k))
        row["gap_sd"] = float(ref_logs.std() * np.sqrt(1 + 1 / GAP_REFERENCES))
        out[k] = row
    # W(K - 1) for the jump of the smallest K (K = 1: the data's variance).
    k0 = k_list[0] - 1
    if k0 == 1:
        below = float((x - x.mean(0)).square().sum(1).mean())
    else:
        labels = _distinct_labels(fit_embeddings(head, embs, k0, max_positions=max_positions, seed=seed), scale)
        below = _hard_stats(x, labels if pick is None else labels[pick], k0)["distortion"]
    out[k_list[0]]["distortion_below"] = below
    return out


def pick_k(stats: dict[int, dict], rule: str, theta: float | None = None) -> int:
    """The K a criterion picks from ``k_statistics`` output (see the module docstring)."""
    ks = sorted(stats)
    get = lambda key: np.array([stats[k][key] for k in ks], dtype=np.float64)  # noqa: E731
    if rule in ("silhouette", "calinski_harabasz"):
        return ks[int(np.argmax(get(rule)))]
    if rule == "davies_bouldin":
        return ks[int(np.argmin(get(rule)))]
    if rule == "gap":
        gap, sd = get("gap"), get("gap_sd")
        for i in range(len(ks) - 1):
            if gap[i] >= gap[i + 1] - sd[i + 1]:
                return ks[i]
        return ks[-1]
    if theta is None:
        raise ValueError(f"rule {rule!r} needs a threshold")
    if rule == "elbow":
        w = get("distortion")
        for i in range(len(ks) - 1):
            if (w[i + 1] / w[i] if w[i] > 1e-12 else 1.0) >= theta:  # nothing left to explain: stop
                return ks[i]
        return ks[-1]
    if rule == "jump":
        w = get("distortion")
        below = stats[ks[0]].get("distortion_below")
        prev = np.concatenate([[below if below is not None else np.nan], w[:-1]])
        jumps = w**-theta - np.where(np.isfinite(prev), prev**-theta, 0.0)
        return ks[int(np.nanargmax(jumps))]
    if rule in ("flip_agreement", "min_share", "utilization"):
        ok = [k for k, v in zip(ks, get(rule), strict=True) if v >= theta]
        return max(ok) if ok else ks[0]
    if rule in ("occupied", "effective"):
        shares = np.asarray(stats[ks[-1]]["shares"], dtype=np.float64)
        if rule == "occupied":
            k = int((shares >= theta).sum())
        else:
            nz = shares[shares > 0]
            k = round(theta * float(np.exp(-(nz * np.log(nz)).sum())))
        return min(max(k, ks[0]), ks[-1])
    if rule == "boundary_density":
        ok = [k for k, v in zip(ks, get(rule), strict=True) if v <= theta]
        return max(ok) if ok else ks[0]
    raise ValueError(f"unknown K rule {rule!r}; choose one of {', '.join(RULES)}")


def _needs_flip(rule: str) -> bool:
    return rule == "flip_agreement"


def _sampled_statistics(
    model: torch.nn.Module,
    sources: Sequence,
    tiling: Tiling,
    k_range: tuple[int, int],
    rule: tuple[str, float | None],
    max_positions: int | None,
    skip_unreadable: bool = False,
) -> tuple[list[torch.Tensor], dict, dict[int, dict]]:
    """(embeddings of the fit sample, what it was drawn from, the statistics per K of ``k_range``),
    with the flipped windows' embeddings too when ``rule`` needs them."""
    lo, hi = check_k_range(k_range)
    embs, info = sample_embeddings(model, sources, tiling=tiling, skip_unreadable=skip_unreadable)
    flipped = None
    if _needs_flip(rule[0]):
        flipped = sample_embeddings(model, sources, tiling=tiling, flip=True, skip_unreadable=skip_unreadable)[0]
    stats = k_statistics(
        model.head, embs, range(lo, hi + 1), flipped=flipped, seed=tiling.seed, max_positions=max_positions
    )
    return embs, info, stats


@torch.no_grad()
def choose_k(
    model: torch.nn.Module,
    sources: Sequence,
    *,
    tiling: Tiling,
    k_range: tuple[int, int] = DEFAULT_RANGE,
    rule: tuple[str, float | None] = AUTO_RULE,
    max_positions: int | None = None,
) -> tuple[int, dict[int, dict]]:
    """The K ``rule`` picks in ``k_range`` on the fit sample of ``sources`` (one source: its own
    K; several: one K for the shared clusters), and the statistics per K (each with its fit)."""
    stats = _sampled_statistics(model, sources, tiling, k_range, rule, max_positions)[2]
    return pick_k(stats, *rule), stats


@torch.no_grad()
def fit_sources_auto(
    model: torch.nn.Module,
    sources: Sequence,
    *,
    tiling: Tiling,
    k_range: tuple[int, int] = DEFAULT_RANGE,
    rule: tuple[str, float | None] = AUTO_RULE,
    max_positions: int = MAX_POSITIONS,
    skip_unreadable: bool = False,
) -> Legend:
    """``seglib.inference.legend.fit_sources`` with K picked by ``rule`` in ``k_range`` on the same
    sample (``choose_k``); the clusters are that K's fit, and ``meta["k_auto"]`` records the
    rule, the range and each K's statistic."""
    lo, hi = check_k_range(k_range)
    tiling = tiling.checked(model_stride(model))
    embs, info, stats = _sampled_statistics(model, sources, tiling, k_range, rule, max_positions, skip_unreadable)
    k = pick_k(stats, *rule)
    key = "shares" if rule[0] in ("occupied", "effective") else rule[0]
    auto = {"rule": rule_name(rule), "range": [lo, hi], "k": k, key: stats[hi if key == "shares" else k].get(key)}
    meta = {"k_auto": auto, **info, **asdict(tiling)}
    return legend_from_fit(model, embs, stats[k]["fit"], max_positions=max_positions, meta=meta)


def rule_name(rule: tuple[str, float | None]) -> str:
    """``"effective@0.8"`` for ``("effective", 0.8)``, the criterion alone without a threshold."""
    return rule[0] if rule[1] is None else f"{rule[0]}@{rule[1]:g}"
