"""Small helpers every op family shares."""

from __future__ import annotations

import functools
import math

import torch


# the float dtypes the kernels take (the torch references also take float64, for gradcheck)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references and torch paths compute in: float32, or float64 for float64 inputs
    (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_rows(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """tensor [..., width] as [rows, width], rows the product of the leading sizes: unlike
    reshape(-1, width) also when width (or a leading size) is 0."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), width)


def describe(value) -> str:
    """A tensor's shape, dtype and device (a non-tensor's type name), for error messages."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return f"shape {tuple(value.shape)}, {str(value.dtype).removeprefix('torch.')}, {value.device}"


def check_float_dtype(name: str, dtype: torch.dtype) -> None:
    """ValueError unless `dtype` is one of FLOAT_DTYPES or float64 (which the torch references take)."""
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"{name} must be float32, float16 or bfloat16 (float64 for gradcheck); got {dtype}")


def check_like(name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """ValueError unless `tensor` has `reference`'s dtype and device."""
    if tensor.dtype != reference.dtype:
        raise ValueError(f"{name} must have {reference_name}'s dtype {reference.dtype}; got {tensor.dtype}")
    if tensor.device != reference.device:
        raise ValueError(f"{name} must be on {reference_name}'s device {reference.device}; got {tensor.device}")


def check_index_tensor(index, name: str, expected: str) -> None:
    """ValueError unless `index` is an integer tensor: float, complex and bool tensors (and non-tensors)
    are refused, never truncated or cast. `expected` says what was wanted, e.g. "[batch] (int64)"."""
    if (not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex()
            or index.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor {expected}; got {describe(index)} "
                         "(float and bool indices are refused, not truncated: pass int64 indices)")


def double_backward_message(op: str) -> str:
    return (f"double backward (create_graph=True) through pefops.ops.{op} is not supported: its backward is a "
            "fused kernel (a custom op) without a derivative of its own; differentiate the op's pure-PyTorch "
            "reference (<op>_ref) when second derivatives are needed")


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the first `count` tensors (the gradients a backward computed), with the op's saved
    inputs (and incoming gradients) that require grad as further inputs, so that any second
    derivative through the op's backward passes this node, whose backward raises `message`."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        return tuple(tensor.view_as(tensor) for tensor in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def once_differentiable(op: str):
    """Decorator for the backward of a pefops custom op or autograd.Function: the gradients are
    computed without recording a graph; under create_graph=True they come back tied to the op's
    saved inputs (and incoming gradients) through a node that raises double_backward_message(op)
    when a second derivative is taken through it. A first-order create_graph=True call still works;
    a second derivative is never silently dropped (torch's once_differentiable ties the gradients to
    fresh leaves, so differentiating w.r.t. the op's inputs would skip its node without an error)."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            anchors = [t for t in (*grad_outputs, *_saved(ctx)) if isinstance(t, torch.Tensor) and t.requires_grad]
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else tuple(grads)
            positions = [i for i, grad in enumerate(grads) if isinstance(grad, torch.Tensor)]
            if not anchors or not positions:
                return grads[0] if single else grads
            tied = _RefuseDoubleBackward.apply(double_backward_message(op), len(positions),
                                               *[grads[i] for i in positions], *anchors)
            grads = list(grads)
            for i, grad in zip(positions, tied):
                grads[i] = grad
            return grads[0] if single else tuple(grads)

        return wrapper

    return decorate


def _saved(ctx) -> tuple:
    try:
        return tuple(ctx.saved_tensors)
    except RuntimeError:  # already freed: nothing to tie to
        return ()


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


def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host (CPU) tensor on `device` without the host waiting for the device: on CUDA through
    pinned memory with a non-blocking copy (the caching host allocator keeps the pinned block until
    the copy has run, so the source may go out of scope at once); elsewhere a plain .to(). For plans
    built on the host from a CPU routing index (multi_adapter, masked_linear_routed)."""
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
