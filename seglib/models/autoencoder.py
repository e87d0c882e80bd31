"""The training-only reconstruction decoder of the student.

A tiny conv decoder reads the student's pre-projection stride-4 features and predicts the
stride-4 RGB image. It exists to keep colour and texture information in the student's
features (photometric invariance alone would throw colour away); it is saved apart
(``decoder_training_only.pt``) and never shipped with ``student.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..config import AutoencoderConfig, StudentConfig, apply_overrides
from .layers import conv_norm_act
from .student import student_shape

__all__ = ["ReconstructionDecoder"]


class ReconstructionDecoder(nn.Module):
    """Arguments:
    in_channels: width of the student's fine features.
    config: the autoencoder settings it was trained with (its target's blur, the loss's gradient
      weight); ``from_checkpoint`` sets it.

    32 channels and two 3x3 blocks: the decoder only has to read colour and coarse structure
    back out of the features, and a stronger one would do the work the features should.
    """

    def __init__(self, *, in_channels: int, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config or AutoencoderConfig()
        width = 32
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1), nn.ReLU(inplace=True)]
        layers += [conv_norm_act(width, width, norm="none") for _ in range(2)]
        layers.append(nn.Conv2d(width, 3, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, C, H/4, W/4) -> RGB prediction (B, 3, H/4, W/4) in [0, 1]."""
        return torch.sigmoid(self.net(features))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ReconstructionDecoder:
        """The decoder of ``decoder_training_only.pt`` (a student run trained with the autoencoder
        loss), with the settings it was trained with; CPU, eval mode."""
        state = load_checkpoint(path, kind="decoder")
        config = state["config"]
        student = apply_overrides(StudentConfig(), config["student"], prefix="student.")
        ae = apply_overrides(AutoencoderConfig(), config["autoencoder"], prefix="autoencoder.")
        decoder = cls(in_channels=student_shape(student)[0][2], config=ae)
        decoder.load_state_dict(state["model"])
        return decoder.eval()
