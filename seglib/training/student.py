"""Student stage: distil the multi-resolution student from a frozen teacher.

Each step draws K (``randomize.ks``), jitters the batch photometrically (flips included), runs
the teacher without gradient (its learned features and its cluster assignments at stride 4),
runs the student and the training-only decoder, and combines ``DistillLoss`` with the
EMA-normalised autoencoder loss.

``StudentTask`` gets the teacher as a loaded model (``seglib.training.stages.make_task`` loads
its checkpoint). ``teacher_first`` names that checkpoint and trains one first when the config
names none: with the same config for ``distill.teacher_steps`` steps into
``<checkpoint_dir>/teacher/`` (resumable like any teacher run).

Artifacts: ``student.pt`` (student weights + config: everything inference needs, no decoder)
and ``decoder_training_only.pt``; the step checkpoints hold both and resume like the teacher's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..augment import photometric
from ..checkpoint import model_checkpoint, save_atomic
from ..config import Config
from ..data.batches import sample_rngs
from ..data.source import make_source
from ..losses.distill import DistillLoss, EmaNormalizer
from ..losses.recon import reconstruction_loss, reconstruction_target
from ..models.autoencoder import ReconstructionDecoder
from ..models.student import SLICES, StudentModelConfig, StudentSegmenter
from ..models.teacher import MonolithicSegmenter
from .loop import StepOutput, train_loop
from .state import default_checkpoint_dir
from .teacher import TeacherTask

__all__ = ["DistillModule", "StudentTask", "teacher_first"]

_KNOBS, _AUGMENT, _AFFINITY = 21, 23, 29


class DistillModule(nn.Module):
    """The trainable pair: the student segmenter and (optionally) the reconstruction decoder.

    ``forward(rgb)`` returns the student's slice embeddings, its fine features and the
    decoder's stride-4 RGB prediction (when the decoder exists).
    """

    def __init__(self, student: StudentSegmenter, decoder: ReconstructionDecoder | None, *, detach_backbone: bool):
        super().__init__()
        self.student, self.decoder, self.detach_backbone = student, decoder, detach_backbone

    def forward(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.student.backbone.forward_all(rgb)
        if self.decoder is not None:
            feats = out["fine_features"].detach() if self.detach_backbone else out["fine_features"]
            out["recon"] = self.decoder(feats)
        return out


class StudentTask:
    """Trains ``DistillModule`` against a frozen teacher.

    Arguments:
      cfg: the full config (stage "student").
      device: where both models live.
      teacher: the trained teacher to distil from (``MonolithicSegmenter.from_checkpoint``);
        moved to ``device`` and frozen here.
    """

    kind = "student"

    def __init__(self, cfg: Config, device: torch.device, teacher: MonolithicSegmenter):
        self.cfg, self.device = cfg, device
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        # The student clusters like the teacher: same head, lanes and colour channels.
        student_cfg = copy.deepcopy(cfg)
        student_cfg.model = teacher.config
        self.student_config = StudentModelConfig.from_config(student_cfg)
        student = StudentSegmenter(self.student_config)
        dims = student.backbone.dims
        ae = cfg.autoencoder
        decoder = ReconstructionDecoder(in_channels=dims[2]) if ae.enabled else None
        self.model = DistillModule(student, decoder, detach_backbone=ae.detach_backbone).to(device)
        slices = SLICES if cfg.student.multires else ("fine",)
        self.loss = DistillLoss(
            cfg.distill,
            slices=slices,
            temperature=teacher.config.head.temperature,
            colour_weight=teacher.colour_weight,
        ).to(device)
        self.ae_ema = EmaNormalizer(["recon"], ae.loss_norm_decay).to(device)
        self._teacher_config = teacher.config

    @property
    def inference_model(self) -> StudentSegmenter:
        return self.model.student

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], index: int) -> StepOutput:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.train.seed, _KNOBS, index])
        k = int(rng.choice(cfg.randomize.ks))
        rgb = batch["rgb"].to(self.device, non_blocking=True)  # (B, 3, S, S)
        rngs = sample_rngs(cfg.train.seed, batch["index"].tolist(), _AUGMENT)
        if cfg.augment.flip:
            flips = torch.tensor([r.random() < 0.5 for r in rngs], device=rgb.device)
            rgb = torch.where(flips[:, None, None, None], rgb.flip(-1), rgb)
        view = photometric(rgb, rngs, cfg.augment)
        with torch.no_grad():
            t_out = self.teacher(view, k, full_resolution=False)
        out = model(view)
        # The target is what the teacher's head clustered: its denoised learned channels.
        target = t_out["clustered"][:, : t_out["features"].shape[1]]
        terms, probs = self.loss(
            out,
            target,
            t_out["probs_coarse"],
            view,
            np.random.default_rng([cfg.train.seed, _AFFINITY, index]),
        )
        if "recon" in out:
            ae = cfg.autoencoder
            target = reconstruction_target(view, sigma=ae.blur_sigma)
            recon = reconstruction_loss(out["recon"].float(), target, ae.grad_weight)
            if self.loss.training:
                self.ae_ema.update({"recon": recon})
            terms["recon"] = recon
            terms["total"] = terms["total"] + ae.lambda_recon * recon / self.ae_ema["recon"]
        b = rgb.shape[0]
        return StepOutput(
            terms=terms,
            n_images=b,
            rgb=view,
            probs=probs["fine"].detach(),  # stride 4; TensorBoard upsamples
            scalars={"diag/k": float(k)},
            extra_images={"teacher/probs": t_out["probs_coarse"]},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "ae_ema": self.ae_ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.loss.load_state_dict(state["loss"])
            self.ae_ema.load_state_dict(state["ae_ema"])

    def export(self, directory: Path) -> None:
        """``student.pt`` (what inference needs) and ``decoder_training_only.pt``."""
        cfg = copy.deepcopy(self.cfg)
        cfg.model = self._teacher_config
        directory = Path(directory)
        save_atomic(
            model_checkpoint("student", cfg.to_dict(), self.model.student.state_dict()), directory / "student.pt"
        )
        if self.model.decoder is not None:
            decoder = model_checkpoint("decoder", cfg.to_dict(), self.model.decoder.state_dict())
            save_atomic(decoder, directory / "decoder_training_only.pt")


def teacher_first(cfg: Config, device: torch.device) -> Path:
    """The teacher checkpoint a student run distils from: ``distill.teacher_checkpoint`` (it must
    exist), else ``<checkpoint_dir>/teacher/teacher.pt``, trained first when it is absent."""
    if cfg.distill.teacher_checkpoint:
        path = Path(cfg.distill.teacher_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher checkpoint not found: {path}; train one with `python -m seglib.train "
                "--stage teacher` or leave --teacher-checkpoint empty to train one first"
            )
        return path
    teacher_dir = default_checkpoint_dir(cfg) / "teacher"
    if (teacher_dir / "teacher.pt").is_file():
        return teacher_dir / "teacher.pt"
    tcfg = copy.deepcopy(cfg)
    tcfg.stage, tcfg.train.steps = "teacher", cfg.distill.teacher_steps
    tcfg.train.checkpoint_dir = str(teacher_dir)
    if dist.rank() == 0:
        print(f"no --teacher-checkpoint: training a teacher for {tcfg.train.steps} steps into {teacher_dir}")
    torch.manual_seed(cfg.train.seed)
    task = TeacherTask(tcfg, device)
    source = make_source(tcfg, rank=dist.rank(), world=dist.world_size())
    train_loop(task, tcfg, source, config=tcfg.to_dict(), device=device, resume=True)
    dist.barrier()
    return teacher_dir / "teacher.pt"
