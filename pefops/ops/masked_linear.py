"""Mask-tuning ops: linear layers whose frozen weight is masked by 1-bit packed masks.

    masked_linear(x, W, packed, b)              = x @ (W ⊙ M).T + b,   M = unpack(packed)
    masked_linear_scores(x, W, S, threshold, b) = same with M = (S > threshold), and the straight-
                                                  through gradient dS = (dyᵀ x) ⊙ W

Mask format: uint8 [out_features, ceil(in_features / 8)], bit j of byte b is input column 8·b + j
(numpy.packbits(..., axis=1, bitorder="little")), unused tail bits zero. W ⊙ M is never written to
memory by the kernels; the weight is frozen (no gradient).
"""

from __future__ import annotations

import collections
import numbers
import weakref
from typing import Callable, Optional

import torch

from pefops import backend as backends
from pefops.kernels.shared import unit_stride_rows
from pefops.ops.common import (FLOAT_DTYPES, check_float_dtype, check_index_tensor, check_like, compute_dtype, describe,
                               flat_rows, host_to_device, once_differentiable)

OP = "masked_linear"
MAX_DECODE_ROWS = 16
_BIT_TABLES = {}


# ------------------------------------------------------------------------------------ packing


def packed_columns(in_features: int) -> int:
    return (in_features + 7) // 8


def pack_mask(mask_or_scores: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
    """Pack a boolean (or 0/1) mask [out, in], or scores with `threshold` (mask = scores > threshold),
    into uint8 [out, ceil(in / 8)], little bit order, tail bits zero."""
    if not isinstance(mask_or_scores, torch.Tensor) or mask_or_scores.dim() != 2:
        raise ValueError(f"pack_mask expects a 2-D tensor [out_features, in_features]; got "
                         f"{tuple(mask_or_scores.shape) if isinstance(mask_or_scores, torch.Tensor) else type(mask_or_scores).__name__}")
    if threshold is not None:
        if not mask_or_scores.is_floating_point():
            raise ValueError(f"scores must be floating point when a threshold is given; got {mask_or_scores.dtype}")
        bits = mask_or_scores > threshold
    elif mask_or_scores.dtype == torch.bool:
        bits = mask_or_scores
    else:
        values = mask_or_scores
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError("pack_mask without a threshold expects a boolean or 0/1 mask; pass threshold= for scores")
        bits = values != 0
    out_features, in_features = bits.shape
    padded = packed_columns(in_features) * 8
    if padded != in_features:
        bits = torch.nn.functional.pad(bits, (0, padded - in_features))
    weights = _bit_weights(bits.device)
    return (bits.reshape(out_features, padded // 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The boolean mask [out, in_features] of a packed uint8 mask [out, ceil(in_features / 8)]."""
    _check_packed(packed, None, in_features)
    return _unpack_as(packed, in_features, torch.bool)


def _unpack_as(packed: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Unpack through a 256 × 8 lookup table (one gather instead of shifts and masks per bit: ~6×
    faster on CPU), straight into `dtype` (0/1 values, or bool)."""
    table = _bit_table(packed.device, dtype)
    bits = table.index_select(0, packed.reshape(-1).to(torch.int32))
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :in_features]


def _bit_table(device, dtype) -> torch.Tensor:
    key = ("table", str(device), dtype)
    if key not in _BIT_TABLES:
        byte_values = torch.arange(256, dtype=torch.int32, device=device)
        bits = (byte_values.unsqueeze(1) >> torch.arange(8, dtype=torch.int32, device=device)) & 1
        _BIT_TABLES[key] = bits.to(dtype)
    return _BIT_TABLES[key]


def _bit_weights(device) -> torch.Tensor:
    key = ("weights", str(device))
    if key not in _BIT_TABLES:
        _BIT_TABLES[key] = (1 << torch.arange(8, device=device)).to(torch.uint8)
    return _BIT_TABLES[key]


def _masked_weight(weight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """W ⊙ M materialised (the reference and CPU path only; the kernels never write it)."""
    return _unpack_as(packed, weight.shape[1], weight.dtype).mul_(weight)  # in place: one [out, in] buffer


def _check_packed(packed, out_features, in_features):
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed_mask must be a uint8 tensor [out_features, ceil(in_features / 8)]; got {got}")
    expected_columns = packed_columns(in_features)
    if packed.shape[1] != expected_columns or (out_features is not None and packed.shape[0] != out_features):
        rows = out_features if out_features is not None else packed.shape[0]
        raise ValueError(f"packed_mask must have shape ({rows}, {expected_columns}) for a weight with "
                         f"in_features={in_features}; got {tuple(packed.shape)}")


# ------------------------------------------------------------------------------------ reference


def masked_linear_ref(x, weight, packed_mask, bias=None):
    """x @ (W ⊙ M).T + b with W ⊙ M materialised: the CPU path, the oracle and the benchmark's eager."""
    return torch.nn.functional.linear(x, _masked_weight(weight, packed_mask), bias)


class _StraightThroughMask(torch.autograd.Function):
    """M = (S > threshold) forward; dS = dM (straight-through) backward."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def masked_linear_scores_ref(x, weight, scores, threshold, bias=None):
    """Training form: M = (S > threshold) with the straight-through estimator, so dS = (dyᵀx) ⊙ W."""
    mask = _StraightThroughMask.apply(scores, float(threshold))
    return torch.nn.functional.linear(x, weight * mask.to(weight.dtype), bias)


# ------------------------------------------------------------------------------------ validation


def _check_common(x, weight, bias):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features]; got {describe(weight)}")
    out_features, in_features = weight.shape
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., in_features={in_features}]; got {describe(x)}")
    check_float_dtype("x", x.dtype)
    check_like("weight", weight, "x", x)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be [out_features={out_features}]; got {describe(bias)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must match x ({x.dtype}, {x.device}); got {bias.dtype}, {bias.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("the weight of a masked linear layer is frozen: call weight.requires_grad_(False); "
                         "train the scores (masked_linear_scores) and the bias instead")
    return out_features, in_features


# ------------------------------------------------------------------------------------ custom ops


def _problem(x2, weight, mode):
    return backends.Problem(x2.device, x2.dtype, mode, {"rows": x2.shape[0], "out_features": weight.shape[0],
                                                        "in_features": weight.shape[1],
                                                        "weight_contiguous": int(weight.is_contiguous())})


def _serve(x2, weight, mode, backend, role, *args):
    implementation = backends.select(OP, _problem(x2, weight, mode), backend or None)
    return implementation.functions[role](*args)


@torch.library.custom_op("pefops::masked_linear_fwd", mutates_args=())
def _masked_linear_fwd(x: torch.Tensor, weight: torch.Tensor, packed_mask: torch.Tensor,
                       bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _serve(x, weight, "forward", backend, "forward", x, weight, packed_mask, bias)


@_masked_linear_fwd.register_fake
def _(x, weight, packed_mask, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("pefops::masked_linear_scores_fwd", mutates_args=())
def _masked_linear_scores_fwd(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: float,
                              bias: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    implementation = backends.select(OP, _problem(x, weight, "forward"), backend or None)
    packed = implementation.functions["pack"](scores, threshold)
    return implementation.functions["forward"](x, weight, packed, bias), packed


@_masked_linear_scores_fwd.register_fake
def _(x, weight, scores, threshold, bias, backend):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((weight.shape[0], packed_columns(weight.shape[1])), dtype=torch.uint8))


def _define_backward_op(role: str, schema: str, rows_and_weight: Callable, fake_output: Callable):
    """The backward custom op pefops::masked_linear_<role> with `schema` (three tensors, then the
    backend): the selected backend's `role` function of the three tensors, chosen on the rows operand
    and the weight that `rows_and_weight` picks from them; `fake_output` makes the fake's result."""

    def kernel(first, second, third, backend):
        rows, weight = rows_and_weight(first, second, third)
        return _serve(rows, weight, "backward", backend, role, first, second, third)

    op = torch.library.custom_op(f"pefops::masked_linear_{role}", kernel, mutates_args=(), schema=schema)
    op.register_fake(lambda first, second, third, backend: fake_output(first, second, third))
    return op


_masked_linear_grad_input = _define_backward_op(
    "grad_input", "(Tensor grad, Tensor weight, Tensor packed_mask, str backend) -> Tensor",
    rows_and_weight=lambda grad, weight, packed_mask: (grad, weight),
    fake_output=lambda grad, weight, packed_mask: grad.new_empty((grad.shape[0], weight.shape[1])),
)
_masked_linear_grad_scores = _define_backward_op(
    "grad_scores", "(Tensor grad, Tensor x, Tensor weight, str backend) -> Tensor",
    rows_and_weight=lambda grad, x, weight: (x, weight),
    fake_output=lambda grad, x, weight: x.new_empty(tuple(weight.shape), dtype=compute_dtype(x.dtype)),
)


def _input_and_bias_grads(ctx, grad, weight, packed):
    dx = _masked_linear_grad_input(grad.contiguous(), weight, packed, ctx.backend) if ctx.needs_x else None
    dbias = grad.sum(0) if ctx.needs_bias else None
    return dx, dbias


def _setup_fwd(ctx, inputs, output):
    x, weight, packed, bias, backend = inputs
    ctx.save_for_backward(weight, packed)
    ctx.backend, ctx.needs_x, ctx.needs_bias = backend, ctx.needs_input_grad[0], ctx.needs_input_grad[3]


@once_differentiable("masked_linear")
def _backward_fwd(ctx, grad):
    weight, packed = ctx.saved_tensors
    dx, dbias = _input_and_bias_grads(ctx, grad, weight, packed)
    return dx, None, None, dbias, None


def _setup_scores(ctx, inputs, output):
    x, weight, scores, threshold, bias, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend, ctx.needs_x, ctx.needs_bias = backend, ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    ctx.needs_scores, ctx.scores_dtype = ctx.needs_input_grad[2], scores.dtype


@once_differentiable("masked_linear_scores")
def _backward_scores(ctx, grad, _grad_packed):
    x, weight, packed = ctx.saved_tensors
    dx, dbias = _input_and_bias_grads(ctx, grad, weight, packed)
    dscores = None
    if ctx.needs_scores:
        dscores = _masked_linear_grad_scores(grad.contiguous(), x, weight, ctx.backend).to(ctx.scores_dtype)
    return dx, None, dscores, None, dbias, None


_masked_linear_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
_masked_linear_scores_fwd.register_autograd(_backward_scores, setup_context=_setup_scores)


# ------------------------------------------------------------------------------------ public ops


def masked_linear(x, weight, packed_mask, bias=None, *, backend=None):
    """Inference form: x @ (weight ⊙ unpack(packed_mask)).T + bias. x [..., in]; weight [out, in]
    (frozen; any strides, e.g. a transposed Conv1D weight); packed_mask uint8 [out, ceil(in/8)];
    gradients for x and bias."""
    out_features, in_features = _check_common(x, weight, bias)
    _check_packed(packed_mask, out_features, in_features)
    if packed_mask.device != x.device:
        raise ValueError(f"packed_mask must be on x's device {x.device}; got {packed_mask.device}")
    x2 = unit_stride_rows(flat_rows(x, in_features))
    if x2.numel() == 0 or out_features == 0 or backends.eager_torch(OP, _problem(x2, weight, "forward"), backend):
        # (an empty problem, no rows or no features, launches nothing whatever the backend: the
        # reference under autograd gives the empty or zero output and gradients)
        out = masked_linear_ref(x2, weight, packed_mask, bias)
    else:
        out = _masked_linear_fwd(x2, weight, packed_mask.contiguous(), bias, backend or "")
    return out.reshape(*x.shape[:-1], out_features)


def masked_linear_scores(x, weight, scores, threshold, bias=None, *, backend=None):
    """Training form: the mask is (scores > threshold); gradients for x, scores (straight-through:
    (dyᵀ x) ⊙ W) and bias. scores [out, in], any float dtype."""
    out_features, in_features = _check_common(x, weight, bias)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (out_features, in_features):
        raise ValueError(f"scores must be [out_features={out_features}, in_features={in_features}]; got {describe(scores)}")
    if not scores.is_floating_point() or scores.device != x.device:
        raise ValueError(f"scores must be floating point on x's device {x.device}; got {describe(scores)}")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise ValueError(f"threshold must be a float; got {type(threshold).__name__}")
    x2 = unit_stride_rows(flat_rows(x, in_features))
    # an empty problem as in masked_linear
    if x2.numel() == 0 or out_features == 0 or backends.eager_torch(OP, _problem(x2, weight, "forward"), backend):
        out = masked_linear_scores_ref(x2, weight, scores, threshold, bias)
    else:
        out = _masked_linear_scores_fwd(x2, weight, scores, float(threshold), bias, backend or "")[0]
    return out.reshape(*x.shape[:-1], out_features)


# ------------------------------------------------------------------------------------ backends


def _torch_forward(x, weight, packed, bias):
    return masked_linear_ref(x, weight, packed, bias)


def _torch_grad_input(grad, weight, packed):
    return grad @ _masked_weight(weight, packed)


def _torch_grad_scores(grad, x, weight):
    cdt = compute_dtype(x.dtype)
    return (grad.to(cdt).t() @ x.to(cdt)) * weight.to(cdt)


def _triton(name):
    def call(*args):
        return getattr(backends.import_kernels("masked_linear"), name)(*args)

    call.__name__ = name
    return call


def _cuda_forward(x, weight, packed, bias):
    from pefops import csrc

    empty = x.new_empty(0)
    return csrc.load().masked_linear_decode_forward(x.contiguous(), weight, packed, bias if bias is not None else empty)


def _cuda_limits(problem: backends.Problem) -> list[str]:
    reasons = []
    rows = problem.sizes.get("rows", 0)
    if rows > MAX_DECODE_ROWS:
        reasons.append(f"the CUDA decode kernel serves at most {MAX_DECODE_ROWS} rows; got {rows}")
    if not problem.sizes.get("weight_contiguous", 1):
        reasons.append("the CUDA decode kernel needs a contiguous [out, in] weight (a transposed Conv1D weight is not)")
    if not reasons:
        reasons += backends.cuda_extension_load_reasons("masked_linear_decode_forward")
    return reasons


backends.register(backends.Implementation(
    op=OP, backend="torch", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES + (torch.float64,), has_backward=True,
    functions={"forward": _torch_forward, "grad_input": _torch_grad_input, "grad_scores": _torch_grad_scores,
               "pack": lambda scores, threshold: pack_mask(scores, threshold)},
))
backends.register(backends.Implementation(
    op=OP, backend="triton", devices=("cuda",), dtypes=FLOAT_DTYPES, has_backward=True,
    functions={"forward": _triton("masked_linear_forward"), "grad_input": _triton("masked_linear_grad_input"),
               "grad_scores": _triton("masked_linear_grad_scores"), "pack": _triton("pack_mask_from_scores")},
    environment_reasons=backends.triton_environment_reasons,
))
backends.register(backends.Implementation(
    op=OP, backend="cuda", devices=("cuda",), dtypes=FLOAT_DTYPES, has_backward=False,
    functions={"forward": _cuda_forward, "pack": lambda scores, threshold: pack_mask(scores, threshold)},
    environment_reasons=backends.cuda_extension_environment_reasons, limits=_cuda_limits,
))


# ------------------------------------------------------------------------------------ per-row tasks

# The plans of the latest routing indices of direct calls, most recent last; a new index object, or
# an in-place change of it (its _version), makes a new plan. MaskedLinear.set_row_masks plans its
# layer's index itself (build_routing_plan) and keeps the plan with the routing, so a model's forward
# never plans: planning there would leave small long-lived tensors between the forward's large
# activations, which on CPU (glibc) kept the heap from being reused and slowed every later GEMM.
_ROUTING_PLAN_LIMIT = 8
_ROUTING_PLAN: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
# plans built so far (tests count them: one per routing index, none per call)
ROUTING_PLAN_STATS = {"plans": 0}


def _routing_plan(row_task: torch.Tensor, tasks: int, device) -> tuple:
    """build_routing_plan, cached for the same index object at the same version (an inference
    tensor has no version to check: planned every call)."""
    slot = (id(row_task), tasks, torch.device(device), row_task.device)
    key = None if row_task.is_inference() else (row_task._version, tuple(row_task.shape))
    cached = _ROUTING_PLAN.get(slot)
    if key is not None and cached is not None and cached[0]() is row_task and cached[1] == key:
        _ROUTING_PLAN.move_to_end(slot)
        return cached[2]
    plan = build_routing_plan(row_task, tasks, device)
    if key is not None:
        _ROUTING_PLAN[slot] = (weakref.ref(row_task), key, plan)
        _ROUTING_PLAN.move_to_end(slot)
        while len(_ROUTING_PLAN) > _ROUTING_PLAN_LIMIT:
            _ROUTING_PLAN.popitem(last=False)
    return plan


def build_routing_plan(row_task: torch.Tensor, tasks: int, device) -> tuple:
    """(order, sorted_task, position on `device`, the longest task's row count) for row_task [B].

    A CPU row_task (the usual case: task ids from the data loader) is planned and range-checked on
    the host and copied over without waiting for the device (pinned, non-blocking). A CUDA row_task
    costs one host read (range and longest segment, which sizes the padded batch)."""
    ROUTING_PLAN_STATS["plans"] += 1
    batch = row_task.numel()
    if row_task.device.type == "cpu":
        task = row_task.to(torch.long)
        _check_task_range(task, tasks)
        counts = torch.bincount(task, minlength=tasks)
        length = _host_int(counts.max()) if batch else 0
        order = torch.argsort(task, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        sorted_task = task[order]
        position = torch.arange(batch) - starts[sorted_task]
        return (*(host_to_device(tensor, device) for tensor in (order, sorted_task, position)), length)
    task = row_task.to(device=device, dtype=torch.long)
    in_range = (task >= 0) & (task < tasks)
    counts = torch.zeros(tasks, dtype=torch.long, device=device).scatter_add_(
        0, task.clamp(0, max(tasks - 1, 0)), in_range.to(torch.long))
    # the one host read per routing index: range check and the padded length
    low, high, length = (torch.stack([task.min(), task.max(), counts.max()]).tolist() if batch else (0, 0, 0))
    if batch and (low < 0 or high >= tasks):
        raise ValueError(f"row_task values must be in [0, {tasks}); got {low}..{high}")
    order = torch.argsort(task, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_task = task[order]
    position = torch.arange(batch, device=device) - starts[sorted_task]
    return order, sorted_task, position, int(length)


def _host_int(value: torch.Tensor) -> int:
    """int() of a CPU tensor (a host read that waits for no device)."""
    return int(value)


def _check_task_range(task: torch.Tensor, tasks: int) -> None:
    """Range check of a CPU task index (no device involved)."""
    if task.numel():
        low, high = _host_int(task.min()), _host_int(task.max())
        if low < 0 or high >= tasks:
            raise ValueError(f"row_task values must be in [0, {tasks}); got {low}..{high}")


def masked_linear_routed(x, weight, packed_masks, row_task, bias=None, *, _plan=None):
    """Mixed-task batch of masked layers: sequence b of x [B, ..., in] uses mask
    packed_masks[row_task[b]] (packed_masks: uint8 [N, out, ceil(in / 8)], one task mask each) over
    the one shared weight. Vectorised (no loop over tasks): rows are sorted by task into padded
    segments and multiplied by the N masked weights in one batched product. Gradients for x and
    bias. (_plan: MaskedLinear's build_routing_plan of this very row_task, made with its routing.)"""
    out_features, in_features = _check_common(x, weight, bias)
    if not isinstance(packed_masks, torch.Tensor) or packed_masks.dim() != 3:
        raise ValueError(f"packed_masks must be uint8 [tasks, out, ceil(in / 8)]; got {describe(packed_masks)}")
    for task in range(packed_masks.shape[0]):
        _check_packed(packed_masks[task], out_features, in_features)
    tasks = packed_masks.shape[0]
    check_index_tensor(row_task, "row_task", f"[{x.shape[0]}] (one task per sequence, int64)")
    if row_task.dim() != 1 or row_task.numel() != x.shape[0]:
        raise ValueError(f"row_task must be an integer tensor [{x.shape[0]}] (one task per sequence); got {describe(row_task)}")
    batch = x.shape[0]
    order, sorted_task, position, length = _plan if _plan is not None else _routing_plan(row_task, tasks, x.device)
    if x.numel() == 0 or out_features == 0:
        # empty: no rows (or features), so no mask selects anything; with in_features = 0 every
        # output is the bias. Plain linear gives that, and its empty or zero gradients
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(batch, x[0].numel())  # [B, T·in]
    padded = rows.new_zeros(tasks, length, rows.shape[1])
    padded = padded.index_put((sorted_task, position), rows[order])
    bits = _unpack_as(flat_rows(packed_masks, packed_masks.shape[-1]), in_features, weight.dtype)
    effective = bits.reshape(tasks, out_features, in_features) * weight  # [N, out, in]
    products = torch.bmm(padded.reshape(tasks, -1, in_features), effective.transpose(1, 2))  # [N, L·T, out]
    products = products.reshape(tasks, length, -1)
    out = torch.empty(batch, products.shape[-1], dtype=products.dtype, device=x.device)
    out = out.index_put((order,), products[sorted_task, position])
    out = out.reshape(*x.shape[:-1], out_features)
    return out if bias is None else out + bias
