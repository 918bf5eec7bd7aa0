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


_CONSTANTS: dict = {}
_CONSTANTS_LIMIT = 256


def constant(value: float, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A read-only tensor filled with `value`, made once per (value, shape, dtype, device) and then
    reused: the stand-in for an absent bias, LayerNorm weight or a float scaling that a kernel reads
    as a tensor (one fill launch the first time, none after). Never write into it."""
    key = (float(value), tuple(shape), dtype, torch.device(device))
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        if len(_CONSTANTS) >= _CONSTANTS_LIMIT:
            _CONSTANTS.clear()
        tensor = _CONSTANTS[key] = torch.full(tuple(shape), float(value), dtype=dtype, device=device)
    return tensor
