"""Fused bottleneck adapter op: reference, custom ops with autograd, backend dispatch.

    y   = residual + scaling * (act(x @ down_weight.T + down_bias) @ up_weight.T + up_bias)
    out = LayerNorm(y)   when layer_norm=(weight, bias, eps) is given, else y

The forward custom op returns (out, z, mean, rstd): z [tokens, r] is the fp32 pre-activation and
mean/rstd the LayerNorm row statistics, the only things saved for backward besides the inputs.
The backward is a custom op too, so the torch, Triton and CUDA paths share one autograd formula and
torch.compile sees both halves as opaque nodes.
"""

from __future__ import annotations

import torch

from pefops import backend as backends
from pefops.ops.adapter_call import (GRAD_NAMES, AdapterCall, check_adapter_operands,
                                     check_scaling_tensor, check_scaling_value, contiguous, define_custom_ops,
                                     layer_norm_backward, layer_norm_forward, register_backends)
from pefops.ops.common import check_float_dtype, compute_dtype, constant, describe, flat_rows
from pefops.ops.activations import activation_backward, activation_code, activation_forward
from pefops.kernels.shared import unit_stride_rows

OP = "bottleneck_adapter"


# ------------------------------------------------------------------------------------ reference


def _scale_of(call: AdapterCall, dtype: torch.dtype):
    """The scale in the compute dtype: the float, or the tensor as [] or [hidden]."""
    if call.scaling is None:
        return call.scaling_value
    scaling = call.scaling.to(dtype)
    return scaling.reshape(()) if scaling.numel() == 1 else scaling.reshape(-1)


def _scaled_sum(base, u, scale):
    return torch.add(base, u, alpha=scale) if isinstance(scale, float) else torch.addcmul(base, u, scale)


def _torch_forward(call: AdapterCall):
    """The reference forward, vectorised, in fp32 (fp64 for fp64 inputs). Differentiable, so
    `bottleneck_adapter_ref` is this function with plain autograd. call.x: [T, H]. Returns (out, z,
    mean, rstd)."""
    x = call.x
    cdt = compute_dtype(x.dtype)
    z = torch.nn.functional.linear(x.to(cdt), call.down_weight.to(cdt),
                                   None if call.down_bias is None else call.down_bias.to(cdt))
    a = activation_forward(z, call.activation, call.negative_slope)
    u = torch.nn.functional.linear(a, call.up_weight.to(cdt), None if call.up_bias is None else call.up_bias.to(cdt))
    y = _scaled_sum(call.residual_or_x().to(cdt), u, _scale_of(call, cdt))
    out, mean, rstd = layer_norm_forward(y, call)
    return out.to(x.dtype), z, mean, rstd


def _torch_backward(grad_out, call: AdapterCall, z, mean, rstd, grad_mask):
    """Explicit backward in the compute dtype through ATen's fused backward kernels; returns grads
    in GRAD_NAMES order, None where grad_mask says not needed. The up-projection is recomputed from
    the saved pre-activation z, as the kernels do."""
    cdt = z.dtype
    need = dict(zip(GRAD_NAMES, grad_mask))
    grad = grad_out.to(cdt)
    a = activation_forward(z, call.activation, call.negative_slope)
    scale = _scale_of(call, cdt)
    u = None
    if call.layer_norm or need["scaling"]:
        up_bias = None if call.up_bias is None else call.up_bias.to(cdt)
        u = torch.nn.functional.linear(a, call.up_weight.to(cdt), up_bias)
    d_ln_weight = d_ln_bias = None
    if call.layer_norm:
        y = _scaled_sum(call.residual_or_x().to(cdt), u, scale)
        dy, d_ln_weight, d_ln_bias = layer_norm_backward(grad, y, call, mean, rstd, need)
    else:
        dy = grad
    du = dy * scale
    d_scaling = None
    if need["scaling"]:
        d_scaling = (dy * u).sum(0) if call.scaling.numel() > 1 else (dy * u).sum()
    d_up_weight = du.t() @ a if need["up_weight"] else None
    d_up_bias = du.sum(0) if need["up_bias"] else None
    dz = activation_backward(du @ call.up_weight.to(cdt), z, call.activation, call.negative_slope)
    d_down_weight = dz.t() @ call.x.to(cdt) if need["down_weight"] else None
    d_down_bias = dz.sum(0) if need["down_bias"] else None
    dx = None
    if need["x"]:
        down_weight = call.down_weight.to(cdt)
        dx = torch.addmm(dy, dz, down_weight) if call.residual is None else dz @ down_weight
    d_residual = dy if need["residual"] else None
    return (dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scaling, d_residual, d_ln_weight, d_ln_bias)


def bottleneck_adapter_ref(x, down_weight, down_bias, up_weight, up_bias, *, activation="relu", scaling=1.0,
                           residual=None, layer_norm=None, negative_slope=0.01):
    """The reference: same arguments as `bottleneck_adapter`, plain autograd, fp32 (fp64 for fp64
    inputs) math, output in x's dtype. The test oracle and the CPU baseline."""
    call = _validate(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm,
                     negative_slope)
    return _torch_forward(call)[0].reshape(x.shape)


# ------------------------------------------------------------------------------------ validation


def _validate(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm,
              negative_slope) -> AdapterCall:
    """Check every argument (ValueError saying what was expected); the call with x and the residual
    as [tokens, hidden]."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., hidden]; got {type(x).__name__ if not isinstance(x, torch.Tensor) else describe(x)}")
    check_float_dtype("x", x.dtype)
    hidden = x.shape[-1]
    if not isinstance(down_weight, torch.Tensor) or down_weight.dim() != 2 or down_weight.shape[1] != hidden:
        got = describe(down_weight) if isinstance(down_weight, torch.Tensor) else type(down_weight).__name__
        raise ValueError(f"down_weight must be [rank, hidden={hidden}]; got {got}")
    rank = down_weight.shape[0]
    if rank < 1:
        raise ValueError("down_weight must have at least one row (rank >= 1)")
    ln_weight, ln_bias, ln_eps = check_adapter_operands(x, down_weight, down_bias, up_weight, up_bias, residual,
                                                        layer_norm)
    scaling_tensor, scaling_value = None, 1.0
    if isinstance(scaling, torch.Tensor):
        check_scaling_tensor(scaling, x.device)
        if scaling.numel() not in (1, hidden) or (scaling.numel() == hidden and scaling.dim() > 1 and scaling.shape[-1] != hidden):
            raise ValueError(f"scaling must be a float, a one-element tensor or a tensor [hidden={hidden}]; got shape {tuple(scaling.shape)}")
        scaling_tensor = scaling
    else:
        scaling_value = check_scaling_value(scaling)
    return AdapterCall(
        x=flat_rows(x, hidden), down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias,
        scaling=scaling_tensor, scaling_value=scaling_value,
        residual=None if residual is None else flat_rows(residual, hidden),
        ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, layer_norm=layer_norm is not None,
        activation=activation_code(activation), negative_slope=float(negative_slope),
    )


# ------------------------------------------------------------------------------------ custom ops
# pefops::bottleneck_adapter_fwd / _bwd: flat schemas (adapter_call's parameter tables), the call rebuilt by name

_bottleneck_adapter_fwd, _bottleneck_adapter_bwd = define_custom_ops(OP, routed=False)


# ------------------------------------------------------------------------------------ public op


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, *, activation="relu", scaling=1.0,
                       residual=None, layer_norm=None, negative_slope=0.01, backend=None):
    """Fused bottleneck adapter.

    x: [..., hidden]; down_weight [r, hidden], down_bias [r] or None; up_weight [hidden, r], up_bias
    [hidden] or None; activation: relu, gelu, gelu_new, silu/swish, tanh, leaky_relu (negative_slope),
    identity; scaling: float, one-element tensor or [hidden] tensor (learnable); residual: tensor like
    x (default x); layer_norm: (weight or None, bias or None, eps) to apply LayerNorm to the sum.
    backend: None/"auto", "cuda", "triton" or "torch" (PEFOPS_BACKEND sets the default).
    Returns a tensor like x.
    """
    call = _validate(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm,
                     negative_slope)
    backends.forced_backend(backend)  # rejects a misspelt backend before any work
    # An empty problem (no tokens or hidden size 0) launches nothing whatever the backend: the
    # reference under autograd gives the empty output and zero (or empty) gradients; so do eager
    # calls the torch backend serves (see backends.eager_torch).
    if call.x.numel() == 0 or backends.eager_torch(OP, call.problem("forward"), backend):
        return _torch_forward(call)[0].reshape(x.shape)
    out = _bottleneck_adapter_fwd(*call.forward_arguments(backend or ""))[0]
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ backends
# The kernel launchers take the call's fields by position (their `scale` is the call's `scaling`).


def _triton_forward(call: AdapterCall):
    kernels = backends.import_kernels("bottleneck_adapter")
    return kernels.bottleneck_adapter_forward(
        unit_stride_rows(call.x), call.down_weight.contiguous(), contiguous(call.down_bias),
        call.up_weight.contiguous(), contiguous(call.up_bias), call.scaling, call.scaling_value,
        unit_stride_rows(call.residual), contiguous(call.ln_weight), contiguous(call.ln_bias), call.ln_eps,
        call.layer_norm, call.activation, call.negative_slope,
    )


def _triton_backward(grad_out, call: AdapterCall, z, mean, rstd, grad_mask):
    """The rows kernel gives dy, dz and the column sums; the three products over tokens or hidden go
    to the BLAS (torch.mm / addmm), which is what they are."""
    kernels = backends.import_kernels("bottleneck_adapter")
    need = dict(zip(GRAD_NAMES, grad_mask))
    x, scaling = call.x, call.scaling
    dy, dz, d_up_bias, d_scaling, d_ln_weight, d_ln_bias = kernels.bottleneck_adapter_backward_rows(
        unit_stride_rows(grad_out), unit_stride_rows(call.residual_or_x()), call.up_weight.contiguous(),
        contiguous(call.up_bias), scaling, call.scaling_value, contiguous(call.ln_weight), z, mean, rstd,
        call.layer_norm, call.activation, call.negative_slope,
        need["up_bias"], need["scaling"], need["ln_weight"], need["ln_bias"],
    )
    if dy is None:
        dy = grad_out
    dz_low = dz.to(x.dtype)
    d_up_weight = None
    if need["up_weight"]:
        a = activation_forward(z, call.activation, call.negative_slope).to(x.dtype)
        d_up_weight = dy.t().mm(a)
        if scaling is not None:
            scale = scaling.to(x.dtype)
            d_up_weight = d_up_weight * (scale.reshape(-1, 1) if scaling.numel() > 1 else scale)
        elif call.scaling_value != 1.0:
            d_up_weight.mul_(call.scaling_value)
    d_down_weight = dz_low.t().mm(x) if need["down_weight"] else None
    d_down_bias = dz.sum(0) if need["down_bias"] else None
    dx = None
    if need["x"]:
        dx = torch.addmm(dy, dz_low, call.down_weight) if call.residual is None else dz_low.mm(call.down_weight)
    d_residual = dy if need["residual"] else None
    if d_scaling is not None and scaling.numel() == 1:
        d_scaling = d_scaling.sum()
    return (dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scaling, d_residual, d_ln_weight, d_ln_bias)


def _cuda_forward(call: AdapterCall):
    from pefops import csrc

    x = call.x
    tokens, hidden = x.shape
    if call.scaling is None:
        scale_vector = constant(call.scaling_value, (hidden,), torch.float32, x.device)
    else:
        scale_vector = call.scaling.detach().to(torch.float32).reshape(-1).expand(hidden).contiguous()

    def or_constant(tensor, value, size):  # the kernel reads every operand: a constant stands for an absent one
        return tensor.contiguous() if tensor is not None else constant(value, (size,), x.dtype, x.device)

    empty = x.new_empty(0)
    return tuple(csrc.load().bottleneck_adapter_decode_forward(
        x.contiguous(), call.down_weight.contiguous(), or_constant(call.down_bias, 0.0, call.rank),
        call.up_weight.contiguous(), or_constant(call.up_bias, 0.0, hidden), scale_vector,
        call.residual_or_x().contiguous(),
        or_constant(call.ln_weight, 1.0, hidden) if call.layer_norm else empty,
        or_constant(call.ln_bias, 0.0, hidden) if call.layer_norm else empty,
        float(call.ln_eps), int(call.activation), float(call.negative_slope),
    ))


register_backends(OP, torch_functions={"forward": _torch_forward, "backward": _torch_backward},
                  triton_functions={"forward": _triton_forward, "backward": _triton_backward},
                  cuda_forward=_cuda_forward, cuda_symbol="bottleneck_adapter_decode_forward", cuda_unit="tokens")
