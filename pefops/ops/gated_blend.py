"""Gated blend of two tensors: side-tuning's alpha blend and ladder side-tuning's gate.

    g = sigmoid(alpha / temperature)          alpha: one value, or one per channel (last dim)
    out = g * a + (1 - g) * b

`alpha_blend(base, side, alpha)` is side-tuning's output (temperature 1, no gradient to the frozen
base); `ladder_gate(down, side, alpha, temperature=0.1)` is the gate in front of every ladder
side-network layer (gradients to both inputs). One custom op serves both.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from pefops import backend as backends
from pefops.ops.common import FLOAT_DTYPES, flat_rows, once_differentiable

OP = "gated_blend"


# ------------------------------------------------------------------------------------ reference


def gated_blend_ref(a, b, alpha, temperature=1.0):
    """The formula in fp32 (fp64 for fp64 inputs), differentiable; output in a's dtype."""
    cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    gate = torch.sigmoid(alpha.to(cdt).reshape(-1) / temperature)
    if gate.numel() == 1:
        gate = gate.reshape(())
    return (gate * a.to(cdt) + (1 - gate) * b.to(cdt)).to(a.dtype)


def _torch_forward(a, b, alpha, temperature):
    return gated_blend_ref(a, b, alpha, temperature)


def _torch_backward(grad, a, b, alpha, temperature, need_a, need_b, need_alpha):
    cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    gate = torch.sigmoid(alpha.to(cdt).reshape(-1) / temperature)
    g = grad.to(cdt)
    da = (g * gate).to(a.dtype) if need_a else None
    db = (g * (1 - gate)).to(b.dtype) if need_b else None
    dalpha = None
    if need_alpha:
        terms = flat_rows(g * (a.to(cdt) - b.to(cdt)), a.shape[-1]).sum(0) * gate * (1 - gate) / temperature
        dalpha = terms.sum().reshape(1) if alpha.numel() == 1 else terms
    return da, db, dalpha


# ------------------------------------------------------------------------------------ custom ops


def _problem(a, mode):
    return backends.Problem(a.device, a.dtype, mode, {"columns": a.shape[-1]})


@torch.library.custom_op("pefops::gated_blend_fwd", mutates_args=())
def _gated_blend_fwd(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, temperature: float,
                     backend: str) -> torch.Tensor:
    implementation = backends.select(OP, _problem(a, "forward"), backend or None)
    return implementation.functions["forward"](a, b, alpha, temperature)


@_gated_blend_fwd.register_fake
def _(a, b, alpha, temperature, backend):
    return torch.empty_like(a)


@torch.library.custom_op("pefops::gated_blend_bwd", mutates_args=())
def _gated_blend_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, temperature: float,
                     grad_mask: Sequence[bool], backend: str) -> list[torch.Tensor]:
    implementation = backends.select(OP, _problem(a, "backward"), backend or None)
    grads = implementation.functions["backward"](grad, a, b, alpha, temperature, *grad_mask)
    references = (a, b, alpha)
    return [g.to(r.dtype).reshape(r.shape) if g is not None else a.new_empty(0) for g, r in zip(grads, references)]


@_gated_blend_bwd.register_fake
def _(grad, a, b, alpha, temperature, grad_mask, backend):
    return [torch.empty_like(r) if needed else a.new_empty(0) for needed, r in zip(grad_mask, (a, b, alpha))]


def _setup(ctx, inputs, output):
    a, b, alpha, temperature, backend = inputs
    ctx.save_for_backward(a, b, alpha)
    ctx.temperature, ctx.backend = temperature, backend


@once_differentiable("gated_blend (alpha_blend, ladder_gate)")
def _backward(ctx, grad):
    a, b, alpha = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None, None
    grads = _gated_blend_bwd(grad.contiguous(), a, b, alpha, ctx.temperature, mask, ctx.backend)
    da, db, dalpha = (g if needed else None for g, needed in zip(grads, mask))
    return da, db, dalpha, None, None


_gated_blend_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------ public ops


def _check(a, b, alpha, temperature):
    for name, tensor in (("a", a), ("b", b)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
            raise ValueError(f"{name} must be a tensor [..., channels]; got {type(tensor).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"the two blended tensors must have one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"both tensors must share one float dtype (float32, float16, bfloat16); got {a.dtype}, {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"both tensors must be on one device; got {a.device} and {b.device}")
    if not isinstance(alpha, torch.Tensor) or not alpha.is_floating_point():
        raise ValueError(f"alpha must be a float tensor of 1 or {a.shape[-1]} elements; got {type(alpha).__name__}")
    if alpha.numel() not in (1, a.shape[-1]):
        raise ValueError(f"alpha must have 1 or channels={a.shape[-1]} elements; got shape {tuple(alpha.shape)}")
    if alpha.device != a.device:
        raise ValueError(f"alpha must be on {a.device}; got {alpha.device}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or temperature <= 0:
        raise ValueError(f"temperature must be a positive float; got {temperature!r}")


def gated_blend(a, b, alpha, temperature: float = 1.0, *, backend: Optional[str] = None):
    """sigmoid(alpha / temperature) * a + (1 - sigmoid(alpha / temperature)) * b, gradients to all three.
    Under autocast the two tensors may differ in dtype (a float32 LayerNorm output blended with a
    bfloat16 Linear output): both go to the wider one, as autocast's elementwise ops promote."""
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype != b.dtype
            and a.is_floating_point() and b.is_floating_point() and torch.is_autocast_enabled(a.device.type)):
        wider = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(wider), b.to(wider)
    _check(a, b, alpha, temperature)
    backends.forced_backend(backend)  # rejects a misspelt backend before any work
    channels = a.shape[-1]
    a2 = flat_rows(a, channels)
    b2 = flat_rows(b, channels)
    if a2.numel() == 0:
        # empty (no rows or no channels): nothing to launch, whatever the backend; the reference
        # under autograd gives the empty output and empty / zero gradients
        return gated_blend_ref(a, b, alpha, float(temperature))
    if backends.eager_torch(OP, _problem(a2, "forward"), backend):
        return gated_blend_ref(a, b, alpha, float(temperature))  # eager reference under autograd
    a2 = a2 if a2.stride(-1) == 1 else a2.contiguous()
    b2 = b2 if b2.stride(-1) == 1 else b2.contiguous()
    return _gated_blend_fwd(a2, b2, alpha.reshape(-1), float(temperature), backend or "").reshape(a.shape)


def alpha_blend(base, side, alpha, *, backend: Optional[str] = None):
    """Side-tuning: sigmoid(alpha) * base + (1 - sigmoid(alpha)) * side. The base (a frozen
    network's output) gets no gradient; side and alpha do."""
    return gated_blend(base.detach(), side, alpha, 1.0, backend=backend)


def ladder_gate(down, side, alpha, temperature: float = 0.1, *, backend: Optional[str] = None):
    """Ladder side-tuning's gate: mu = sigmoid(alpha / T); mu * down + (1 - mu) * side."""
    return gated_blend(down, side, alpha, temperature, backend=backend)


# ------------------------------------------------------------------------------------ backends


def _triton_forward(a, b, alpha, temperature):
    kernels = backends.import_kernels("gated_blend")
    return kernels.gated_blend_forward(a, b, alpha.float(), temperature)


def _triton_backward(grad, a, b, alpha, temperature, need_a, need_b, need_alpha):
    kernels = backends.import_kernels("gated_blend")
    return kernels.gated_blend_backward(grad, a, b, alpha.float(), temperature, need_a, need_b, need_alpha)


backends.register_torch_and_triton(
    OP, dtypes=FLOAT_DTYPES, torch_functions={"forward": _torch_forward, "backward": _torch_backward},
    triton_functions={"forward": _triton_forward, "backward": _triton_backward},
)
