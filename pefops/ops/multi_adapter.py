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
import numbers
import weakref
from typing import NamedTuple, Optional, Sequence

import torch

from pefops import backend as backends
from pefops.ops.common import (check_index_tensor, compute_dtype, constant, describe, flat_rows, host_to_device,
                               once_differentiable)
from pefops.ops.activations import activation_backward, activation_code, activation_forward
from pefops.kernels.shared import unit_stride_rows
from pefops.ops.bottleneck_adapter import _triton_limits, cuda_decode_limits

OP = "multi_adapter"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# order of the gradients the backward op returns (and of its grad mask)
GRAD_NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual", "ln_weight", "ln_bias")


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


def _chunk_scale(scaling, scaling_value, padding, cdt):
    """The scale of each chunk's rows: a float, [chunks, 1, 1] (per adapter) or [chunks, 1, H]."""
    if scaling is None:
        return scaling_value
    scale = _gather(scaling, padding, cdt)
    return scale.view(-1, 1, 1) if scale.dim() == 1 else scale.unsqueeze(1)


def _per_adapter(values, padding, adapters):
    """Sum per adapter of per-chunk values [chunks, ...] -> [N, ...] (zeros for adapters without rows)."""
    out = values.new_zeros((adapters, *values.shape[1:]))
    return out.index_add_(0, padding.chunk_adapter, values)


def _torch_forward(x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                   ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope):
    """The reference forward, vectorised over adapters, in fp32 (fp64 for fp64 inputs): rows padded
    by adapter, batched GEMMs, rows back in order. Differentiable, so `multi_adapter_ref` is this
    function with plain autograd. x: [T, H], index [T] int64. Returns (out, z, mean, rstd)."""
    cdt = compute_dtype(x.dtype)
    padding = _padding_of(index, down_weight.shape[0])
    z_padded = _grouped_linear(_pad(x.to(cdt), padding), down_weight, down_bias, padding, cdt)
    u_padded = _grouped_linear(activation_forward(z_padded, activation, negative_slope), up_weight, up_bias,
                               padding, cdt)
    scale = _chunk_scale(scaling, scaling_value, padding, cdt)
    base = (x if residual is None else residual).to(cdt)
    if isinstance(scale, float):
        y = torch.add(base, _unpad(u_padded, padding), alpha=scale)
    else:
        y = base + _unpad(u_padded * scale, padding)
    if layer_norm:
        weight = None if ln_weight is None else ln_weight.to(cdt)
        bias = None if ln_bias is None else ln_bias.to(cdt)
        out, mean, rstd = torch.native_layer_norm(y, [y.shape[-1]], weight, bias, ln_eps)
        mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    else:
        out = y
        mean, rstd = y.new_empty(0), y.new_empty(0)
    return out.to(x.dtype), _unpad(z_padded, padding), mean, rstd


def _torch_backward(grad_out, x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value,
                    residual, ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask):
    """Explicit backward in the compute dtype, in the padded layout of the forward: batched GEMMs
    over the chunks, per-chunk sums index_add-ed into the stacked gradients (a few rows per
    adapter, never one per token). Returns grads in GRAD_NAMES order, None where grad_mask says not
    needed."""
    cdt = z.dtype
    need = dict(zip(GRAD_NAMES, grad_mask))
    adapters, rank, hidden = down_weight.shape
    padding = _padding_of(index, adapters)
    z_padded = _pad(z, padding)
    a_padded = activation_forward(z_padded, activation, negative_slope)
    scale = _chunk_scale(scaling, scaling_value, padding, cdt)
    u_padded = None
    if layer_norm or need["scaling"]:
        u_padded = _grouped_linear(a_padded, up_weight, up_bias, padding, cdt)
    d_ln_weight = d_ln_bias = None
    if layer_norm:
        y = (x if residual is None else residual).to(cdt) + _unpad(u_padded * scale, padding)
        weight = None if ln_weight is None else ln_weight.to(cdt)
        bias = None if ln_bias is None else ln_bias.to(cdt)
        dy, d_ln_weight, d_ln_bias = torch.ops.aten.native_layer_norm_backward(
            grad_out.to(cdt), y, [hidden], mean.reshape(-1, 1), rstd.reshape(-1, 1), weight, bias,
            [True, need["ln_weight"] and weight is not None, need["ln_bias"] and bias is not None],
        )
    else:
        dy = grad_out.to(cdt)
    dy_padded = _pad(dy, padding)
    d_scaling = None
    if need["scaling"]:
        product = (dy_padded * u_padded).sum(1)  # [chunks, H]
        d_scaling = _per_adapter(product.sum(1) if scaling.dim() == 1 else product, padding, adapters)
    du_padded = dy_padded * scale
    d_up_weight = d_up_bias = d_down_weight = d_down_bias = dx = None
    if need["up_weight"]:
        d_up_weight = _per_adapter(torch.bmm(du_padded.transpose(1, 2), a_padded), padding, adapters)
    if need["up_bias"]:
        d_up_bias = _per_adapter(du_padded.sum(1), padding, adapters)
    if need["x"] or need["down_weight"] or need["down_bias"]:
        da_padded = torch.bmm(du_padded, _gather(up_weight, padding, cdt))
        # the padding's rows of da are zero, so are those of dz whatever z holds there
        dz_padded = activation_backward(da_padded, z_padded, activation, negative_slope)
        if need["down_weight"]:
            x_padded = _pad(x.to(cdt), padding)
            d_down_weight = _per_adapter(torch.bmm(dz_padded.transpose(1, 2), x_padded), padding, adapters)
        if need["down_bias"]:
            d_down_bias = _per_adapter(dz_padded.sum(1), padding, adapters)
        if need["x"]:
            dx = _unpad(torch.bmm(dz_padded, _gather(down_weight, padding, cdt)), padding)
            if residual is None:
                dx = dx + dy
    d_residual = dy if need["residual"] else None
    return (dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scaling, d_residual, d_ln_weight, d_ln_bias)


def multi_adapter_ref(x, adapter_index, down_weight, down_bias, up_weight, up_bias, *, activation="relu",
                      scaling=1.0, residual=None, layer_norm=None, negative_slope=0.01):
    """The reference: same arguments as `multi_adapter`, plain autograd, fp32 (fp64 for fp64
    inputs) math, output in x's dtype. The CPU baseline."""
    args = _normalise(x, adapter_index, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual,
                      layer_norm)
    x2, index, residual2, scaling_tensor, scaling_value, ln_weight, ln_bias, ln_eps, has_ln, code = args
    out = _torch_forward(x2, index.to(x2.device), down_weight, down_bias, up_weight, up_bias, scaling_tensor, scaling_value,
                         residual2, ln_weight, ln_bias, ln_eps, has_ln, code, float(negative_slope))[0]
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ validation


def _normalise(x, adapter_index, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual,
               layer_norm, flatten_index=True):
    """Check every argument (ValueError saying what was expected) and bring x and the residual to
    [tokens, hidden], the index to one int64 per token (on its own device: x's or the CPU; with
    flatten_index=False the checked adapter_index itself, for the routing plan's lookup) and the
    scaling to None, [N] or [N, H].
    Returns (x2d, index, residual2d, scaling_tensor, scaling_value, ln_weight, ln_bias, ln_eps,
    has_ln, activation_code)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [batch, ..., hidden] (at least 2-D); got {describe(x)}")
    dtype, device = x.dtype, x.device
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"x must be float32, float16 or bfloat16 (float64 for gradcheck); got {dtype}")
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
    if up_weight is None:
        raise ValueError(f"up_weight must be a tensor [adapters={adapters}, hidden={hidden}, rank={rank}]; got None")
    expected = {
        "down_weight": (down_weight, (adapters, rank, hidden)),
        "down_bias": (down_bias, (adapters, rank)),
        "up_weight": (up_weight, (adapters, hidden, rank)),
        "up_bias": (up_bias, (adapters, hidden)),
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
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape {shape}; got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (x is {tuple(x.shape)}, {adapters} adapters of rank "
                             f"{rank}); got {tuple(tensor.shape)}")
        if tensor.dtype != dtype:
            raise ValueError(f"{name} must have x's dtype {dtype}; got {tensor.dtype} (cast the adapters or the input)")
        if tensor.device != device:
            raise ValueError(f"{name} must be on x's device {device}; got {tensor.device}")
    scaling_tensor, scaling_value = None, 1.0
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point():
            raise ValueError(f"scaling tensor must be floating point; got {scaling.dtype}")
        if scaling.device != device:
            raise ValueError(f"scaling must be on x's device {device}; got {scaling.device}")
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
    elif isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        scaling_value = float(scaling)
    else:
        raise ValueError(f"scaling must be a float or a tensor; got {type(scaling).__name__}")
    code = activation_code(activation)
    index = _flat_index(adapter_index, leading) if flatten_index else adapter_index
    x2 = flat_rows(x, hidden)
    residual2 = None if residual is None else flat_rows(residual, hidden)
    return x2, index, residual2, scaling_tensor, scaling_value, ln_weight, ln_bias, float(ln_eps), has_ln, code


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


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


def _problem(x, down_weight, mode):
    tokens, hidden = x.shape
    sizes = {"tokens": tokens, "hidden": hidden, "rank": down_weight.shape[1], "adapters": down_weight.shape[0]}
    return backends.Problem(x.device, x.dtype, mode, sizes)


# ------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("pefops::multi_adapter_fwd", mutates_args=())
def _multi_adapter_fwd(
    x: torch.Tensor, index: torch.Tensor, down_weight: torch.Tensor, down_bias: Optional[torch.Tensor],
    up_weight: torch.Tensor, up_bias: Optional[torch.Tensor], scaling: Optional[torch.Tensor], scaling_value: float,
    residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
    ln_eps: float, layer_norm: bool, activation: int, negative_slope: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    implementation = backends.select(OP, _problem(x, down_weight, "forward"), backend or None)
    return implementation.functions["forward"](
        x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
        ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope,
    )


@_multi_adapter_fwd.register_fake
def _(x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual, ln_weight, ln_bias,
      ln_eps, layer_norm, activation, negative_slope, backend):
    tokens, rank = x.shape[0], down_weight.shape[1]
    cdt = compute_dtype(x.dtype)
    stats = tokens if layer_norm else 0
    return (x.new_empty(x.shape), x.new_empty((tokens, rank), dtype=cdt),
            x.new_empty((stats,), dtype=cdt), x.new_empty((stats,), dtype=cdt))


@torch.library.custom_op("pefops::multi_adapter_bwd", mutates_args=())
def _multi_adapter_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, down_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor], up_weight: torch.Tensor, up_bias: Optional[torch.Tensor],
    scaling: Optional[torch.Tensor], scaling_value: float, residual: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], layer_norm: bool, z: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, activation: int, negative_slope: float, grad_mask: Sequence[bool],
    backend: str,
) -> list[torch.Tensor]:
    implementation = backends.select(OP, _problem(x, down_weight, "backward"), backend or None)
    grads = implementation.functions["backward"](
        grad_out, x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
        ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, list(grad_mask),
    )
    # custom ops return tensors only: an empty tensor stands for "not needed"
    inputs = (x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias)
    return [
        grad.to(reference.dtype).reshape(reference.shape) if grad is not None else x.new_empty(0)
        for grad, reference in zip(grads, inputs)
    ]


@_multi_adapter_bwd.register_fake
def _(grad_out, x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual, ln_weight,
      ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask, backend):
    inputs = (x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias)
    return [
        x.new_empty(reference.shape, dtype=reference.dtype) if needed and reference is not None else x.new_empty(0)
        for needed, reference in zip(grad_mask, inputs)
    ]


def _setup_context(ctx, inputs, output):
    (x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual, ln_weight, ln_bias,
     ln_eps, layer_norm, activation, negative_slope, backend) = inputs
    _, z, mean, rstd = output
    ctx.save_for_backward(x, index, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias,
                          z, mean, rstd)
    ctx.config = (scaling_value, layer_norm, activation, negative_slope, backend)


@once_differentiable("multi_adapter")
def _backward(ctx, grad_out, _grad_z, _grad_mean, _grad_rstd):
    (x, index, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias,
     z, mean, rstd) = ctx.saved_tensors
    scaling_value, layer_norm, activation, negative_slope, backend = ctx.config
    needs = list(ctx.needs_input_grad)
    # inputs order: x, index, dw, db, uw, ub, scaling, scaling_value, residual, lnw, lnb, ...
    grad_mask = [needs[0], needs[2], needs[3], needs[4], needs[5], needs[6], needs[8], needs[9], needs[10]]
    residual_passthrough = grad_mask[6] and not layer_norm
    if residual_passthrough:
        grad_mask[6] = False  # without LayerNorm the residual's gradient is grad_out itself
    grads = [None] * 9
    if any(grad_mask):
        outputs = _multi_adapter_bwd(
            grad_out.contiguous(), x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value,
            residual, ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask, backend,
        )
        grads = [grad if needed else None for grad, needed in zip(outputs, grad_mask)]
    if residual_passthrough:
        grads[6] = grad_out
    dx, d_dw, d_db, d_uw, d_ub, d_scaling, d_residual, d_lnw, d_lnb = grads
    return (dx, None, d_dw, d_db, d_uw, d_ub, d_scaling, None, d_residual, d_lnw, d_lnb,
            None, None, None, None, None)


_multi_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    x2, index, residual2, scaling_tensor, scaling_value, ln_weight, ln_bias, ln_eps, has_ln, code = _normalise(
        x, adapter_index, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm,
        flatten_index=False,
    )
    forced = backends.forced_backend(backend)  # rejects a misspelt backend before any work
    compiling = backends.compiling()
    if compiling:
        # traced graphs get no plan (no cache across traces): the backends group the index themselves
        index = _flat_index(index, tuple(x.shape[:-1])).to(x2.device)
    else:
        # once per routing index (range-checked there when it is a CPU index); plan.index is the
        # plan's own copy, so the custom op may save it for the backward as it is
        index = _routing_plan(index, tuple(x.shape[:-1]), down_weight.shape[0], x2.device).index
    # Eager calls the torch backend serves run its differentiable reference directly under autograd
    # (no custom-op dispatch, no recomputation in backward); so do empty problems (no rows, or hidden
    # size 0: nothing to launch, whatever the backend; empty output, zero or empty gradients).
    # Compiled graphs and forced backends go through the custom op.
    eager_torch = (forced is None and not compiling
                   and backends.select(OP, _problem(x2, down_weight, "forward")).backend == "torch")
    if x2.numel() == 0 or eager_torch:
        out = _torch_forward(x2, index, down_weight, down_bias, up_weight, up_bias, scaling_tensor, scaling_value,
                             residual2, ln_weight, ln_bias, ln_eps, has_ln, code, float(negative_slope))[0]
        return out.reshape(x.shape)
    if compiling:
        # the custom op saves the index for its backward: its own copy, so that the caller editing
        # its index tensor in place after the call cannot change (or break) the gradient's routing
        index = index.clone()
    out = _multi_adapter_fwd(
        x2, index, down_weight, down_bias, up_weight, up_bias, scaling_tensor, scaling_value, residual2,
        ln_weight, ln_bias, ln_eps, has_ln, code, float(negative_slope), backend or "",
    )[0]
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------ backends


def _triton_forward(x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                    ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope):
    kernels = backends.import_kernels("multi_adapter")
    return kernels.multi_adapter_forward(
        unit_stride_rows(x), index.contiguous(), down_weight.contiguous(), _contiguous(down_bias),
        up_weight.contiguous(), _contiguous(up_bias), scaling, scaling_value, unit_stride_rows(residual),
        _contiguous(ln_weight), _contiguous(ln_bias), ln_eps, layer_norm, activation, negative_slope, groups=_groups_of(index, down_weight.shape[0]),
    )


def _triton_backward(grad_out, x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value,
                     residual, ln_weight, ln_bias, layer_norm, z, mean, rstd, activation, negative_slope, grad_mask):
    """Two kernels: rows (dy, dz, dx and per-block scaling / LayerNorm sums) and weights (per-adapter
    dWd, dbd, dWu, dbu over each adapter's gathered rows)."""
    kernels = backends.import_kernels("multi_adapter")
    need = dict(zip(GRAD_NAMES, grad_mask))
    grads = kernels.multi_adapter_backward(
        unit_stride_rows(grad_out), unit_stride_rows(x), index.contiguous(), down_weight.contiguous(),
        up_weight.contiguous(), _contiguous(up_bias), scaling, scaling_value, unit_stride_rows(residual),
        _contiguous(ln_weight), z, mean, rstd, layer_norm, activation, negative_slope, need, groups=_groups_of(index, down_weight.shape[0]),
    )
    return tuple(grads.get(name) if need[name] else None for name in GRAD_NAMES)


def _cuda_forward(x, index, down_weight, down_bias, up_weight, up_bias, scaling, scaling_value, residual,
                  ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope):
    from pefops import csrc

    adapters, _, hidden = down_weight.shape
    if scaling is None:
        scale = constant(scaling_value, (adapters, hidden), torch.float32, x.device)
    else:
        scale = scaling.detach().to(torch.float32).reshape(adapters, -1).expand(adapters, hidden).contiguous()
    empty = x.new_empty(0)
    return tuple(csrc.load().multi_adapter_decode_forward(
        x.contiguous(), index.contiguous(), down_weight.contiguous(),
        down_bias.contiguous() if down_bias is not None else empty,
        up_weight.contiguous(), up_bias.contiguous() if up_bias is not None else empty,
        scale, (x if residual is None else residual).contiguous(),
        _contiguous(ln_weight) if layer_norm and ln_weight is not None else (constant(1.0, (hidden,), x.dtype, x.device) if layer_norm else empty),
        _contiguous(ln_bias) if layer_norm and ln_bias is not None else empty,
        float(ln_eps), int(activation), float(negative_slope),
    ))


_cuda_limits = cuda_decode_limits("multi_adapter_decode_forward", unit="rows")

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
    limits=_cuda_limits,
))
