"""Small helpers every op family shares."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references and torch paths compute in: float32, or float64 for float64 inputs
    (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def describe(value) -> str:
    """A tensor's shape, dtype and device (a non-tensor's type name), for error messages."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return f"shape {tuple(value.shape)}, {str(value.dtype).removeprefix('torch.')}, {value.device}"
