"""``WeightAverage``: an exponential moving average of a model's weights, what a run exports
when ``train.weight_average_decay`` > 0."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """Exponential moving average of a model's floating-point parameters and buffers.

    ``update()`` after every optimizer step; the effective decay ramps up as
    min(decay, (1 + n) / (10 + n)) so the average is not dominated by the initial weights.
    Integer buffers (BatchNorm's batch counter) are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay, self.updates = model, float(decay), 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, skip: torch.Tensor | bool = False) -> None:
        """One averaging step, after an optimizer step; ``skip`` (what ``FlatAdamW.step_unless``
        returns: a bool, or a bool tensor read on the device) leaves the average and its step
        count as they are, for an optimizer step that was skipped."""
        if skip is True:
            return
        if skip is False:
            self.updates += 1
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            for key, value in self.model.state_dict().items():
                if value.is_floating_point():
                    self.state[key].lerp_(value.detach(), 1 - decay)
                else:
                    self.state[key].copy_(value)
            return
        keep = (~skip).float()
        if not isinstance(self.updates, torch.Tensor):
            self.updates = torch.tensor(float(self.updates), device=skip.device)
        self.updates += keep
        n = self.updates
        weight = (1 - torch.clamp((1 + n) / (10 + n), max=self.decay)) * keep  # 0 when skipped
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                self.state[key].lerp_(value.detach(), weight.to(value.dtype))
            else:
                self.state[key].copy_(torch.where(skip, self.state[key], value))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block (once there was an update),
        its own ones again after it."""
        if not self.updates:
            yield
            return
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.state)
        try:
            yield
        finally:
            self.model.load_state_dict(backup)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "updates": int(self.updates)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state = {k: v.clone() for k, v in saved["state"].items()}
        self.updates = int(saved["updates"])
