"""A weighted sum of scalar loss terms as one dot product with a cached weight vector.

The reference is ``sum(weights[name] * terms[name])``: each Python weight in a product would be
converted to a tensor at every call (four operator calls, twice with the backward pass), and a
weight vector made in the step would be a host-to-device copy. The vector is made once per set
of weights, device and dtype, and kept for the process.
"""

from __future__ import annotations

import torch

__all__ = ["weighted_sum"]

_WEIGHT_VECTORS: dict[tuple, torch.Tensor] = {}  # (weights, device, dtype) -> (T,)


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum of ``weights[name] * terms[name]`` over the (scalar) terms, as one dot product."""
    values = torch.stack(list(terms.values()))  # (T,)
    key = (tuple(float(weights[name]) for name in terms), values.device, values.dtype)
    if key not in _WEIGHT_VECTORS:
        _WEIGHT_VECTORS[key] = torch.tensor(key[0], dtype=values.dtype, device=values.device)
    return torch.dot(values, _WEIGHT_VECTORS[key])
