"""``init_from``: a research stage's run starting from the weights of a trained segmenter."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from seglib.models import load_model

__all__ = ["start_from"]


def start_from(target: nn.Module, path: str | Path) -> None:
    """Load the weights of the segmenter in ``path`` (a ``teacher.pt`` or ``student.pt``) into
    ``target``, the segmenter a run trains, e.g. to fine-tune the synthetic teacher on real
    imagery. A resumed run then replaces them with its checkpoint's."""
    source = load_model(path)
    if type(source) is not type(target):
        raise ValueError(
            f"stage_options.init_from: {path} holds a {type(source).__name__}, the run trains a {type(target).__name__}"
        )
    try:
        target.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"stage_options.init_from: {path} does not fit the configured model: {exc}") from None
