"""Distillation losses of the student, per resolution slice, and their scale-neutral merge.

For each slice s (coarse, mid, fine; only fine with ``multires`` off) the teacher's stride-4
features and cluster assignments are average-pooled to the slice's grid and compared with the
student's slice embedding z_s:

* ``feature``: 1 - cosine(z_s, teacher features);
* ``affinity``: mean squared difference of the cosine-similarity matrices of P sampled
  positions (the geometry of the embedding, not just each vector);
* ``agreement``: KL(teacher assignments || student assignments), where the student's K
  prototypes start as the means of its embeddings under the teacher's assignments (so cluster
  k means the same thing for both) and then run ``cluster_iters`` soft k-means steps;
* ``pseudo_label``: cross-entropy of those student assignments against their own sharpened,
  detached version (soft k-means pseudo labels: confident, self-consistent clusters);
* ``tv``: edge-aware total variation of the student assignments.

Slices differ in resolution and so in the size of every term. Each slice's weighted sum is
divided by its own running mean (an EMA, detached), and the slices are merged by the geometric
mean of these ratios: no slice dominates because of its scale, and the gradient of each slice
is relative to its own size. The cross-resolution ``consistency`` (KL between adjacent slices'
assignments, the coarser one upsampled) is EMA-normalised on its own and added with
``consistency_weight``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..config import DistillConfig
from ..models.head import soft_kmeans
from ..models.segmenter import head_embedding
from .teacher import edge_aware_smoothness, kl_divergence, symmetric_kl

__all__ = ["EmaNormalizer", "aligned_assignments", "affinity_loss", "DistillLoss"]

_EPS = 1e-6
AFFINITY_SAMPLES = 256  # positions per image whose similarity matrices the affinity term compares


class EmaNormalizer(nn.Module):
    """Keeps an exponential moving average of named scalars (buffers, so checkpoints carry it)."""

    def __init__(self, names: list[str], decay: float):
        super().__init__()
        self.names, self.decay = list(names), decay
        self.register_buffer("value", torch.ones(len(names)))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, values: dict[str, torch.Tensor]) -> None:
        new = torch.stack([values[n].detach().float() for n in self.names]).to(self.value.device)
        new = dist.all_reduce_mean(new)  # every rank normalises by the same numbers
        if int(self.count) == 0:
            self.value.copy_(new)
        else:
            self.value.mul_(self.decay).add_((1 - self.decay) * new)
        self.count += 1

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.value[self.names.index(name)].clamp_min(_EPS)


def aligned_assignments(
    emb: torch.Tensor, teacher_probs: torch.Tensor, *, iters: int, temperature: float
) -> torch.Tensor:
    """Student soft k-means (B, K, h, w) on emb (B, D, h, w), started from the prototypes the
    teacher's assignments (B, K, h, w) induce on the student's embedding."""
    b, d, h, w = emb.shape
    x = emb.flatten(2)  # (B, D, N)
    r = teacher_probs.flatten(2)  # (B, K, N)
    mu = torch.bmm(r, x.transpose(1, 2)) / r.sum(2, keepdim=True).clamp_min(_EPS)  # (B, K, D)
    return soft_kmeans(x, r.shape[1], iters=iters, temperature=temperature, init=mu).probs.reshape(b, -1, h, w)


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """MSE between (B, P, P) cosine-similarity matrices at flat positions ``index`` (B, P)."""
    s = F.normalize(student.flatten(2), dim=1)  # (B, E, N)
    t = F.normalize(teacher.flatten(2), dim=1)
    gather = index[:, None, :]
    s = torch.gather(s, 2, gather.expand(-1, s.shape[1], -1))  # (B, E, P)
    t = torch.gather(t, 2, gather.expand(-1, t.shape[1], -1))
    return (torch.bmm(s.transpose(1, 2), s) - torch.bmm(t.transpose(1, 2), t)).pow(2).mean()


class DistillLoss(nn.Module):
    """Per-slice distillation terms, merged scale-neutrally.

    Arguments:
      config: ``DistillConfig`` (weights, loss-normaliser decay, soft k-means iterations).
      slices: slice names, coarse to fine.
      temperature: soft k-means temperature (the head's).
      colour_weight: weight of the colour channels appended to student embeddings (the teacher's).

    The affinity term compares the similarity matrices of 256 positions sampled per image (all
    of them on a smaller grid).
    """

    def __init__(
        self,
        config: DistillConfig,
        *,
        slices: tuple[str, ...],
        temperature: float,
        colour_weight: float,
    ):
        super().__init__()
        self.config, self.slices = config, tuple(slices)
        self.temperature, self.colour_weight = temperature, colour_weight
        self.ema = EmaNormalizer([*self.slices, "consistency"], config.loss_norm_decay)

    def slice_terms(
        self,
        z: torch.Tensor,
        teacher_feat: torch.Tensor,
        teacher_probs: torch.Tensor,
        rgb: torch.Tensor,
        rng: np.random.Generator,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Unweighted terms of one slice and its student assignments (B, K, h, w)."""
        c = self.config
        h, w = z.shape[-2:]
        t_feat = F.adaptive_avg_pool2d(teacher_feat.float(), (h, w))
        t_probs = F.adaptive_avg_pool2d(teacher_probs.float(), (h, w))
        z = z.float()
        terms = {"feature": (1 - F.cosine_similarity(z, t_feat, dim=1)).mean()}
        n = h * w
        samples = min(AFFINITY_SAMPLES, n)
        index = torch.from_numpy(np.stack([rng.choice(n, samples, replace=False) for _ in range(z.shape[0])]))
        terms["affinity"] = affinity_loss(z, t_feat, index.to(z.device))
        rgb_small = F.adaptive_avg_pool2d(rgb.float(), (h, w))
        emb = head_embedding(z, rgb, colour_weight=self.colour_weight)
        probs = aligned_assignments(emb, t_probs, iters=c.cluster_iters, temperature=self.temperature)
        terms["agreement"] = kl_divergence(t_probs, probs)
        with torch.no_grad():
            sharp = probs.pow(2)
            sharp = sharp / sharp.sum(1, keepdim=True)
        terms["pseudo_label"] = -(sharp * probs.clamp_min(_EPS).log()).sum(1).mean()
        terms["tv"] = edge_aware_smoothness(probs, rgb_small)
        return terms, probs

    def forward(
        self,
        student: dict[str, torch.Tensor],
        teacher_feat: torch.Tensor,
        teacher_probs: torch.Tensor,
        rgb: torch.Tensor,
        rng: np.random.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(loss dict with ``total``, student assignments per slice).

        student: slice name -> embedding (B, E, h_s, w_s); teacher_feat (B, E, H/4, W/4);
        teacher_probs (B, K, H/4, W/4); rgb (B, 3, H, W) the image both saw.
        """
        c = self.config
        weights = {
            "feature": c.feature,
            "affinity": c.affinity,
            "agreement": c.agreement,
            "pseudo_label": c.pseudo_label,
            "tv": c.tv,
        }
        out: dict[str, torch.Tensor] = {}
        probs: dict[str, torch.Tensor] = {}
        slice_loss: dict[str, torch.Tensor] = {}
        for name in self.slices:
            terms, probs[name] = self.slice_terms(student[name], teacher_feat, teacher_probs, rgb, rng)
            slice_loss[name] = sum(weights[k] * v for k, v in terms.items())
            out.update({f"{name}/{k}": v for k, v in terms.items()})
        consistency = torch.zeros((), device=rgb.device)
        for coarser, finer in zip(self.slices[:-1], self.slices[1:], strict=True):
            up = F.interpolate(probs[coarser], size=probs[finer].shape[-2:], mode="bilinear", align_corners=False)
            consistency = consistency + symmetric_kl(up, probs[finer])
        slice_loss["consistency"] = consistency
        if self.training:
            self.ema.update(slice_loss)
        # Geometric mean of each slice's loss over its running mean: scale-neutral.
        logs = torch.stack([torch.log(slice_loss[n] / self.ema[n] + _EPS) for n in self.slices])
        merged = torch.exp(logs.mean())
        out.update({f"{n}/total": slice_loss[n] for n in self.slices})
        out["slices"] = merged
        out["consistency"] = consistency
        out["total"] = merged
        if len(self.slices) > 1 and c.consistency_weight:
            out["total"] = merged + c.consistency_weight * consistency / self.ema["consistency"]
        return out, probs
