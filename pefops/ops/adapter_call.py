"""One validated call of the bottleneck-adapter family (bottleneck_adapter, multi_adapter), by name.

`AdapterCall` carries a call from validation to the backends: the public ops build one, the torch,
Triton and CUDA backends receive it. It is flattened to the torch.library custom ops' parameters by
name in one method (`schema_arguments`; `forward_arguments` for the forward op) and rebuilt from
them by name (`from_schema_arguments`). The custom-op schemas stay flat (tensors, floats, ints,
bools) so that torch.compile and fake tensors see ordinary operator arguments; the kernel launchers
take the fields by position (their `scale` is the call's `scaling`).

Names, one per concept: `scaling` a learnable scaling tensor (None: the float `scaling_value`
serves); `layer_norm` whether a LayerNorm follows the sum, with `ln_weight`, `ln_bias` (each
may be None) and `ln_eps`; `activation` the activation code (pefops.ops.activations);
`index` the adapter of each row (multi_adapter), None for one adapter.

This module also holds what the two families share: the definition of their custom ops from one
parameter table (define_custom_ops: kernels, fakes, autograd), argument checks, the LayerNorm over
the sum and its backward, and the backends' registration and limits.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Mapping, Optional

import torch

from pefops import backend as backends
from pefops.kernels.shared import MAX_RANK
from pefops.ops.common import FLOAT_DTYPES, compute_dtype, once_differentiable

MAX_DECODE_TOKENS = 16

# (name, schema type) of the forward and backward custom ops' parameters, in order (bottleneck_adapter_fwd
# / _bwd); the routed ops (multi_adapter_fwd / _bwd) take `index` after `x`. Written out rather than
# inferred from annotations so that both families define their ops from this one table.
FORWARD_PARAMETERS = (
    ("x", "Tensor"), ("down_weight", "Tensor"), ("down_bias", "Tensor?"), ("up_weight", "Tensor"),
    ("up_bias", "Tensor?"), ("scaling", "Tensor?"), ("scaling_value", "float"), ("residual", "Tensor?"),
    ("ln_weight", "Tensor?"), ("ln_bias", "Tensor?"), ("ln_eps", "float"), ("layer_norm", "bool"),
    ("activation", "SymInt"), ("negative_slope", "float"), ("backend", "str"),
)
FORWARD_RETURNS = "(Tensor, Tensor, Tensor, Tensor)"  # out, z, mean, rstd
BACKWARD_PARAMETERS = (
    ("grad_out", "Tensor"), ("x", "Tensor"), ("down_weight", "Tensor"), ("down_bias", "Tensor?"),
    ("up_weight", "Tensor"), ("up_bias", "Tensor?"), ("scaling", "Tensor?"), ("scaling_value", "float"),
    ("residual", "Tensor?"), ("ln_weight", "Tensor?"), ("ln_bias", "Tensor?"), ("layer_norm", "bool"),
    ("z", "Tensor"), ("mean", "Tensor"), ("rstd", "Tensor"), ("activation", "SymInt"), ("negative_slope", "float"),
    ("grad_mask", "bool[]"), ("backend", "str"),
)
BACKWARD_RETURNS = "Tensor[]"  # gradients in GRAD_NAMES order


def routed_parameters(parameters: tuple) -> tuple:
    """The parameters with the routing index after x (multi_adapter's ops)."""
    position = [name for name, _ in parameters].index("x") + 1
    return parameters[:position] + (("index", "Tensor"),) + parameters[position:]


def parameter_names(parameters: tuple) -> tuple:
    return tuple(name for name, _ in parameters)


# the gradients the backward op returns, in this order (and its grad mask)
GRAD_NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual", "ln_weight", "ln_bias")
TENSOR_FIELDS = ("x", "index", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual",
                 "ln_weight", "ln_bias")


@dataclasses.dataclass(frozen=True)
class AdapterCall:
    """One validated call, the same object from the public op to the backends (and, flattened, through
    the custom ops). Tensors are as the backends take them: x and residual [tokens, hidden]."""

    x: torch.Tensor  # [tokens, hidden]
    down_weight: torch.Tensor  # [rank, hidden]; [adapters, rank, hidden] when routed
    down_bias: Optional[torch.Tensor]  # [rank]; [adapters, rank]
    up_weight: torch.Tensor  # [hidden, rank]; [adapters, hidden, rank]
    up_bias: Optional[torch.Tensor]  # [hidden]; [adapters, hidden]
    scaling: Optional[torch.Tensor]  # [] or [hidden]; routed: [adapters] or [adapters, hidden]
    scaling_value: float  # the scale when scaling is None
    residual: Optional[torch.Tensor]  # [tokens, hidden]; None: x is the residual
    ln_weight: Optional[torch.Tensor]  # [hidden]
    ln_bias: Optional[torch.Tensor]  # [hidden]
    layer_norm: bool  # a LayerNorm (ln_weight, ln_bias, ln_eps) follows the sum
    activation: int  # pefops.ops.activations code
    negative_slope: float  # of leaky_relu
    # the backward op's schema has no eps (the backward uses the saved statistics): calls rebuilt
    # there carry NaN, which no backward reads
    ln_eps: float = math.nan
    index: Optional[torch.Tensor] = None  # [tokens] int64, the adapter of each row

    @classmethod
    def from_schema_arguments(cls, arguments: Mapping[str, object]) -> "AdapterCall":
        """The call named by a custom op's arguments (`arguments` by parameter name); names that are
        not fields (backend, grad_out, z, ...) are passed over."""
        return cls(**{name: arguments[name] for name in FIELD_NAMES if name in arguments})

    def schema_arguments(self, schema: tuple, **others) -> tuple:
        """This call flattened to a custom op's parameters named `schema`, in order; `others` gives
        those that are not fields (backend, grad_out, z, mean, rstd, grad_mask)."""
        return tuple(others[name] if name in others else getattr(self, name) for name in schema)

    def with_index(self, index: torch.Tensor) -> "AdapterCall":
        return dataclasses.replace(self, index=index)

    def forward_arguments(self, backend: str) -> tuple:
        """This call as the arguments of its family's forward custom op (the routed one's when the call
        has an index): the one flattening of a call to the ops' flat schema."""
        parameters = routed_parameters(FORWARD_PARAMETERS) if self.routed else FORWARD_PARAMETERS
        return self.schema_arguments(parameter_names(parameters), backend=backend)

    @property
    def routed(self) -> bool:
        return self.index is not None

    @property
    def rank(self) -> int:
        return self.down_weight.shape[-2]

    @property
    def adapters(self) -> int:
        return self.down_weight.shape[0] if self.routed else 1

    def problem(self, mode: str) -> backends.Problem:
        tokens, hidden = self.x.shape
        sizes = {"tokens": tokens, "hidden": hidden, "rank": self.rank}
        if self.routed:
            sizes["adapters"] = self.adapters
        return backends.Problem(self.x.device, self.x.dtype, mode, sizes)

    def residual_or_x(self) -> torch.Tensor:
        return self.x if self.residual is None else self.residual


# looked up once: dataclasses.fields() per call costs more than the rest of the flattening
FIELD_NAMES = tuple(field.name for field in dataclasses.fields(AdapterCall))
SETTINGS_FIELDS = tuple(name for name in FIELD_NAMES if name not in TENSOR_FIELDS)  # what ctx keeps besides tensors


# ------------------------------------------------------------------------------------ validation


def check_scaling_value(scaling) -> float:
    """A float scaling (ValueError for anything but a real number; bool is refused)."""
    if isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        return float(scaling)
    raise ValueError(f"scaling must be a float or a tensor; got {type(scaling).__name__}")


def check_scaling_tensor(scaling: torch.Tensor, device) -> None:
    if not scaling.is_floating_point():
        raise ValueError(f"scaling tensor must be floating point; got {scaling.dtype}")
    if scaling.device != device:
        raise ValueError(f"scaling must be on x's device {device}; got {scaling.device}")


def check_layer_norm(layer_norm, x: torch.Tensor) -> tuple:
    """(ln_weight, ln_bias, ln_eps) of a layer_norm=(weight or None, bias or None, eps) argument,
    (None, None, 1e-5) for None; ValueError for a malformed one. Shapes are checked with the operands."""
    if layer_norm is None:
        return None, None, 1e-5
    if not isinstance(layer_norm, (tuple, list)) or len(layer_norm) != 3:
        raise ValueError("layer_norm must be a tuple (weight or None, bias or None, eps)")
    ln_weight, ln_bias, ln_eps = layer_norm
    if not isinstance(ln_eps, numbers.Real) or ln_eps <= 0:
        raise ValueError(f"layer_norm eps must be a positive float; got {ln_eps!r}")
    if x.shape[-1] == 0:
        raise ValueError("layer_norm over hidden size 0 has no meaning (no values to normalise); x has shape "
                         f"{tuple(x.shape)}: pass layer_norm=None or a hidden size >= 1")
    return ln_weight, ln_bias, float(ln_eps)


def check_adapter_operands(x: torch.Tensor, down_weight: torch.Tensor, down_bias, up_weight, up_bias, residual,
                           layer_norm, adapters: Optional[int] = None) -> tuple:
    """The operands of an adapter (of a stack of `adapters`, each weight and bias with a leading
    [adapters]) against x [..., hidden] and down_weight's rank: shapes, x's dtype and device
    (ValueError). Returns (ln_weight, ln_bias, ln_eps) of the layer_norm argument (check_layer_norm)."""
    hidden, rank = x.shape[-1], down_weight.shape[-2]
    stack = () if adapters is None else (adapters,)
    if up_weight is None:
        sizes = ("" if adapters is None else f"adapters={adapters}, ") + f"hidden={hidden}, rank={rank}"
        raise ValueError(f"up_weight must be a tensor [{sizes}]; got None")
    expected = {
        "down_weight": (down_weight, (*stack, rank, hidden)),
        "down_bias": (down_bias, (*stack, rank)),
        "up_weight": (up_weight, (*stack, hidden, rank)),
        "up_bias": (up_bias, (*stack, hidden)),
    }
    if residual is not None:
        expected["residual"] = (residual, tuple(x.shape))
    ln_weight, ln_bias, ln_eps = check_layer_norm(layer_norm, x)
    if layer_norm is not None:
        expected["layer_norm weight"] = (ln_weight, (hidden,))
        expected["layer_norm bias"] = (ln_bias, (hidden,))
    check_operands(expected, x, f"rank {rank}" if adapters is None else f"{adapters} adapters of rank {rank}")
    return ln_weight, ln_bias, ln_eps


def check_operands(expected: Mapping[str, tuple], x: torch.Tensor, sizes: str) -> None:
    """Every operand in `expected` (name -> (tensor or None, shape)) is None or a tensor of that
    shape with x's dtype and device; `sizes` describes the adapter sizes in shape errors."""
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape {shape}; got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (x is {tuple(x.shape)}, {sizes}); "
                             f"got {tuple(tensor.shape)}")
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}; got {tensor.dtype} "
                             "(cast the adapter or the input)")
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {tensor.device}")


# ------------------------------------------------------------------------------------ torch math


def layer_norm_forward(y: torch.Tensor, call: AdapterCall):
    """(out, mean [T], rstd [T]) of the call's LayerNorm over y in y's dtype; (y, [0], [0]) without."""
    if not call.layer_norm:
        return y, y.new_empty(0), y.new_empty(0)
    weight = None if call.ln_weight is None else call.ln_weight.to(y.dtype)
    bias = None if call.ln_bias is None else call.ln_bias.to(y.dtype)
    out, mean, rstd = torch.native_layer_norm(y, [y.shape[-1]], weight, bias, call.ln_eps)
    return out, mean.reshape(-1), rstd.reshape(-1)


def layer_norm_backward(grad: torch.Tensor, y: torch.Tensor, call: AdapterCall, mean, rstd, need: Mapping[str, bool]):
    """(dy, d_ln_weight, d_ln_bias) through ATen's fused LayerNorm backward, in grad's dtype."""
    weight = None if call.ln_weight is None else call.ln_weight.to(grad.dtype)
    bias = None if call.ln_bias is None else call.ln_bias.to(grad.dtype)
    return torch.ops.aten.native_layer_norm_backward(
        grad, y, [y.shape[-1]], mean.reshape(-1, 1), rstd.reshape(-1, 1), weight, bias,
        [True, need["ln_weight"] and weight is not None, need["ln_bias"] and bias is not None],
    )


def contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


# ------------------------------------------------------------------------------------ custom-op glue


def _named(names: tuple, args: tuple, kwargs: Mapping) -> dict:
    arguments = dict(zip(names, args))
    if kwargs:  # the dispatcher passes positional arguments; a direct call may name them
        arguments.update(kwargs)
    return arguments


def _fake_forward(*, x, call: AdapterCall, **_):
    """out like x, z [T, rank] and the statistics ([T], or [0] without LayerNorm)."""
    cdt = compute_dtype(x.dtype)
    stats = x.shape[0] if call.layer_norm else 0
    return (x.new_empty(x.shape), x.new_empty((x.shape[0], call.rank), dtype=cdt),
            x.new_empty((stats,), dtype=cdt), x.new_empty((stats,), dtype=cdt))


def _fake_backward(*, x, call: AdapterCall, grad_mask, **_):
    """A gradient like each input the grad mask asks for, else an empty tensor."""
    inputs = [getattr(call, name) for name in GRAD_NAMES]
    return [x.new_empty(reference.shape, dtype=reference.dtype) if needed and reference is not None
            else x.new_empty(0) for needed, reference in zip(grad_mask, inputs)]


def _serve_forward(*, op, call: AdapterCall, backend, **_):
    return backends.select(op, call.problem("forward"), backend or None).functions["forward"](call)


def _serve_backward(*, op, call: AdapterCall, grad_out, z, mean, rstd, grad_mask, backend, **_) -> list:
    """Gradients in GRAD_NAMES order, each in its input's dtype and shape; custom ops return tensors
    only, so an empty tensor stands for "not needed"."""
    implementation = backends.select(op, call.problem("backward"), backend or None)
    grads = implementation.functions["backward"](grad_out, call, z, mean, rstd, list(grad_mask))
    inputs = [getattr(call, name) for name in GRAD_NAMES]
    return [grad.to(reference.dtype).reshape(reference.shape) if grad is not None else call.x.new_empty(0)
            for grad, reference in zip(grads, inputs)]


def _by_name(op: str, names: tuple, body: Callable) -> Callable:
    """A custom op's kernel (or fake) over its flat parameters: `body` gets them by name, and the call."""

    def kernel(*args, **kwargs):
        arguments = _named(names, args, kwargs)
        return body(op=op, call=AdapterCall.from_schema_arguments(arguments), **arguments)

    return kernel


def _schema(parameters: tuple, returns: str) -> str:
    return "(" + ", ".join(f"{kind} {name}" for name, kind in parameters) + ") -> " + returns


def define_custom_ops(op: str, routed: bool):
    """The forward and backward custom ops pefops::<op>_fwd / _bwd of one family (routed: with the
    index), with their fakes and the autograd formula; returns (forward_op, backward_op). Calls reach
    them through AdapterCall.forward_arguments."""
    forward_parameters = routed_parameters(FORWARD_PARAMETERS) if routed else FORWARD_PARAMETERS
    backward_parameters = routed_parameters(BACKWARD_PARAMETERS) if routed else BACKWARD_PARAMETERS
    forward_names, backward_names = parameter_names(forward_parameters), parameter_names(backward_parameters)
    forward_op = torch.library.custom_op(f"pefops::{op}_fwd", _by_name(op, forward_names, _serve_forward),
                                         mutates_args=(), schema=_schema(forward_parameters, FORWARD_RETURNS))
    backward_op = torch.library.custom_op(f"pefops::{op}_bwd", _by_name(op, backward_names, _serve_backward),
                                          mutates_args=(), schema=_schema(backward_parameters, BACKWARD_RETURNS))
    forward_op.register_fake(_by_name(op, forward_names, _fake_forward))
    backward_op.register_fake(_by_name(op, backward_names, _fake_backward))

    def setup_context(ctx, inputs, output):
        # by name from the op's arguments (no call is built here: this runs on every forward); the
        # single-adapter ops have no index, which is then saved as None
        arguments = dict(zip(forward_names, inputs))
        _, z, mean, rstd = output
        ctx.save_for_backward(*(arguments.get(name) for name in TENSOR_FIELDS), z, mean, rstd)
        ctx.settings = {name: arguments[name] for name in SETTINGS_FIELDS}  # the tensors are saved above
        ctx.backend = arguments["backend"]

    @once_differentiable(op)
    def backward(ctx, grad_out, _grad_z, _grad_mean, _grad_rstd):
        *tensors, z, mean, rstd = ctx.saved_tensors
        call = AdapterCall(**ctx.settings, **dict(zip(TENSOR_FIELDS, tensors)))
        needs = dict(zip(forward_names, ctx.needs_input_grad))
        grad_mask = [needs[name] for name in GRAD_NAMES]
        # without LayerNorm the residual's gradient is grad_out itself: no backward launch for it
        residual_passthrough = needs["residual"] and not call.layer_norm
        if residual_passthrough:
            grad_mask[GRAD_NAMES.index("residual")] = False
        grads = dict.fromkeys(GRAD_NAMES)
        if any(grad_mask):
            outputs = backward_op(*call.schema_arguments(
                backward_names, grad_out=grad_out.contiguous(), z=z, mean=mean, rstd=rstd, grad_mask=grad_mask,
                backend=ctx.backend,
            ))
            grads = {name: grad if needed else None for name, grad, needed in zip(GRAD_NAMES, outputs, grad_mask)}
        if residual_passthrough:
            grads["residual"] = grad_out
        return tuple(grads.get(name) for name in forward_names)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op, backward_op


# ------------------------------------------------------------------------------------ limits


def triton_limits(problem: backends.Problem) -> list[str]:
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


def register_backends(op: str, torch_functions: Mapping, triton_functions: Mapping, cuda_forward: Callable,
                      cuda_symbol: str, cuda_unit: str) -> None:
    """The family's three backends: torch and Triton with backward, the CUDA decode kernel forward only."""
    backends.register_torch_and_triton(op, dtypes=FLOAT_DTYPES, torch_functions=torch_functions,
                                       triton_functions=triton_functions, triton_limits=triton_limits)
    backends.register(backends.Implementation(
        op=op, backend="cuda", devices=("cuda",), dtypes=FLOAT_DTYPES, has_backward=False,
        functions={"forward": cuda_forward}, environment_reasons=backends.cuda_extension_environment_reasons,
        limits=cuda_decode_limits(cuda_symbol, cuda_unit),
    ))
