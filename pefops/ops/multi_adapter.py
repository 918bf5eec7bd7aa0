"""Mixed-task batches of bottleneck adapters: every row of a batch uses its own adapter, one launch.

N adapters of one shape are stacked: down_weight [N, r, H], down_bias [N, r], up_weight [N, H, r],
up_bias [N, H]; adapter_index says which adapter each sequence (or row) uses. For a row of adapter i

    y   = residual + s_i * (act(x @ down_weight[i].T + down_bias[i]) @ up_weight[i].T + up_bias[i])
    out = LayerNorm(y)   when layer_norm=(weight, bias, eps) is given (one LayerNorm, shared), else y

which is pefops.ops.bottleneck_adapter with adapter i's weights, row by row. Gradients reach x, the
residual, every stacked weight and bias (adapter i's slices only from adapter i's rows; an adapter
without rows gets zeros), the scaling and the LayerNorm parameters.

The forward custom op returns (out, z, mean, rstd) as bottleneck_adapter's does (z [tokens, r] the
fp32 pre-activation, mean / rstd the LayerNorm row statistics); the backward is a custom op too.

Backends:
  torch   vectorised, no Python loop over adapters: the rows are sorted by adapter into a padded
          [chunks, length, H] layout (every adapter's rows cut into chunks of one common length,
          length = ceil(rows / adapters used), so padding at most doubles the rows) and each
          projection is one batched GEMM over the chunks' gathered weights; gradients of the stacked
          weights come back with index_add. Its padded layout needs its sizes on the host: one host
          read per routing index (the layout is part of the index's plan, see below), none for a
          CPU index.
  triton  grouped GEMM kernels (kernels/multi_adapter.py): the rows are gathered through an
          adapter-sorted order inside the kernels, no sorted copy of x, no host synchronisation.
  cuda    forward at decode shapes (<= 16 rows): csrc/multi_adapter_decode.cu, each row reading its
          own adapter's weights (no sorting).

Routing plans: what depends only on the routing index (its flat copy, the Triton kernels' row
grouping, the torch backend's padded layout) is built once per index tensor and reused by the
forward and backward of every layer that receives the same tensor; an in-place edit of the index
(its _version) or a new tensor makes a new plan. adapter_index may live on the CPU whatever x's
device: it is then planned on the host and copied over without the host waiting for the device.

adapter_index range: checked with a ValueError for CPU index tensors (free there, once per plan)
and by the torch backend (which reads its sizes anyway). On CUDA the Triton and CUDA paths do not synchronise to check:
rows whose index is out of [0, N) come back NaN (output, and dx in backward), never read outside the
stacked weights and never reach a weight gradient.
"""

from __future__ import annotations

import collections
import weakref
from typing import NamedTuple, Optional

import torch

from pefops import backend as backends
from pefops.ops.adapter_call import (GRAD_NAMES, AdapterCall, check_adapter_operands,
                                     check_scaling_tensor, check_scaling_value, contiguous, define_custom_ops,
                                     layer_norm_backward, layer_norm_forward, register_backends)
from pefops.ops.common import (check_float_dtype, check_index_tensor, compute_dtype, constant, describe, flat_rows,
                               host_to_device)
from pefops.ops.activations import activation_backward, activation_code, activation_forward
from pefops.kernels.shared import unit_stride_rows

OP = "multi_adapter"


# ------------------------------------------------------------------------------------ reference


class _Padding(NamedTuple):
    """Rows sorted by adapter into [chunks, length] slots: chunk c holds rows of adapter
    chunk_adapter[c] only; row t sits at flat slot `slot[t]` of the [chunks * length] layout."""

    chunk_adapter: torch.Tensor  # [chunks] int64
    slot: torch.Tensor  # [T] int64
    chunks: int
    length: int


def _check_range(low: int, high: int, adapters: int) -> None:
    if low < 0 or high >= adapters:
        raise ValueError(f"adapter_index values must lie in [0, {adapters}) (there are {adapters} adapters); "
                         f"got values from {low} to {high}")


def _padding(index: torch.Tensor, adapters: int) -> _Padding:
    """The padded grouping of rows by adapter; checks the index range (ValueError). All tensor
    work, one host synchronisation for the sizes (and the range)."""
    tokens = index.numel()
    device = index.device
    counts = torch.bincount(index.clamp(0, adapters - 1), minlength=adapters)
    used = (counts > 0).sum().clamp(min=1)
    length = ((tokens + used - 1) // used).clamp(min=1)
    chunks_of = (counts + length - 1) // length
    if tokens:
        low, high = torch.aminmax(index)
    else:
        low = high = counts.new_zeros(())
    low, high, chunks, length_value = torch.stack([low, high, chunks_of.sum(), length]).tolist()
    _check_range(low, high, adapters)
    chunk_end = torch.cumsum(chunks_of, 0)
    # the adapter of each chunk (repeat_interleave(arange(N), chunks_of), which is slow on CPU)
    chunk_adapter = torch.searchsorted(chunk_end, torch.arange(chunks, device=device), right=True)
    sorted_index, order = torch.sort(index, stable=True)
    seg_first = torch.cumsum(counts, 0) - counts
    chunk_first = chunk_end - chunks_of
    slot_sorted = chunk_first[sorted_index] * length + torch.arange(tokens, device=device) - seg_first[sorted_index]
    slot = torch.empty_like(slot_sorted).index_copy_(0, order, slot_sorted)
    return _Padding(chunk_adapter, slot, chunks, length_value)


class _PadRows(torch.autograd.Function):
    """[T, K] -> [chunks, length, K], zeros in the padding. Row t goes to one slot of its own, so
    the backward is a gather (_UnpadRows), not the scatter-add autograd would use for indexing."""

    @staticmethod
    def forward(ctx, rows, slot, chunks, length):
        ctx.save_for_backward(slot)
        flat = rows.new_zeros(chunks * length, rows.shape[1]).index_copy_(0, slot, rows)
        return flat.view(chunks, length, rows.shape[1])

    @staticmethod
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        return _UnpadRows.apply(grad, slot), None, None, None


class _UnpadRows(torch.autograd.Function):
    """[chunks, length, K] -> [T, K] in the original row order; the backward is _PadRows."""

    @staticmethod
    def forward(ctx, padded, slot):
        ctx.save_for_backward(slot)
        ctx.layout = padded.shape[:2]
        return flat_rows(padded, padded.shape[-1]).index_select(0, slot)

    @staticmethod
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        return _PadRows.apply(grad, slot, *ctx.layout), None


def _pad(rows: torch.Tensor, padding: _Padding) -> torch.Tensor:
    return _PadRows.apply(rows, padding.slot, padding.chunks, padding.length)


def _unpad(padded: torch.Tensor, padding: _Padding) -> torch.Tensor:
    return _UnpadRows.apply(padded, padding.slot)


def _gather(tensor, padding, cdt):
    """tensor[chunk_adapter] in the compute dtype: each chunk's adapter's slice."""
    return tensor.to(cdt).index_select(0, padding.chunk_adapter)


def _grouped_linear(rows_padded, weight, bias, padding, cdt):
    """Per chunk c: rows @ weight[chunk_adapter[c]].T + bias[chunk_adapter[c]], one batched GEMM."""
    gathered = _gather(weight, padding, cdt).transpose(1, 2)
    if bias is None:
        return torch.bmm(rows_padded, gathered)
    return torch.baddbmm(_gather(bias, padding, cdt).unsqueeze(1), rows_padded, gathered)


def _chunk_scale(call: AdapterCall, padding, cdt):
    """The scale of each chunk's rows: a float, [chunks, 1, 1] (per adapter) or [chunks, 1, H]."""
    if call.scaling is None:
        return call.scaling_value
    scale = _gather(call.scaling, padding, cdt)
    return scale.view(-1, 1, 1) if scale.dim() == 1 else scale.unsqueeze(1)


def _per_adapter(values, padding, adapters):
    """Sum per adapter of per-chunk values [chunks, ...] -> [N, ...] (zeros for adapters without rows)."""
    out = values.new_zeros((adapters, *values.shape[1:]))
    return out.index_add_(0, padding.chunk_adapter, values)


def _torch_forward(call: AdapterCall):
    """The reference forward, vectorised over adapters, in fp32 (fp64 for fp64 inputs): rows padded
    by adapter, batched GEMMs, rows back in order. Differentiable, so `multi_adapter_ref` is this
    function with plain autograd. call.x: [T, H], call.index [T] int64. Returns (out, z, mean, rstd)."""
    x = call.x
    cdt = compute_dtype(x.dtype)
    padding = _padding_of(call.index, call.adapters)
    z_padded = _grouped_linear(_pad(x.to(cdt), padding), call.down_weight, call.down_bias, padding, cdt)
    u_padded = _grouped_linear(activation_forward(z_padded, call.activation, call.negative_slope), call.up_weight,
                               call.up_bias, padding, cdt)
    scale = _chunk_scale(call, padding, cdt)
    base = call.residual_or_x().to(cdt)
    if isinstance(scale, float):
        y = torch.add(base, _unpad(u_padded, padding), alpha=scale)
    else:
        y = base + _unpad(u_padded * scale, padding)
    out, mean, rstd = layer_norm_forward(y, call)
    return out.to(x.dtype), _unpad(z_padded, padding), mean, rstd


def _torch_backward(grad_out, call: AdapterCall, z, mean, rstd, grad_mask):
    """Explicit backward in the compute dtype, in the padded layout of the forward: batched GEMMs
    over the chunks, per-chunk sums index_add-ed into the stacked gradients (a few rows per
    adapter, never one per token). Returns grads in GRAD_NAMES order, None where grad_mask says not
    needed."""
    cdt = z.dtype
    need = dict(zip(GRAD_NAMES, grad_mask))
    adapters = call.adapters
    padding = _padding_of(call.index, adapters)
    z_padded = _pad(z, padding)
    a_padded = activation_forward(z_padded, call.activation, call.negative_slope)
    scale = _chunk_scale(call, padding, cdt)
    u_padded = None
    if call.layer_norm or need["scaling"]:
        u_padded = _grouped_linear(a_padded, call.up_weight, call.up_bias, padding, cdt)
    d_ln_weight = d_ln_bias = None
    if call.layer_norm:
        y = call.residual_or_x().to(cdt) + _unpad(u_padded * scale, padding)
        dy, d_ln_weight, d_ln_bias = layer_norm_backward(grad_out.to(cdt), y, call, mean, rstd, need)
    else:
        dy = grad_out.to(cdt)
    dy_padded = _pad(dy, padding)
    d_scaling = None
    if need["scaling"]:
        product = (dy_padded * u_padded).sum(1)  # [chunks, H]
        d_scaling = _per_adapter(product.sum(1) if call.scaling.dim() == 1 else product, padding, adapters)
    du_padded = dy_padded * scale
    d_up_weight = d_up_bias = d_down_weight = d_down_bias = dx = None
    if need["up_weight"]:
        d_up_weight = _per_adapter(torch.bmm(du_padded.transpose(1, 2), a_padded), padding, adapters)
    if need["up_bias"]:
        d_up_bias = _per_adapter(du_padded.sum(1), padding, adapters)
    if need["x"] or need["down_weight"] or need["down_bias"]:
        da_padded = torch.bmm(du_padded, _gather(call.up_weight, padding, cdt))
        # the padding's rows of da are zero, so are those of dz whatever z holds there
        dz_padded = activation_backward(da_padded, z_padded, call.activation, call.negative_slope)
        if need["down_weight"]:
            x_padded = _pad(call.x.to(cdt), padding)
            d_down_weight = _per_adapter(torch.bmm(dz_padded.transpose(1, 2), x_padded), padding, adapters)
        if need["down_bias"]:
            d_down_bias = _per_adapter(dz_padded.sum(1), padding, adapters)
        if need["x"]:
            dx = _unpad(torch.bmm(dz_padded, _gather(call.down_weight, padding, cdt)), padding)
            if call.residual is None:
                dx = dx + dy
    d_residual = dy if need["residual"] else None
    return (dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scaling, d_residual, d_ln_weight, d_ln_bias)


def multi_adapter_ref(x, adapter_index, down_weight, down_bias, up_weight, up_bias, *, activation="relu",
                      scaling=1.0, residual=None, layer_norm=None, negative_slope=0.01):
    """The reference: same arguments as `multi_adapter`, plain autograd, fp32 (fp64 for fp64
    inputs) math, output in x's dtype. The CPU baseline."""
    call = _validate(x, adapter_index, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual,
                     layer_norm, negative_slope)
    index = _flat_index(call.index, tuple(x.shape[:-1])).to(call.x.device)
    return _torch_forward(call.with_index(index))[0].reshape(x.shape)


# ------------------------------------------------------------------------------------ validation


def _validate(x, adapter_index, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual,
              layer_norm, negative_slope) -> AdapterCall:
    """Check every argument (ValueError saying what was expected); the call with x and the residual
    as [tokens, hidden], the scaling as None, [N] or [N, H], and the checked adapter_index itself as
    its index (flattened by the caller: the routing plan looks the caller's tensor up)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [batch, ..., hidden] (at least 2-D); got {describe(x)}")
    dtype, device = x.dtype, x.device
    check_float_dtype("x", dtype)
    hidden = x.shape[-1]
    check_index_tensor(adapter_index, "adapter_index", "(int64)")
    leading = tuple(x.shape[:-1])
    if adapter_index.dim() < 1 or tuple(adapter_index.shape) != leading[:adapter_index.dim()]:
        raise ValueError(f"adapter_index must have shape {leading[:1]} (one adapter per sequence of x {tuple(x.shape)}) "
                         f"or {leading} (one per row); got {tuple(adapter_index.shape)}")
    if adapter_index.device != device and adapter_index.device.type != "cpu":
        raise ValueError(f"adapter_index must be on x's device {device} or on the CPU; got {adapter_index.device}")
    if not isinstance(down_weight, torch.Tensor) or down_weight.dim() != 3 or down_weight.shape[2] != hidden:
        raise ValueError(f"down_weight must be [adapters, rank, hidden={hidden}]; got {describe(down_weight)}")
    adapters, rank = down_weight.shape[0], down_weight.shape[1]
    if adapters < 1 or rank < 1:
        raise ValueError(f"down_weight must hold at least one adapter of rank >= 1; got shape {tuple(down_weight.shape)}")
    ln_weight, ln_bias, ln_eps = check_adapter_operands(x, down_weight, down_bias, up_weight, up_bias, residual,
                                                        layer_norm, adapters)
    scaling_tensor, scaling_value = None, 1.0
    if isinstance(scaling, torch.Tensor):
        check_scaling_tensor(scaling, device)
        shape = tuple(scaling.shape)
        if scaling.numel() == 1 and scaling.dim() <= 1:
            scaling_tensor = scaling.reshape(1).expand(adapters)  # one value shared by every adapter
        elif shape in ((adapters,), (adapters, 1)):
            scaling_tensor = scaling.reshape(adapters)
        elif shape == (adapters, hidden):
            scaling_tensor = scaling
        else:
            raise ValueError(f"scaling must be a float, a one-element tensor, a tensor [adapters={adapters}] or "
                             f"[adapters={adapters}, hidden={hidden}]; got shape {shape}")
    else:
        scaling_value = check_scaling_value(scaling)
    return AdapterCall(
        x=flat_rows(x, hidden), index=adapter_index, down_weight=down_weight, down_bias=down_bias,
        up_weight=up_weight, up_bias=up_bias, scaling=scaling_tensor, scaling_value=scaling_value,
        residual=None if residual is None else flat_rows(residual, hidden),
        ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, layer_norm=layer_norm is not None,
        activation=activation_code(activation), negative_slope=float(negative_slope),
    )


def _flat_index(adapter_index: torch.Tensor, leading: tuple) -> torch.Tensor:
    """One int64 adapter per row, [prod(leading)]: an index [batch] is broadcast over the sequence
    dimensions. May alias adapter_index (an int64 [rows] index is returned as it is)."""
    index = adapter_index.reshape(*adapter_index.shape, *([1] * (len(leading) - adapter_index.dim())))
    return index.expand(leading).reshape(-1).to(torch.int64)


# ------------------------------------------------------------------------------------ routing plans

# Every layer of a model gets the same routing-index object (pefops.hf's RowRouting hands one tensor
# per group of adapters to all layers) and the backward reuses the forward's rows, so what depends
# on the index alone is made once per index: its private flat copy, the kernels' row grouping (sort,
# bounds, work tables: ~20 small launches) and the torch backend's padded layout (one host read).
# Keyed by the caller's tensor (weak reference: a tensor that died, whose id may come back, never
# matches), its _version (an in-place edit makes a new plan), the number of adapters, the number of
# rows and x's device. A few
# plans are kept (most recent last): a model whose sites run different adapter groups alternates
# between their indices layer by layer.
_PLAN_LIMIT = 8
# (id(index), rows, adapters, device) -> (weak reference to the index, (_version, dtype, shape), plan)
_PLANS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
# plan.index (the private flat copy the custom ops receive and save) -> its plan, for the backends
_PLAN_OF_INDEX: "weakref.WeakValueDictionary[int, _RoutingPlan]" = weakref.WeakValueDictionary()
# builds so far (tests and bench/NOTES.md count them: one per routing index, not one per layer)
PLAN_STATS = {"plans": 0, "paddings": 0}


class _RoutingPlan:
    """What one routing index determines, for x's device: `index` [T] int64, the plan's own flat
    copy (the custom op receives and saves it: the caller editing its tensor later changes nothing),
    and, each built on first use, `groups()` (the Triton kernels' kernels.multi_adapter.RowGroups)
    and `padding()` (the torch backend's _Padding). Never written after it is built.

    A CPU index (data-loader task ids; accepted with x on any device) is flattened, range-checked
    (ValueError) and planned on the host; its tensors reach the device by non-blocking copies from
    pinned memory, so nothing waits for the device. An index on x's device is planned there: the
    grouping without a host read; only the torch backend's padding reads its sizes (and checks the
    range) once per index, which its batched GEMMs cannot do without."""

    def __init__(self, adapter_index: torch.Tensor, leading: tuple, adapters: int, device):
        self.adapters = adapters
        self.device = torch.device(device)
        flat = _flat_index(adapter_index, leading)
        if flat.numel() and flat.untyped_storage().data_ptr() == adapter_index.untyped_storage().data_ptr():
            flat = flat.clone()  # the caller's own memory (an int64 [rows] index is not converted): a copy
        self.host = flat if adapter_index.device.type == "cpu" else None
        if self.host is not None:
            _check_host_index(self.host, adapters)
            self.index = host_to_device(self.host, self.device)
        else:
            self.index = flat
        self._groups = None
        self._padding = None
        PLAN_STATS["plans"] += 1

    def groups(self):
        """kernels.multi_adapter.RowGroups of this index (the kernels need triton: built on first use)."""
        if self._groups is None:
            kernels = backends.import_kernels("multi_adapter")
            if self.host is not None:
                self._groups = kernels.RowGroups.from_host_index(self.host, self.adapters, self.device,
                                                                 copy=host_to_device)
            else:
                self._groups = kernels.RowGroups.from_index(self.index, self.adapters)
        return self._groups

    def padding(self) -> _Padding:
        """The torch backend's padded layout of this index (_padding), on the device."""
        if self._padding is None:
            if self.host is not None:
                padding = _padding(self.host, self.adapters)  # host reads of a CPU tensor only
                padding = padding._replace(chunk_adapter=host_to_device(padding.chunk_adapter, self.device),
                                           slot=host_to_device(padding.slot, self.device))
            else:
                padding = _padding(self.index, self.adapters)
            self._padding = padding
            PLAN_STATS["paddings"] += 1
        return self._padding


def _check_host_index(index: torch.Tensor, adapters: int) -> None:
    """Range check of a CPU index (ValueError): host reads of a CPU tensor, no device involved."""
    if index.numel():
        low, high = torch.aminmax(index)
        _check_range(int(low), int(high), adapters)


def _routing_plan(adapter_index: torch.Tensor, leading: tuple, adapters: int, device) -> _RoutingPlan:
    """The plan of this routing index (cached; see _PLANS). Inference tensors carry no version
    counter, so an in-place edit of one could not be seen: they get a fresh plan every call."""
    if adapter_index.is_inference():
        return _remember(_RoutingPlan(adapter_index, leading, adapters, device))
    rows = 1
    for size in leading:
        rows *= size
    # one entry per (tensor, rows, adapters, device): an index per sequence may serve two sequence
    # lengths (an encoder and a decoder) in one step
    slot = (id(adapter_index), rows, adapters, torch.device(device))
    key = (adapter_index._version, adapter_index.dtype, tuple(adapter_index.shape))
    entry = _PLANS.get(slot)
    if entry is not None and entry[0]() is adapter_index and entry[1] == key:
        _PLANS.move_to_end(slot)
        return entry[2]
    plan = _remember(_RoutingPlan(adapter_index, leading, adapters, device))
    _PLANS[slot] = (weakref.ref(adapter_index), key, plan)
    _PLANS.move_to_end(slot)
    while len(_PLANS) > _PLAN_LIMIT:
        _PLANS.popitem(last=False)
    return plan


def _remember(plan: _RoutingPlan) -> _RoutingPlan:
    _PLAN_OF_INDEX[id(plan.index)] = plan
    return plan


def _plan_for(index: torch.Tensor) -> Optional[_RoutingPlan]:
    """The plan whose private index tensor `index` is (the custom ops and their saved tensors pass
    the same object), or None: an index from elsewhere (torch.compile's graphs, direct op calls)."""
    plan = _PLAN_OF_INDEX.get(id(index))
    return plan if plan is not None and plan.index is index else None


def _padding_of(index: torch.Tensor, adapters: int) -> _Padding:
    plan = _plan_for(index)
    if plan is not None and plan.adapters == adapters:
        return plan.padding()
    return _padding(index, adapters)


def _groups_of(index: torch.Tensor, adapters: int):
    """The plan's RowGroups for the kernels, or None (the launcher groups the index itself)."""
    plan = _plan_for(index)
    return plan.groups() if plan is not None and plan.adapters == adapters else None


# ------------------------------------------------------------------------------------ custom ops
# pefops::multi_adapter_fwd / _bwd: flat schemas (adapter_call's parameter tables), the call rebuilt by name

_multi_adapter_fwd, _multi_adapter_bwd = define_custom_ops(OP, routed=True)


# ------------------------------------------------------------------------------------ public op


def multi_adapter(x, adapter_index, down_weight, down_bias, up_weight, up_bias, *, activation="relu", scaling=1.0,
                  residual=None, layer_norm=None, negative_slope=0.01, backend=None):
    """A batch in which every sequence (or row) goes through its own bottleneck adapter.

    x: [batch, ..., hidden] (e.g. [B, T, H], or [rows, H]); adapter_index: integer tensor [batch]
    (one adapter per sequence) or x.shape[:-1] (one per row), values in [0, N).
    down_weight [N, r, hidden], down_bias [N, r] or None; up_weight [N, hidden, r], up_bias [N, hidden]
    or None (N adapters of one shape, stacked); activation: relu, gelu, gelu_new, silu/swish, tanh,
    leaky_relu (negative_slope), identity; scaling: a float, a one-element tensor, a tensor [N] (one
    per adapter) or [N, hidden] (learnable); residual: tensor like x (default x); layer_norm:
    (weight or None, bias or None, eps), one LayerNorm shared by every adapter, applied to the sum.
    backend: None/"auto", "cuda", "triton" or "torch" (PEFOPS_BACKEND sets the default).
    adapter_index may be on the CPU for a CUDA x (planned on the host, copied without a sync); the
    grouping of the rows by adapter is made once per index tensor (see the module docstring).
    Out-of-range indices raise ValueError for a CPU index; see the module docstring for CUDA.
    Returns a tensor like x.
    """
    call = _validate(x, adapter_index, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual,
                     layer_norm, negative_slope)
    backends.forced_backend(backend)  # rejects a misspelt backend before any work
    leading = tuple(x.shape[:-1])
    if backends.compiling():
        # traced graphs get no plan (no cache across traces): the backends group the index themselves
        index = _flat_index(call.index, leading).to(call.x.device)
    else:
        # once per routing index (range-checked there when it is a CPU index); plan.index is the
        # plan's own copy, so the custom op may save it for the backward as it is
        index = _routing_plan(call.index, leading, call.adapters, call.x.device).index
    call = call.with_index(index)
    # An empty problem (no rows, or hidden size 0) launches nothing whatever the backend: the
    # reference under autograd gives the empty output and zero (or empty) gradients; so do eager
    # calls the torch backend serves (see backends.eager_torch).
    if call.x.numel() == 0 or backends.eager_torch(OP, call.problem("forward"), backend):
        return _torch_forward(call)[0].reshape(x.shape)
    if backends.compiling():
        # the custom op saves the index for its backward: its own copy, so that the caller editing
        # its index tensor in place after the call cannot change (or break) the gradient's routing
        call = call.with_index(call.index.clone())
    out = _multi_adapter_fwd(*call.forward_arguments(backend or ""))[0]
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ backends
# The kernel launchers take the call's fields by position (their `scale` is the call's `scaling`).


def _triton_forward(call: AdapterCall):
    kernels = backends.import_kernels("multi_adapter")
    return kernels.multi_adapter_forward(
        unit_stride_rows(call.x), call.index.contiguous(), call.down_weight.contiguous(), contiguous(call.down_bias),
        call.up_weight.contiguous(), contiguous(call.up_bias), call.scaling, call.scaling_value,
        unit_stride_rows(call.residual), contiguous(call.ln_weight), contiguous(call.ln_bias), call.ln_eps,
        call.layer_norm, call.activation, call.negative_slope, groups=_groups_of(call.index, call.adapters),
    )


def _triton_backward(grad_out, call: AdapterCall, z, mean, rstd, grad_mask):
    """Two kernels: rows (dy, dz, dx and per-block scaling / LayerNorm sums) and weights (per-adapter
    dWd, dbd, dWu, dbu over each adapter's gathered rows)."""
    kernels = backends.import_kernels("multi_adapter")
    need = dict(zip(GRAD_NAMES, grad_mask))
    grads = kernels.multi_adapter_backward(
        unit_stride_rows(grad_out), unit_stride_rows(call.x), call.index.contiguous(), call.down_weight.contiguous(),
        call.up_weight.contiguous(), contiguous(call.up_bias), call.scaling, call.scaling_value,
        unit_stride_rows(call.residual), contiguous(call.ln_weight), z, mean, rstd, call.layer_norm, call.activation,
        call.negative_slope, need, groups=_groups_of(call.index, call.adapters),
    )
    return tuple(grads.get(name) if need[name] else None for name in GRAD_NAMES)


def _cuda_forward(call: AdapterCall):
    from pefops import csrc

    x = call.x
    adapters, hidden = call.adapters, x.shape[1]
    if call.scaling is None:
        scale = constant(call.scaling_value, (adapters, hidden), torch.float32, x.device)
    else:
        scale = call.scaling.detach().to(torch.float32).reshape(adapters, -1).expand(adapters, hidden).contiguous()
    empty = x.new_empty(0)
    # absent biases are empty tensors here (the kernel tests their size); an absent LayerNorm weight is ones
    ln_weight = empty
    if call.layer_norm:
        ln_weight = (contiguous(call.ln_weight) if call.ln_weight is not None
                     else constant(1.0, (hidden,), x.dtype, x.device))
    return tuple(csrc.load().multi_adapter_decode_forward(
        x.contiguous(), call.index.contiguous(), call.down_weight.contiguous(),
        contiguous(call.down_bias) if call.down_bias is not None else empty,
        call.up_weight.contiguous(), contiguous(call.up_bias) if call.up_bias is not None else empty,
        scale, call.residual_or_x().contiguous(),
        ln_weight,
        contiguous(call.ln_bias) if call.layer_norm and call.ln_bias is not None else empty,
        float(call.ln_eps), int(call.activation), float(call.negative_slope),
    ))


register_backends(OP, torch_functions={"forward": _torch_forward, "backward": _torch_backward},
                  triton_functions={"forward": _triton_forward, "backward": _triton_backward},
                  cuda_forward=_cuda_forward, cuda_symbol="multi_adapter_decode_forward", cuda_unit="rows")
