"""The fused middle of AdapterFusion: per-adapter scores, softmax over adapters, weighted units.

For T rows and N adapters whose R bottleneck units lie in contiguous segments (adapter i owns the
units segment_offsets[i] .. segment_offsets[i + 1] - 1):

    scores[t, i] = Σ_{r in segment i} t_[t, r] · a[t, r] + bias_scores[t, i]
    p[t, :]      = softmax(scores[t, :] · dropout_mask[t, :] / temperature)
    w[t, r]      = a[t, r] · p[t, segment(r)]

`fusion_mix(t_, a, bias_scores, segment_offsets, temperature, dropout_mask=None) -> (w, p)`, with
gradients for t_, a and bias_scores (p is an output too, and its gradient is used). In
pefops.ops.adapter_fusion, t_ = qk @ U, a = act(W_d x + b_d), bias_scores = qk @ Cᵀ (+ q·b_k)
(+ qk·residual), and mix = w @ Uᵀ + p @ C follows in torch. The dropout mask (0 or 1 / (1 - p)) is
drawn by the caller with torch, so the random stream stays torch's.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from pefops import backend as backends
from pefops.ops.common import FLOAT_DTYPES, compute_dtype, once_differentiable

OP = "fusion_mix"
# The Triton kernels keep a [rows, adapters] score tile in registers (kernels/fusion_mix.py).
TRITON_MAX_ADAPTERS = 64


# ------------------------------------------------------------------------------------ reference


def segment_membership(segment_offsets, units: int, dtype=torch.float32):
    """[R, N] one-hot membership of every unit in its segment (vectorised: searchsorted, one_hot)."""
    adapters = segment_offsets.numel() - 1
    offsets = segment_offsets.to(torch.long)
    unit_index = torch.arange(units, device=segment_offsets.device, dtype=torch.long)
    segment = torch.searchsorted(offsets[1:], unit_index, right=True).clamp_(max=adapters - 1)
    return F.one_hot(segment, adapters).to(dtype)


def fusion_mix_ref(t_, a, bias_scores, segment_offsets, temperature, dropout_mask=None):
    """The formula in fp32 (fp64 for fp64 inputs), differentiable: segment sums and the per-unit
    gather are matmuls with the one-hot membership (no loop over adapters). t_, a: [..., R];
    bias_scores, dropout_mask: [..., N]; segment_offsets: int [N + 1] on the inputs' device.
    Returns (w in a's dtype, p in bias_scores' dtype)."""
    cdt = compute_dtype(a.dtype)
    membership = segment_membership(segment_offsets.to(a.device), a.shape[-1], cdt)  # [R, N]
    a_c = a.to(cdt)
    scores = (t_.to(cdt) * a_c) @ membership + bias_scores.to(cdt)
    if dropout_mask is not None:
        scores = scores * dropout_mask.to(cdt)
    p = torch.softmax(scores / temperature, dim=-1)
    w = a_c * (p @ membership.t())
    return w.to(a.dtype), p.to(bias_scores.dtype)


def _torch_forward(t_, a, bias_scores, segment_offsets, temperature, dropout_mask):
    return fusion_mix_ref(t_, a, bias_scores, segment_offsets, temperature, dropout_mask)


def _torch_backward(dw, dp, t_, a, p, segment_offsets, temperature, dropout_mask, need_t, need_a, need_bias):
    """The gradients of the formula, vectorised (the same membership matmuls):
    dp_total = dp + Σ_{r in i} dw·a; ds = p ⊙ (dp_total − Σ_i p_i dp_total_i) / T (⊙ mask);
    d t_ = ds[seg] · a; d a = ds[seg] · t_ + dw · p[seg]; d bias = ds."""
    cdt = compute_dtype(a.dtype)
    membership = segment_membership(segment_offsets, a.shape[-1], cdt)
    dw_c, a_c, p_c = dw.to(cdt), a.to(cdt), p.to(cdt)
    dp_total = dp.to(cdt) + (dw_c * a_c) @ membership
    ds = p_c * (dp_total - (p_c * dp_total).sum(-1, keepdim=True)) / temperature
    if dropout_mask is not None:
        ds = ds * dropout_mask.to(cdt)
    ds_units = ds @ membership.t() if (need_t or need_a) else None
    dt = ds_units * a_c if need_t else None
    da = ds_units * t_.to(cdt) + dw_c * (p_c @ membership.t()) if need_a else None
    return dt, da, ds if need_bias else None


# ------------------------------------------------------------------------------------ custom ops


def _problem(a, adapters, mode):
    return backends.Problem(a.device, a.dtype, mode, {"units": a.shape[-1], "adapters": adapters})


@torch.library.custom_op("pefops::fusion_mix_fwd", mutates_args=())
def _fusion_mix_fwd(t_: torch.Tensor, a: torch.Tensor, bias_scores: torch.Tensor, segment_offsets: torch.Tensor,
                    temperature: float, dropout_mask: Optional[torch.Tensor],
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    implementation = backends.select(OP, _problem(a, bias_scores.shape[-1], "forward"), backend or None)
    w, p = implementation.functions["forward"](t_, a, bias_scores, segment_offsets, temperature, dropout_mask)
    return w.to(a.dtype).contiguous(), p.to(bias_scores.dtype).contiguous()


@_fusion_mix_fwd.register_fake
def _(t_, a, bias_scores, segment_offsets, temperature, dropout_mask, backend):
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
        bias_scores, memory_format=torch.contiguous_format)


@torch.library.custom_op("pefops::fusion_mix_bwd", mutates_args=())
def _fusion_mix_bwd(dw: torch.Tensor, dp: torch.Tensor, t_: torch.Tensor, a: torch.Tensor, p: torch.Tensor,
                    segment_offsets: torch.Tensor, temperature: float, dropout_mask: Optional[torch.Tensor],
                    grad_mask: Sequence[bool], backend: str) -> list[torch.Tensor]:
    implementation = backends.select(OP, _problem(a, p.shape[-1], "backward"), backend or None)
    grads = implementation.functions["backward"](dw, dp, t_, a, p, segment_offsets, temperature, dropout_mask,
                                                 *grad_mask)
    references = (t_, a, p)
    return [g.to(r.dtype).reshape(r.shape).contiguous() if needed and g is not None else a.new_empty(0)
            for g, r, needed in zip(grads, references, grad_mask)]


@_fusion_mix_bwd.register_fake
def _(dw, dp, t_, a, p, segment_offsets, temperature, dropout_mask, grad_mask, backend):
    return [torch.empty_like(r, memory_format=torch.contiguous_format) if needed else a.new_empty(0)
            for needed, r in zip(grad_mask, (t_, a, p))]


def _setup(ctx, inputs, output):
    t_, a, bias_scores, segment_offsets, temperature, dropout_mask, backend = inputs
    ctx.save_for_backward(t_, a, output[1], segment_offsets, dropout_mask)
    ctx.temperature, ctx.backend = temperature, backend


@once_differentiable("fusion_mix")
def _backward(ctx, dw, dp):
    t_, a, p, segment_offsets, dropout_mask = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None, None, None, None
    dw = torch.zeros_like(a) if dw is None else dw.to(a.dtype).contiguous()
    dp = torch.zeros_like(p) if dp is None else dp.to(p.dtype).contiguous()
    grads = _fusion_mix_bwd(dw, dp, t_, a, p, segment_offsets, ctx.temperature, dropout_mask, mask, ctx.backend)
    dt, da, dbias = (g if needed else None for g, needed in zip(grads, mask))
    return dt, da, dbias, None, None, None, None


_fusion_mix_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------ public op


def _check(t_, a, bias_scores, segment_offsets, temperature, dropout_mask):
    for name, tensor in (("t_", t_), ("a", a), ("bias_scores", bias_scores)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
            raise ValueError(f"{name} must be a tensor; got {type(tensor).__name__}")
    if t_.shape != a.shape:
        raise ValueError(f"t_ and a must have one shape [..., R]; got {tuple(t_.shape)} and {tuple(a.shape)}")
    if bias_scores.shape[:-1] != a.shape[:-1]:
        raise ValueError(f"bias_scores must be [..., N] with a's leading dims {tuple(a.shape[:-1])}; got "
                         f"{tuple(bias_scores.shape)}")
    if len({t_.dtype, a.dtype, bias_scores.dtype}) != 1 or a.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"t_, a and bias_scores must share one float dtype (float32, float16, bfloat16, float64); "
                         f"got {t_.dtype}, {a.dtype}, {bias_scores.dtype}")
    if len({t_.device, a.device, bias_scores.device}) != 1:
        raise ValueError(f"t_, a and bias_scores must be on one device; got {t_.device}, {a.device}, "
                         f"{bias_scores.device}")
    adapters = bias_scores.shape[-1]
    if adapters < 1:
        raise ValueError("fusion_mix needs at least one adapter (bias_scores [..., N] with N >= 1)")
    if (not isinstance(segment_offsets, torch.Tensor) or segment_offsets.dim() != 1
            or segment_offsets.is_floating_point() or segment_offsets.dtype == torch.bool
            or segment_offsets.numel() != adapters + 1):
        shape = tuple(segment_offsets.shape) if isinstance(segment_offsets, torch.Tensor) else type(segment_offsets)
        raise ValueError(f"segment_offsets must be an int tensor [N + 1 = {adapters + 1}] of cumulative unit counts; "
                         f"got {shape}")
    if segment_offsets.device.type == "cpu" and not backends.compiling():  # checked where no sync/graph break
        values = segment_offsets.tolist()
        if values[0] != 0 or values[-1] != a.shape[-1] or any(x > y for x, y in zip(values, values[1:])):
            raise ValueError(f"segment_offsets must rise from 0 to R = {a.shape[-1]} (never falling); got {values}")
    elif segment_offsets.device != a.device:
        raise ValueError(f"segment_offsets must be on the CPU or on {a.device}; got {segment_offsets.device}")
    if dropout_mask is not None:
        if not isinstance(dropout_mask, torch.Tensor) or not dropout_mask.is_floating_point():
            raise ValueError(f"dropout_mask must be a float tensor [..., N] or None; got {type(dropout_mask).__name__}")
        if dropout_mask.shape != bias_scores.shape or dropout_mask.device != a.device:
            raise ValueError(f"dropout_mask must be bias_scores' shape {tuple(bias_scores.shape)} on {a.device}; got "
                             f"{tuple(dropout_mask.shape)} on {dropout_mask.device}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive float; got {temperature!r}")


def fusion_mix(t_, a, bias_scores, segment_offsets, temperature: float = 1.0, dropout_mask=None, *,
               backend: Optional[str] = None):
    """(w, p) of the fused AdapterFusion middle (see the module docstring).

    t_, a: [..., R]; bias_scores: [..., N]; segment_offsets: int [N + 1], 0 = o_0 ≤ o_1 ≤ … ≤ o_N = R
    (on the CPU, where eager calls check the values, or on the inputs' device, where they are not);
    dropout_mask: None or [..., N] float, already scaled (0 or 1 / (1 - p)), multiplied into the
    scores before the softmax. One float dtype for t_, a, bias_scores (float64 on the torch backend
    only); computed in fp32. Returns w [..., R] and p [..., N] in that dtype; gradients for t_, a
    and bias_scores.
    """
    _check(t_, a, bias_scores, segment_offsets, temperature, dropout_mask)
    backends.forced_backend(backend)  # rejects a misspelt backend before any work
    units, adapters = a.shape[-1], bias_scores.shape[-1]
    offsets = segment_offsets.to(a.device, non_blocking=True)
    problem = _problem(a, adapters, "forward")
    if backends.eager_torch(OP, problem, backend):
        return fusion_mix_ref(t_, a, bias_scores, offsets, float(temperature), dropout_mask)  # eager, under autograd

    leading = math.prod(a.shape[:-1])

    def rows(tensor, width):
        flat = tensor.reshape(leading, width)
        return flat if width <= 1 or flat.stride(-1) == 1 else flat.contiguous()

    mask = None if dropout_mask is None else rows(dropout_mask, adapters)
    w, p = _fusion_mix_fwd(rows(t_, units), rows(a, units), rows(bias_scores, adapters), offsets, float(temperature),
                           mask, backend or "")
    return w.reshape(a.shape), p.reshape(bias_scores.shape)


# ------------------------------------------------------------------------------------ backends


def _triton_forward(t_, a, bias_scores, segment_offsets, temperature, dropout_mask):
    kernels = backends.import_kernels("fusion_mix")
    return kernels.fusion_mix_forward(t_, a, bias_scores, segment_offsets, temperature, dropout_mask)


def _triton_backward(dw, dp, t_, a, p, segment_offsets, temperature, dropout_mask, need_t, need_a, need_bias):
    kernels = backends.import_kernels("fusion_mix")
    return kernels.fusion_mix_backward(dw, dp, t_, a, p, segment_offsets, temperature, dropout_mask, need_t, need_a)


def _triton_limits(problem):
    adapters = problem.sizes.get("adapters", 0)
    if adapters > TRITON_MAX_ADAPTERS:
        return [f"{adapters} adapters: the Triton kernels take at most {TRITON_MAX_ADAPTERS}"]
    return []


backends.register_torch_and_triton(
    OP, dtypes=FLOAT_DTYPES, torch_functions={"forward": _torch_forward, "backward": _torch_backward},
    triton_functions={"forward": _triton_forward, "backward": _triton_backward}, triton_limits=_triton_limits,
)
