"""Activations shared by the ops: names, the integer codes the kernels take, and torch forward and
backward functions used by the references."""

from __future__ import annotations

import torch

# The kernel codes: the Triton and CUDA kernels switch on these (defined once, in kernels/shared.py).
from pefops.kernels.shared import GELU, GELU_TANH, IDENTITY, LEAKY_RELU, RELU, SILU, TANH

_CODES = {
    "identity": IDENTITY,
    "linear": IDENTITY,
    "relu": RELU,
    "gelu": GELU,
    "gelu_new": GELU_TANH,
    "gelu_tanh": GELU_TANH,
    "gelu_pytorch_tanh": GELU_TANH,
    "silu": SILU,
    "swish": SILU,
    "tanh": TANH,
    "leaky_relu": LEAKY_RELU,
    "leakyrelu": LEAKY_RELU,
}
NAMES = tuple(_CODES)


def activation_code(name: str) -> int:
    try:
        return _CODES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(NAMES)}") from None


def activation_forward(z: torch.Tensor, code: int, negative_slope: float = 0.01) -> torch.Tensor:
    if code == IDENTITY:
        return z
    if code == RELU:
        return torch.relu(z)
    if code == GELU:
        return torch.nn.functional.gelu(z)
    if code == GELU_TANH:
        return torch.nn.functional.gelu(z, approximate="tanh")
    if code == SILU:
        return torch.nn.functional.silu(z)
    if code == TANH:
        return torch.tanh(z)
    if code == LEAKY_RELU:
        return torch.nn.functional.leaky_relu(z, negative_slope)
    raise ValueError(f"unknown activation code {code}")


def activation_backward(grad: torch.Tensor, z: torch.Tensor, code: int, negative_slope: float = 0.01) -> torch.Tensor:
    """grad * act'(z) through ATen's fused backward kernels (one pass, as eager autograd does)."""
    aten = torch.ops.aten
    if code == IDENTITY:
        return grad
    if code == RELU:
        return aten.threshold_backward(grad, z, 0)
    if code == GELU:
        return aten.gelu_backward(grad, z, approximate="none")
    if code == GELU_TANH:
        return aten.gelu_backward(grad, z, approximate="tanh")
    if code == SILU:
        return aten.silu_backward(grad, z)
    if code == TANH:
        return aten.tanh_backward(grad, torch.tanh(z))
    if code == LEAKY_RELU:
        return aten.leaky_relu_backward(grad, z, negative_slope, False)
    raise ValueError(f"unknown activation code {code}")
