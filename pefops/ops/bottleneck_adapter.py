"""Fused bottleneck adapter op: reference, custom ops with autograd, backend dispatch.

    y   = residual + scaling * (act(x @ down_weight.T + down_bias) @ up_weight.T + up_bias)
    out = LayerNorm(y)   when layer_norm=(weight, bias, eps) is given, else y

The forward custom op returns (out, z, mean, rstd): z [tokens, r] is the fp32 pre-activation and
mean/rstd the LayerNorm row statistics, the only things saved for backward besides the inputs.
The backward is a custom op too, so the torch, Triton and CUDA paths share one autograd formula and
torch.compile sees both halves as opaque nodes.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from pefops import backend as backends
from pefops.ops.common import compute_dtype, constant, describe, flat_rows, once_differentiable
from pefops.ops.activations import activation_backward, activation_code, activation_forward
from pefops.kernels.shared import MAX_RANK, unit_stride_rows

OP = "bottleneck_adapter"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DECODE_TOKENS = 16

# order of the gradients the backward op returns (and of its grad mask)
GRAD_NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual", "ln_weight", "ln_bias")


# ------------------------------------------------------------------------------------ reference


def _scale_of(scaling: Optional[torch.Tensor], scaling_value: float, dtype: torch.dtype):
    if scaling is None:
        return scaling_value
    return scaling.to(dtype).reshape(()) if scaling.numel() == 1 else scaling.to(dtype).reshape(-1)


def _torch_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                   ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope):
    """The reference forward, vectorised, in fp32 (fp64 for fp64 inputs). Differentiable, so
    `bottleneck_adapter_ref` is this function with plain autograd. x: [T, H]. Returns (out, z,
    mean, rstd)."""
    cdt = compute_dtype(x.dtype)
    z = torch.nn.functional.linear(x.to(cdt), down_weight.to(cdt), None if down_bias is None else down_bias.to(cdt))
    a = activation_forward(z, activation, negative_slope)
    u = torch.nn.functional.linear(a, up_weight.to(cdt), None if up_bias is None else up_bias.to(cdt))
    base = (x if residual is None else residual).to(cdt)
    scale = _scale_of(scaling, scaling_value, cdt)
    y = torch.add(base, u, alpha=scale) if isinstance(scale, float) else torch.addcmul(base, u, scale)
    if layer_norm:
        weight = None if ln_weight is None else ln_weight.to(cdt)
        bias = None if ln_bias is None else ln_bias.to(cdt)
        out, mean, rstd = torch.native_layer_norm(y, [y.shape[-1]], weight, bias, ln_eps)
        mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    else:
        out = y
        mean, rstd = y.new_empty(0), y.new_empty(0)
    return out.to(x.dtype), z, mean, rstd


def _torch_backward(grad_out, x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                    ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask):
    """Explicit backward in the compute dtype through ATen's fused backward kernels; returns grads
    in GRAD_NAMES order, None where grad_mask says not needed. The up-projection is recomputed from
    the saved pre-activation z, as the kernels do."""
    cdt = z.dtype
    need = dict(zip(GRAD_NAMES, grad_mask))
    grad = grad_out.to(cdt)
    a = activation_forward(z, activation, negative_slope)
    scale = _scale_of(scaling, scaling_value, cdt)
    u = None
    if layer_norm or need["scaling"]:
        u = torch.nn.functional.linear(a, up_weight.to(cdt), None if up_bias is None else up_bias.to(cdt))
    d_ln_weight = d_ln_bias = None
    if layer_norm:
        base = (x if residual is None else residual).to(cdt)
        y = torch.add(base, u, alpha=scale) if isinstance(scale, float) else torch.addcmul(base, u, scale)
        hidden = y.shape[-1]
        weight = None if ln_weight is None else ln_weight.to(cdt)
        bias = None if ln_bias is None else ln_bias.to(cdt)
        dy, d_ln_weight, d_ln_bias = torch.ops.aten.native_layer_norm_backward(
            grad, y, [hidden], mean.reshape(-1, 1), rstd.reshape(-1, 1), weight, bias,
            [True, need["ln_weight"] and weight is not None, need["ln_bias"] and bias is not None],
        )
    else:
        dy = grad
    du = dy * scale
    d_scaling = None
    if need["scaling"]:
        d_scaling = (dy * u).sum(0) if scaling.numel() > 1 else (dy * u).sum()
    d_up_weight = du.t() @ a if need["up_weight"] else None
    d_up_bias = du.sum(0) if need["up_bias"] else None
    dz = activation_backward(du @ up_weight.to(cdt), z, activation, negative_slope)
    d_down_weight = dz.t() @ x.to(cdt) if need["down_weight"] else None
    d_down_bias = dz.sum(0) if need["down_bias"] else None
    dx = None
    if need["x"]:
        dx = torch.addmm(dy, dz, down_weight.to(cdt)) if residual is None else dz @ down_weight.to(cdt)
    d_residual = dy if need["residual"] else None
    return (dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scaling, d_residual, d_ln_weight, d_ln_bias)


def bottleneck_adapter_ref(x, down_weight, down_bias, up_weight, up_bias, *, activation="relu", scaling=1.0,
                           residual=None, layer_norm=None, negative_slope=0.01):
    """The reference: same arguments as `bottleneck_adapter`, plain autograd, fp32 (fp64 for fp64
    inputs) math, output in x's dtype. The test oracle and the CPU baseline."""
    args = _normalise(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm)
    x2, residual2, scaling_tensor, scaling_value, ln_weight, ln_bias, ln_eps, has_ln, code = args
    out = _torch_forward(x2, down_weight, down_bias, up_weight, up_bias, scaling_tensor, scaling_value, residual2,
                         ln_weight, ln_bias, ln_eps, has_ln, code, negative_slope)[0]
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ validation


def _normalise(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm):
    """Check every argument (ValueError saying what was expected) and bring x and the residual to
    [tokens, hidden]. Returns (x2d, residual2d, scaling_tensor, scaling_value, ln_weight, ln_bias,
    ln_eps, has_ln, activation_code)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., hidden]; got {type(x).__name__ if not isinstance(x, torch.Tensor) else describe(x)}")
    dtype, device = x.dtype, x.device
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"x must be float32, float16 or bfloat16 (float64 for gradcheck); got {dtype}")
    hidden = x.shape[-1]
    if not isinstance(down_weight, torch.Tensor) or down_weight.dim() != 2 or down_weight.shape[1] != hidden:
        got = describe(down_weight) if isinstance(down_weight, torch.Tensor) else type(down_weight).__name__
        raise ValueError(f"down_weight must be [rank, hidden={hidden}]; got {got}")
    rank = down_weight.shape[0]
    if rank < 1:
        raise ValueError("down_weight must have at least one row (rank >= 1)")
    expected = {
        "down_weight": (down_weight, (rank, hidden)),
        "down_bias": (down_bias, (rank,)),
        "up_weight": (up_weight, (hidden, rank)),
        "up_bias": (up_bias, (hidden,)),
    }
    if residual is not None:
        expected["residual"] = (residual, tuple(x.shape))
    has_ln = layer_norm is not None
    ln_weight = ln_bias = None
    ln_eps = 1e-5
    if has_ln:
        if not isinstance(layer_norm, (tuple, list)) or len(layer_norm) != 3:
            raise ValueError("layer_norm must be a tuple (weight or None, bias or None, eps)")
        ln_weight, ln_bias, ln_eps = layer_norm
        if not isinstance(ln_eps, numbers.Real) or ln_eps <= 0:
            raise ValueError(f"layer_norm eps must be a positive float; got {ln_eps!r}")
        if hidden == 0:
            raise ValueError("layer_norm over hidden size 0 has no meaning (no values to normalise); x has shape "
                             f"{tuple(x.shape)}: pass layer_norm=None or a hidden size >= 1")
        expected["layer_norm weight"] = (ln_weight, (hidden,))
        expected["layer_norm bias"] = (ln_bias, (hidden,))
    if up_weight is None:
        raise ValueError(f"up_weight must be a tensor [hidden={hidden}, rank={rank}]; got None")
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape {shape}; got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (x is {tuple(x.shape)}, rank {rank}); got {tuple(tensor.shape)}")
        if tensor.dtype != dtype:
            raise ValueError(f"{name} must have x's dtype {dtype}; got {tensor.dtype} (cast the adapter or the input)")
        if tensor.device != device:
            raise ValueError(f"{name} must be on x's device {device}; got {tensor.device}")
    scaling_tensor, scaling_value = None, 1.0
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point():
            raise ValueError(f"scaling tensor must be floating point; got {scaling.dtype}")
        if scaling.numel() not in (1, hidden) or (scaling.numel() == hidden and scaling.dim() > 1 and scaling.shape[-1] != hidden):
            raise ValueError(f"scaling must be a float, a one-element tensor or a tensor [hidden={hidden}]; got shape {tuple(scaling.shape)}")
        if scaling.device != device:
            raise ValueError(f"scaling must be on x's device {device}; got {scaling.device}")
        scaling_tensor = scaling
    elif isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        scaling_value = float(scaling)
    else:
        raise ValueError(f"scaling must be a float or a tensor; got {type(scaling).__name__}")
    code = activation_code(activation)
    x2 = flat_rows(x, hidden)
    residual2 = None if residual is None else flat_rows(residual, hidden)
    return x2, residual2, scaling_tensor, scaling_value, ln_weight, ln_bias, float(ln_eps), has_ln, code


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


# ------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("pefops::bottleneck_adapter_fwd", mutates_args=())
def _bottleneck_adapter_fwd(
    x: torch.Tensor, down_weight: torch.Tensor, down_bias: Optional[torch.Tensor], up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor], scaling: Optional[torch.Tensor], scaling_value: float,
    residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
    ln_eps: float, layer_norm: bool, activation: int, negative_slope: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, hidden = x.shape
    problem = backends.Problem(x.device, x.dtype, "forward", {"tokens": tokens, "hidden": hidden, "rank": down_weight.shape[0]})
    implementation = backends.select(OP, problem, backend or None)
    return implementation.functions["forward"](
        x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
        ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope,
    )


@_bottleneck_adapter_fwd.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual, ln_weight, ln_bias,
      ln_eps, layer_norm, activation, negative_slope, backend):
    tokens, rank = x.shape[0], down_weight.shape[0]
    cdt = compute_dtype(x.dtype)
    stats = tokens if layer_norm else 0
    return (x.new_empty(x.shape), x.new_empty((tokens, rank), dtype=cdt),
            x.new_empty((stats,), dtype=cdt), x.new_empty((stats,), dtype=cdt))


@torch.library.custom_op("pefops::bottleneck_adapter_bwd", mutates_args=())
def _bottleneck_adapter_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, down_weight: torch.Tensor, down_bias: Optional[torch.Tensor],
    up_weight: torch.Tensor, up_bias: Optional[torch.Tensor], scaling: Optional[torch.Tensor], scaling_value: float,
    residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
    layer_norm: bool, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, activation: int,
    negative_slope: float, grad_mask: Sequence[bool], backend: str,
) -> list[torch.Tensor]:
    tokens, hidden = x.shape
    problem = backends.Problem(x.device, x.dtype, "backward", {"tokens": tokens, "hidden": hidden, "rank": down_weight.shape[0]})
    implementation = backends.select(OP, problem, backend or None)
    grads = implementation.functions["backward"](
        grad_out, x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
        ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, list(grad_mask),
    )
    # custom ops return tensors only: an empty tensor stands for "not needed"
    inputs = (x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias)
    return [
        grad.to(reference.dtype).reshape(reference.shape) if grad is not None else x.new_empty(0)
        for grad, reference in zip(grads, inputs)
    ]


@_bottleneck_adapter_bwd.register_fake
def _(grad_out, x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual, ln_weight,
      ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask, backend):
    inputs = (x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias)
    return [
        torch.empty_like(reference) if needed and reference is not None else x.new_empty(0)
        for needed, reference in zip(grad_mask, inputs)
    ]


def _setup_context(ctx, inputs, output):
    (x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual, ln_weight, ln_bias,
     ln_eps, layer_norm, activation, negative_slope, backend) = inputs
    _, z, mean, rstd = output
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias, z, mean, rstd)
    ctx.config = (scaling_value, layer_norm, activation, negative_slope, backend)


@once_differentiable("bottleneck_adapter")
def _backward(ctx, grad_out, _grad_z, _grad_mean, _grad_rstd):
    x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias, z, mean, rstd = ctx.saved_tensors
    scaling_value, layer_norm, activation, negative_slope, backend = ctx.config
    needs = list(ctx.needs_input_grad)
    # inputs order: x, dw, db, uw, ub, scaling, scaling_value, residual, lnw, lnb, ...
    grad_mask = [needs[0], needs[1], needs[2], needs[3], needs[4], needs[5], needs[7], needs[8], needs[9]]
    residual_passthrough = grad_mask[6] and not layer_norm
    if residual_passthrough:
        grad_mask[6] = False  # without LayerNorm the residual's gradient is grad_out itself
    grads = [None] * 9
    if any(grad_mask):
        outputs = _bottleneck_adapter_bwd(
            grad_out.contiguous(), x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
            ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask, backend,
        )
        grads = [grad if needed else None for grad, needed in zip(outputs, grad_mask)]
    if residual_passthrough:
        grads[6] = grad_out
    dx, d_dw, d_db, d_uw, d_ub, d_scaling, d_residual, d_lnw, d_lnb = grads
    return dx, d_dw, d_db, d_uw, d_ub, d_scaling, None, d_residual, d_lnw, d_lnb, None, None, None, None, None


_bottleneck_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    x2, residual2, scaling_tensor, scaling_value, ln_weight, ln_bias, ln_eps, has_ln, code = _normalise(
        x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm
    )
    forced = backends.forced_backend(backend)  # rejects a misspelt backend before any work
    if x2.numel() == 0:
        # no tokens or hidden size 0: nothing to launch, whatever the backend; the reference under
        # autograd gives the empty output and zero (or empty) gradients
        out = _torch_forward(x2, down_weight, down_bias, up_weight, up_bias, scaling_tensor, scaling_value,
                             residual2, ln_weight, ln_bias, ln_eps, has_ln, code, float(negative_slope))[0]
        return out.reshape(x.shape)
    if forced is None and not backends.compiling():
        tokens, hidden = x2.shape
        problem = backends.Problem(x.device, x.dtype, "forward", {"tokens": tokens, "hidden": hidden, "rank": down_weight.shape[0]})
        if backends.select(OP, problem).backend == "torch":
            # Eager calls the torch backend serves run its differentiable reference directly under
            # autograd: the same ATen calls eager PyTorch makes, without the custom op's Python
            # dispatch (tens of µs a call) or recomputation in backward. Compiled graphs and forced
            # backends go through the custom op.
            out = _torch_forward(x2, down_weight, down_bias, up_weight, up_bias, scaling_tensor, scaling_value,
                                 residual2, ln_weight, ln_bias, ln_eps, has_ln, code, float(negative_slope))[0]
            return out.reshape(x.shape)
    out = _bottleneck_adapter_fwd(
        x2, down_weight, down_bias, up_weight, up_bias, scaling_tensor, scaling_value, residual2,
        ln_weight, ln_bias, ln_eps, has_ln, code, float(negative_slope), backend or "",
    )[0]
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ backends


def _triton_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                    ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope):
    kernels = backends.import_kernels("bottleneck_adapter")
    return kernels.bottleneck_adapter_forward(
        unit_stride_rows(x), down_weight.contiguous(), _contiguous(down_bias), up_weight.contiguous(),
        _contiguous(up_bias), scaling, scaling_value, unit_stride_rows(residual), _contiguous(ln_weight),
        _contiguous(ln_bias), ln_eps, layer_norm, activation, negative_slope,
    )


def _triton_backward(grad_out, x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                     ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask):
    """The rows kernel gives dy, dz and the column sums; the three products over tokens or hidden go
    to the BLAS (torch.mm / addmm), which is what they are."""
    kernels = backends.import_kernels("bottleneck_adapter")
    need = dict(zip(GRAD_NAMES, grad_mask))
    dtype = x.dtype
    dy, dz, d_up_bias, d_scaling, d_ln_weight, d_ln_bias = kernels.bottleneck_adapter_backward_rows(
        unit_stride_rows(grad_out), unit_stride_rows(x if residual is None else residual),
        up_weight.contiguous(), _contiguous(up_bias), scaling, scaling_value, _contiguous(ln_weight), z, mean, rstd,
        layer_norm, activation, negative_slope, need["up_bias"], need["scaling"], need["ln_weight"], need["ln_bias"],
    )
    if dy is None:
        dy = grad_out
    dz_low = dz.to(dtype)
    d_up_weight = None
    if need["up_weight"]:
        a = activation_forward(z, activation, negative_slope).to(dtype)
        d_up_weight = dy.t().mm(a)
        if scaling is not None:
            d_up_weight = d_up_weight * (scaling.to(dtype).reshape(-1, 1) if scaling.numel() > 1 else scaling.to(dtype))
        elif scaling_value != 1.0:
            d_up_weight.mul_(scaling_value)
    d_down_weight = dz_low.t().mm(x) if need["down_weight"] else None
    d_down_bias = dz.sum(0) if need["down_bias"] else None
    dx = None
    if need["x"]:
        dx = torch.addmm(dy, dz_low, down_weight) if residual is None else dz_low.mm(down_weight)
    d_residual = dy if need["residual"] else None
    if d_scaling is not None and scaling.numel() == 1:
        d_scaling = d_scaling.sum()
    return (dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scaling, d_residual, d_ln_weight, d_ln_bias)


def _cuda_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                  ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope):
    from pefops import csrc

    tokens, hidden = x.shape
    rank = down_weight.shape[0]
    if scaling is None:
        scale_vector = constant(scaling_value, (hidden,), torch.float32, x.device)
    else:
        scale_vector = scaling.detach().to(torch.float32).reshape(-1).expand(hidden).contiguous()
    empty = x.new_empty(0)
    return tuple(csrc.load().bottleneck_adapter_decode_forward(
        x.contiguous(), down_weight.contiguous(),
        down_bias.contiguous() if down_bias is not None else constant(0.0, (rank,), x.dtype, x.device),
        up_weight.contiguous(), up_bias.contiguous() if up_bias is not None else constant(0.0, (hidden,), x.dtype, x.device),
        scale_vector, (x if residual is None else residual).contiguous(),
        _contiguous(ln_weight) if layer_norm and ln_weight is not None else (constant(1.0, (hidden,), x.dtype, x.device) if layer_norm else empty),
        _contiguous(ln_bias) if layer_norm and ln_bias is not None else (constant(0.0, (hidden,), x.dtype, x.device) if layer_norm else empty),
        float(ln_eps), int(activation), float(negative_slope),
    ))


def _triton_limits(problem: backends.Problem) -> list[str]:
    rank = problem.sizes.get("rank", 0)
    return [f"rank {rank} exceeds the Triton kernel's limit of {MAX_RANK}"] if rank > MAX_RANK else []


def cuda_decode_limits(symbol: str, unit: str = "tokens"):
    """The limits of a CUDA decode kernel of the adapter family (≤ MAX_DECODE_TOKENS tokens, rank ≤ MAX_RANK),
    which builds the extension on first use; `symbol` is its binding, `unit` names its rows in messages."""

    def limits(problem: backends.Problem) -> list[str]:
        reasons = []
        tokens, rank = problem.sizes.get("tokens", 0), problem.sizes.get("rank", 0)
        if tokens > MAX_DECODE_TOKENS:
            reasons.append(f"the CUDA decode kernel serves at most {MAX_DECODE_TOKENS} {unit}; got {tokens}")
        if rank > MAX_RANK:
            reasons.append(f"rank {rank} exceeds the CUDA kernel's limit of {MAX_RANK}")
        if not reasons:
            reasons += backends.cuda_extension_load_reasons(symbol)
        return reasons

    return limits


backends.register(backends.Implementation(
    op=OP, backend="torch", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES + (torch.float64,), has_backward=True,
    functions={"forward": _torch_forward, "backward": _torch_backward},
))
backends.register(backends.Implementation(
    op=OP, backend="triton", devices=("cuda",), dtypes=FLOAT_DTYPES, has_backward=True,
    functions={"forward": _triton_forward, "backward": _triton_backward},
    environment_reasons=backends.triton_environment_reasons, limits=_triton_limits,
))
backends.register(backends.Implementation(
    op=OP, backend="cuda", devices=("cuda",), dtypes=FLOAT_DTYPES, has_backward=False,
    functions={"forward": _cuda_forward},
    environment_reasons=backends.cuda_extension_environment_reasons,
    limits=cuda_decode_limits("bottleneck_adapter_decode_forward"),
))
