"""AdamW over a few flat buffers, with the non-finite step skipped on the device.

Per-tensor code issues several operator calls for every parameter tensor: gradient clipping
measures each one, and even the fused AdamW loops over tensors on the CPU to advance their step
counters. ``FlatAdamW`` makes the parameters views into flat tensors that the optimizer owns, so
gathering the gradients, clipping and the update are a handful of calls whatever the parameter
count. The reference is ``torch.optim.AdamW`` over the same parameters: the same update,
exactly (``tests/test_kernels.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["FlatAdamW"]


class FlatAdamW(torch.optim.AdamW):
    """AdamW over a few contiguous buffers instead of a few dozen parameter tensors.

    The update is per-parameter AdamW's, exactly: a buffer holds parameters that always get
    their gradients together, so that one step count serves them all. They are grouped by
    top-level submodule (``encoder.*``, ``refiner.*``), and at the first step each group is
    split into the parameters that got a gradient and those that did not (a submodule the
    stage never uses, such as the student's refiner in distillation). A buffer without
    gradients in a step (a refinement lane that sat the step out) is skipped, as a parameter
    without a gradient is. A buffer used only in part later gets zeros for the missing
    gradients.

    ``clip_grad_norm_`` replaces ``torch.nn.utils.clip_grad_norm_`` (it gathers the gradients
    first; the parameters' own ``.grad`` are left unclipped). Moving the model to another
    device or dtype afterwards detaches it from the buffers: build the optimizer once the
    model is in place.
    """

    def __init__(
        self, named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float, fused: bool
    ):
        named = [(name, p) for name, p in named_params if p.requires_grad]  # model order
        self.trained = [p for _, p in named]
        groups: dict[tuple, list[int]] = {}
        for i, (name, p) in enumerate(named):
            groups.setdefault((name.split(".")[0], p.device, p.dtype), []).append(i)
        self.settled = False  # whether the groups were split by the first step's gradients
        super().__init__(self._lay_out(list(groups.values())), lr=lr, weight_decay=weight_decay, fused=fused)

    def _lay_out(self, layout: list[list[int]]) -> list[nn.Parameter]:
        """One flat parameter per list of ``self.trained`` indices; the members become views."""
        self.layout, self.members, flats = layout, [[self.trained[i] for i in idx] for idx in layout], []
        for members in self.members:
            flat = torch.cat([p.detach().reshape(-1) for p in members])
            offset = 0
            for p in members:
                p.data = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            flats.append(nn.Parameter(flat))  # shares the storage the members now view
        return flats

    def _relay_out(self, layout: list[list[int]]) -> None:
        if layout != self.layout:
            assert not self.state, "the buffers are laid out before the first update"
            self.param_groups[0]["params"] = self._lay_out(layout)
        self.settled = True

    def gather_grads(self) -> None:
        """Copy the parameters' gradients into the flat buffers' ``.grad`` (None for a buffer
        whose members have none)."""
        if not self.settled:  # split each group into the members with and without a gradient
            has = [p.grad is not None for p in self.trained]
            split = [[i for i in idx if has[i] == flag] for idx in self.layout for flag in (True, False)]
            self._relay_out([idx for idx in split if idx])
        for flat, members in zip(self.param_groups[0]["params"], self.members, strict=True):
            grads = [p.grad for p in members]
            if all(g is None for g in grads):
                flat.grad = None
            else:
                flat.grad = torch.cat(
                    [
                        torch.zeros_like(p).view(-1) if g is None else g.view(-1)
                        for p, g in zip(members, grads, strict=True)
                    ]
                )

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Gather the gradients, scale them to a total 2-norm of at most ``max_norm`` (``inf``:
        measure only) and return the total norm before clipping (a tensor; no host read)."""
        self.gather_grads()
        return torch.nn.utils.clip_grad_norm_(self.param_groups[0]["params"], max_norm)  # reads their .grad

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        if all(flat.grad is None for flat in self.param_groups[0]["params"]):
            self.gather_grads()  # clip_grad_norm_ was not called
        return super().step(closure)

    def step_unless(self, bad: torch.Tensor) -> torch.Tensor | bool:
        """Update unless ``bad`` (a () bool tensor: a non-finite loss or gradient). The fused
        kernel skips on the device: with ``found_inf`` set it leaves weights, moments and step
        count alone, as it does for a gradient scaler, and ``bad`` comes back unread (the step
        never waits for the device). Without the fused kernel the decision is read on the host
        and the return value is whether the step was skipped."""
        if self.defaults.get("fused"):
            self.found_inf = bad.float()
            self.step()
            return bad
        if bool(bad):
            self.zero_grad(set_to_none=True)  # nothing of this step reaches the weights
            return True
        self.step()
        return False

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        super().zero_grad(set_to_none)
        for p in self.trained:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "flat_layout": self.layout if self.settled else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the buffers' layout too."""
        state_dict = dict(state_dict)
        layout = state_dict.pop("flat_layout")
        if layout is not None:
            self._relay_out(layout)
        super().load_state_dict(state_dict)
