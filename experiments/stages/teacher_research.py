"""The research stage ``teacher_research``: the teacher with what was tried on top of it
(registered as ``stage: teacher_research``; settings ``TeacherResearchOptions`` as
``stage_options``):

* ``region`` > 0: a supervised contrast of the learned features by the synthetic tiles' label
  maps (procedural supervision: no real label is read);
* ``init_from``: start from a trained teacher, e.g. to fine-tune the synthetic teacher on real
  tiles; ``downsamples`` narrows the downsample knob the teacher is trained for.

Neither beat the shipped recipe under the leave-one-tile-out protocol (the lab log,
"Procedural supervision" and "Leave-one-tile-out"): kept here so that the study can be
reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seglib.config import Config, ConfigError
from seglib.training.loop import StepOutput
from seglib.training.stages import Stage, register_stage
from seglib.training.teacher import DOWNSAMPLES, Knobs, TeacherTask

from .init_from import start_from

__all__ = ["TeacherResearchOptions", "TeacherResearchTask", "region_contrast"]


@dataclass
class TeacherResearchOptions:
    """The settings of stage ``teacher_research`` (``stage_options``)."""

    region: float = 0.0  # weight of the contrast of the learned features by synthetic label maps (0: off)
    region_temperature: float = 0.1  # its softmax temperature over -squared distances
    init_from: str = ""  # a teacher.pt whose weights start the run; "": random
    downsamples: tuple[int, ...] = DOWNSAMPLES  # the model.downsample values drawn per batch


def region_contrast(emb: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrast (Khosla et al. 2020) of the positions of each image by its label map.

    ``emb`` (B, D, h, w), e.g. the unit-normalised learned features; ``labels`` (B, H, W)
    integer, taken at the nearest position of the h x w grid. Within each image every position
    is an anchor whose positives are the other positions of its class, scored by -squared
    distance / temperature: the loss is the mean over anchors of -mean log softmax of the
    positives (anchors alone in their class are left out; 0 if there are none). Images are kept
    apart: a class id means nothing across tiles. No value is read back from the device.
    """
    b, d, h, w = emb.shape
    lab = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest").reshape(b, h * w)  # (B, N)
    x = emb.float().reshape(b, d, h * w).transpose(1, 2)  # (B, N, D)
    logits = -torch.cdist(x, x).square() / temperature  # (B, N, N)
    eye = torch.eye(h * w, dtype=torch.bool, device=emb.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=2, keepdim=True)  # (B, N, N)
    positive = (lab[:, :, None] == lab[:, None, :]) & ~eye  # (B, N, N)
    count = positive.sum(dim=2)  # (B, N)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=2) / count.clamp(min=1)  # (B, N)
    has = (count > 0).float()
    return (per_anchor * has).sum() / has.sum().clamp(min=1.0)


class TeacherResearchTask(TeacherTask):
    """``TeacherTask`` with the options of ``TeacherResearchOptions``."""

    def __init__(self, cfg: Config, device: torch.device, options: TeacherResearchOptions):
        if options.region and not cfg.data.synthetic:
            raise ConfigError(
                "stage_options.region needs the synthetic tiles' label maps but the run reads a folder; "
                "set it to 0 or train with --synthetic"
            )
        if bad := [d for d in options.downsamples if d not in (1, 2)]:
            raise ConfigError(f"stage_options.downsamples take 1 or 2, got {bad}")
        super().__init__(cfg, device)
        self.options, self.downsamples, self._labels = options, tuple(options.downsamples), None
        if options.init_from:
            start_from(self.model, options.init_from)

    def step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], index: int, knobs: Knobs | None = None
    ) -> StepOutput:
        # View A has the tile's geometry, so the tile's label map is A's.
        self._labels = batch["labels"] if self.options.region else None
        return super().step(model, batch, index, knobs)

    def losses(self, model, views, transform, knobs):  # noqa: D102
        out, terms = super().losses(model, views, transform, knobs)
        if self._labels is not None:
            b = views.shape[0] // 2
            labels = self._labels.to(self.device, non_blocking=True)
            # On the unit-normalised learned features: the colour channels the head appends are
            # not the network's to move, and within-class colour spread would swamp the term.
            unit = F.normalize(out["features"][:b].float(), dim=1)
            terms["region"] = region_contrast(unit, labels, self.options.region_temperature)
            terms["total"] = terms["total"] + self.options.region * terms["region"]
        return out, terms


register_stage(
    Stage(
        "teacher_research",
        lambda cfg, device, options: TeacherResearchTask(cfg, device, options),
        options=TeacherResearchOptions,
        about="research: the teacher with a label-map contrast (region) or started from a teacher (init_from)",
    )
)
