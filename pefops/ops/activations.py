"""Activations shared by the ops: names, the integer codes the kernels take, and torch forward and
derivative functions used by the references."""

from __future__ import annotations

import math

import torch

# Kernel codes; the Triton and CUDA kernels switch on these.
IDENTITY, RELU, GELU, GELU_TANH, SILU, TANH, LEAKY_RELU = range(7)

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


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


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


def activation_derivative(z: torch.Tensor, code: int, negative_slope: float = 0.01) -> torch.Tensor:
    """d act(z) / dz, elementwise."""
    if code == IDENTITY:
        return torch.ones_like(z)
    if code == RELU:
        return (z > 0).to(z.dtype)
    if code == GELU:
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    if code == GELU_TANH:
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if code == SILU:
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if code == TANH:
        t = torch.tanh(z)
        return 1.0 - t * t
    if code == LEAKY_RELU:
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))
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
