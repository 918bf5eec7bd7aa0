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


def check_index_tensor(index, name: str, expected: str) -> None:
    """ValueError unless `index` is an integer tensor: float, complex and bool tensors (and non-tensors)
    are refused, never truncated or cast. `expected` says what was wanted, e.g. "[batch] (int64)"."""
    if (not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex()
            or index.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor {expected}; got {describe(index)} "
                         "(float and bool indices are refused, not truncated: pass int64 indices)")
