"""Mixed-task batches of bottleneck adapters: every row uses its own adapter, one launch per pass.

    row t of adapter i = index[t]:  y_t = residual_t + s_i * (act(x_t @ Wd_i.T + bd_i) @ Wu_i.T + bu_i)
    out_t = LayerNorm(y_t) with one LayerNorm shared by all adapters, when given

The weights are stacked: Wd [N, R, H], bd [N, R], Wu [N, H, R], bu [N, H], s a Python float, one
value per adapter [N] or one per adapter and channel [N, H].

Grouping (a grouped GEMM, Punica / S-LoRA style): the launcher sorts the row indices by adapter
(torch.sort; no sorted copy of x is made) and cuts every adapter's run of rows into blocks of at most
BLOCK_M rows, giving a work table of (adapter, first, end) positions in the sorted order. All of it
runs on the device without a host synchronisation: the table has the fixed length
cdiv(T, BLOCK_M) + min(N + 2, T) (each adapter adds at most one partial block) and spare entries are
marked -2, their programs return at once. The grouping is a RowGroups object: pefops.ops.
multi_adapter keeps one per routing index and hands it to every launch (the forward and backward of
every layer given that index), so the sort and the work tables run once per index; a launch without
one groups its index itself. Rows whose index is out of range [0, N) form two extra
segments (below 0, at or above N) marked -1: their outputs come back NaN (forward and dx), they never
index outside the stacked weights and never reach a weight gradient.

Forward: one program per work item, the fused bottleneck adapter forward (down GEMM, activation,
up GEMM + bias + scale + residual, LayerNorm by merged chunk statistics) with the weight pointers
offset to the block's adapter; rows are gathered through the sorted order and outputs written back
to their original positions. The forward and the backward rows kernel are kernels/adapter_kernels.py's,
launched with GROUPED=True (kernels/bottleneck_adapter.py launches the same two with GROUPED=False);
this file keeps their launchers, autotuning and compile variants, and the weights kernel.

Backward: (1) a rows kernel per work item: recomputes the up-projection from the saved fp32
pre-activation z, forms dy (through LayerNorm), accumulates da = (s dy) @ Wu_i on chip, writes dz,
then dx = dz @ Wd_i (+ dy when the residual is x) in a third pass over H, and per-block column sums
for the scaling and LayerNorm gradients (reduced per adapter by the launcher). (2) a weights kernel
per (adapter, split, R tile, H tile): dWd_i = dz_iᵀ x_i, dWu_i = (s dy)_iᵀ act(z_i) and the bias
gradients, looping over the adapter's rows (gathered through the sorted order). An adapter without
rows gets exact zeros. When few programs would run, each adapter's rows are split among SPLIT
programs writing fp32 partials that the launcher sums (fixed order: deterministic).

References: Triton tutorials 03 (matrix multiplication) and 05 (layer norm); Punica (Chen et al.,
2023) and S-LoRA (Sheng et al., 2023) for segment-gathered multi-adapter GEMMs; kernels/
bottleneck_adapter.py for the per-adapter fusion.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import adapter_rows as rows_
from .adapter_kernels import (
    OUT_OF_RANGE,
    SPARE,
    adapter_bwd_rows_kernel,
    adapter_fwd_kernel,
    adapter_scale,
    forward_launch,
    forward_outputs,
    index_pointers,
)
from .adapter_rows import (
    SCALE_CHANNEL,
    SCALE_FLOAT,
    SCALE_SCALAR,
    activation,
    chunk_scale,
    row_block_sizes,
)
from .launch import autotuning, dot_settings, multiprocessors, token_bucket
from .shared import GELU

__all__ = ["RowGroups", "group_rows", "multi_adapter_forward", "multi_adapter_backward", "compile_variants"]

# Scaling modes (per adapter): SCALE_FLOAT a Python float for all, SCALE_SCALAR ("per adapter") one
# value per adapter [N], SCALE_CHANNEL one per adapter and channel [N, H].
SCALE_ADAPTER = SCALE_SCALAR

@triton.jit
def multi_adapter_bwd_weights_kernel(
    x_ptr,  # [T, H]
    dy_ptr,  # [T, H] gradient at the pre-LayerNorm sum (the upstream gradient without LayerNorm)
    z_ptr,  # [T, R] float32, saved pre-activation
    dz_ptr,  # [T, R] float32
    order_ptr,  # [T] int64: the row at each position of the adapter-sorted order
    bounds_ptr,  # [N + 1] int64: adapter i's rows sit at sorted positions [bounds[i], bounds[i + 1])
    scale_ptr,  # [N] or [N, H] float32
    dwd_ptr,  # [SPLIT, N, R, H] out (weights' dtype when SPLIT == 1, else float32 partials)
    dbd_ptr,  # [SPLIT, N, R] out
    dwu_ptr,  # [SPLIT, N, H, R] out
    dbu_ptr,  # [SPLIT, N, H] out
    N, H, R,
    stride_x, stride_dy,
    scale_value, negative_slope,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, SPLIT: tl.constexpr,
    NEED_DWD: tl.constexpr, NEED_DBD: tl.constexpr, NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    order_ptr, bounds_ptr = index_pointers(order_ptr, bounds_ptr, tl.int64)
    pid_r = tl.program_id(1)
    pid_h = tl.program_id(2)
    adapter = (pid // SPLIT).to(tl.int64)
    split = pid % SPLIT
    seg_first = tl.load(bounds_ptr + adapter)
    seg_end = tl.load(bounds_ptr + adapter + 1)
    # this program's share of the adapter's rows, whole BLOCK_M blocks
    share = tl.cdiv(tl.cdiv(seg_end - seg_first, SPLIT), BLOCK_M) * BLOCK_M
    first = seg_first + split * share
    end = tl.minimum(first + share, seg_end)

    r_offsets = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r_offsets < R
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    scale_ptr = adapter_scale(scale_ptr, adapter, H, SCALE_MODE)
    scale = chunk_scale(scale_ptr, cols, col_mask, scale_value, SCALE_MODE)

    acc_dwd = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    acc_dwu = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    acc_dbd = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_dbu = tl.zeros([BLOCK_H], dtype=tl.float32)
    for m in range(first, end, BLOCK_M):
        positions = m + tl.arange(0, BLOCK_M)
        row_mask = positions < end
        rows64 = tl.load(order_ptr + positions, mask=row_mask, other=0).to(tl.int64)
        rr_mask = row_mask[:, None] & r_mask[None, :]
        rh_mask = row_mask[:, None] & col_mask[None, :]
        if NEED_DWD or NEED_DBD:
            dz = tl.load(dz_ptr + rows64[:, None] * R + r_offsets[None, :], mask=rr_mask, other=0.0)
            if NEED_DBD:
                acc_dbd += tl.sum(dz, axis=0)
            if NEED_DWD:
                x_tile = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=rh_mask, other=0.0)
                if DOT_FP32:
                    acc_dwd = tl.dot(tl.trans(dz), x_tile.to(tl.float32), acc_dwd, input_precision=DOT_PRECISION)
                else:
                    acc_dwd = tl.dot(tl.trans(dz.to(x_tile.dtype)), x_tile, acc_dwd, input_precision=DOT_PRECISION)
        if NEED_DWU or NEED_DBU:
            du = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=rh_mask, other=0.0).to(tl.float32) * scale
            if NEED_DBU:
                acc_dbu += tl.sum(du, axis=0)
            if NEED_DWU:
                z = tl.load(z_ptr + rows64[:, None] * R + r_offsets[None, :], mask=rr_mask, other=0.0)
                a = activation(z, ACTIVATION, negative_slope)
                if DOT_FP32:
                    acc_dwu = tl.dot(tl.trans(du), a, acc_dwu, input_precision=DOT_PRECISION)
                else:
                    acc_dwu = tl.dot(tl.trans(du.to(dwu_ptr.dtype.element_ty)), a.to(dwu_ptr.dtype.element_ty),
                                     acc_dwu, input_precision=DOT_PRECISION)

    part = split.to(tl.int64) * N + adapter  # [SPLIT, N] slot
    if NEED_DWD:
        tl.store(dwd_ptr + part * R * H + r_offsets[:, None].to(tl.int64) * H + cols[None, :],
                 acc_dwd.to(dwd_ptr.dtype.element_ty), mask=r_mask[:, None] & col_mask[None, :])
    if NEED_DWU:
        tl.store(dwu_ptr + part * H * R + cols[:, None].to(tl.int64) * R + r_offsets[None, :],
                 acc_dwu.to(dwu_ptr.dtype.element_ty), mask=col_mask[:, None] & r_mask[None, :])
    if NEED_DBD:
        if pid_h == 0:
            tl.store(dbd_ptr + part * R + r_offsets, acc_dbd.to(dbd_ptr.dtype.element_ty), mask=r_mask)
    if NEED_DBU:
        if pid_r == 0:
            tl.store(dbu_ptr + part * H + cols, acc_dbu.to(dbu_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------- autotuning
# On a GPU BLOCK_H, warps and stages are tuned per (H, R, dtype, options); BLOCK_M is fixed by the
# work table the launcher builds. Under the interpreter the heuristic config runs alone.

_TUNING_KEY = ["H", "R", "ACTIVATION", "SCALE_MODE", "HAS_LN", "BLOCK_M", "t_bucket"]


def _prune_configs(configs, named_args, **kwargs):
    backward = "x_ptr" not in named_args  # the backward rows kernel reads grad_ptr, no x
    _, _, block_h, warps = _tile_sizes(named_args["R"], named_args["H"], named_args["T"], 1,
                                       rows_.operands_fp32(named_args, backward), backward=backward)
    return rows_.prune_row_configs(configs, named_args, (None, block_h, warps), backward=backward)


_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_H": block_h}, num_warps=warps, num_stages=stages)
    for block_h in (32, 64, 128)
    for warps, stages in ((4, 3), (8, 3), (4, 4))
]
multi_adapter_fwd_tuned = triton.autotune(
    configs=_FORWARD_CONFIGS, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune_configs},
)(adapter_fwd_kernel)

_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_H": block_h}, num_warps=warps, num_stages=stages)
    for block_h in (32, 64, 128)
    for warps, stages in ((8, 2), (8, 3), (4, 2))
]
multi_adapter_bwd_rows_tuned = triton.autotune(
    configs=_BACKWARD_CONFIGS, key=_TUNING_KEY + ["NEED_DSCALE", "NEED_DX"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(adapter_bwd_rows_kernel)


# ----------------------------------------------------------------------------------- launchers


def _scale_arguments(scale: torch.Tensor | None, device) -> tuple[int, torch.Tensor]:
    """(mode, fp32 contiguous tensor): None -> SCALE_FLOAT; [N] -> SCALE_ADAPTER; [N, H] -> SCALE_CHANNEL."""
    if scale is None:
        return SCALE_FLOAT, torch.empty(1, dtype=torch.float32, device=device)
    mode = SCALE_CHANNEL if scale.dim() == 2 else SCALE_ADAPTER
    return mode, scale.detach().to(torch.float32).contiguous()


def _tile_sizes(rank: int, hidden: int, tokens: int, adapters: int, fp32: bool, backward: bool = False,
                layer_norm: bool = False, sms: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_H, num_warps) of the rows kernels: bottleneck_adapter's heuristic,
    with BLOCK_M no larger than the mean rows per adapter need (each adapter's last block is
    partial), and narrower H chunks where ptxas for sm_90 reported spills (this kernel gathers its
    rows and, in backward, also computes dx): 16 for fp32 operands (8 warps), 32 for the 16-bit
    backward with LayerNorm (kernels/compile_check.py). With `sms` (a GPU's SM count) BLOCK_M
    also halves, down to 16, until the grid gives every SM at least two programs."""
    block_m, block_r, block_h, num_warps = row_block_sizes(rank, hidden, backward=backward, fp32=fp32)
    mean_rows = triton.cdiv(max(tokens, 1), max(1, min(adapters, tokens)))
    block_m = max(16, min(block_m, triton.next_power_of_2(mean_rows)))
    while sms and block_m > 16 and triton.cdiv(tokens, block_m) < 2 * sms:
        block_m //= 2
    if fp32:
        block_h, num_warps = 16, 8
    elif backward and layer_norm:
        block_h = min(block_h, 32)
    return block_m, block_r, block_h, num_warps


class RowGroups:
    """The rows of one routing index grouped by adapter, for every launch over that index: the
    forward and the backward of every layer that gets the same index (pefops.ops.multi_adapter keeps
    one per routing index and passes it in), so the sort and the work tables run once per index,
    not twice per layer.

    order [T] int64 (the row at each adapter-sorted position) and bounds [N + 1] int64 (adapter i's
    rows are order[bounds[i]:bounds[i + 1]]) on the launch device; `work(block_m)` builds the work
    table of one BLOCK_M on first use (forward and backward may tile differently) and keeps it.

    Built on the index's device (`from_index`, no host synchronisation), or on the host for a CPU
    index (`from_host_index`): the sort and every work table then run on the CPU and reach the
    device by a non-blocking copy from pinned memory, so the device sees no grouping launches at
    all. The tensors are never written after they are built (launches and saved gradients share
    them)."""

    def __init__(self, order: torch.Tensor, bounds: torch.Tensor, adapters: int, device,
                 host_bounds: torch.Tensor | None = None, copy=None):
        self.order = order
        self.bounds = bounds
        self.adapters = adapters
        self.tokens = order.numel()
        self.device = torch.device(device)
        self._host_bounds = host_bounds  # CPU bounds when planned on the host, else None
        self._copy = copy  # host tensor -> device tensor, for the host-planned work tables
        self._work: dict[int, torch.Tensor] = {}
        self.work_tables_built = 0  # how many work tables this grouping has built (tests, bench/NOTES.md)

    @classmethod
    def from_index(cls, index: torch.Tensor, adapters: int) -> "RowGroups":
        """Group on the index's own device (index [T] int64); no host synchronisation."""
        order, bounds = _sort_rows(index, adapters)
        return cls(order, bounds, adapters, index.device)

    @classmethod
    def from_host_index(cls, index: torch.Tensor, adapters: int, device, copy) -> "RowGroups":
        """Group a CPU index [T] int64 on the host for launches on `device`; copy(tensor, device)
        moves a host tensor there (the caller's non-blocking pinned copy, pefops.ops.common.host_to_device)."""
        order, bounds = _sort_rows(index, adapters)
        return cls(copy(order, device), copy(bounds, device), adapters, device, host_bounds=bounds, copy=copy)

    def work(self, block_m: int) -> torch.Tensor:
        """[cdiv(T, block_m) + min(N + 2, T), 3] int32 on the device: (adapter, first, end) sorted
        positions per block, adapter -1 for rows whose index is out of [0, N) and -2 for spare
        entries (see group_rows)."""
        table = self._work.get(block_m)
        if table is None:
            if self._host_bounds is not None:
                table = self._copy(_work_table(self._host_bounds, self.tokens, self.adapters, block_m), self.device)
            else:
                table = _work_table(self.bounds, self.tokens, self.adapters, block_m)
            self._work[block_m] = table
            self.work_tables_built += 1
        return table


def _sort_rows(index: torch.Tensor, adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T] int64, bounds [N + 1] int64) of index [T] int64, on its device."""
    sorted_index, order = torch.sort(index, stable=True)
    bounds = torch.searchsorted(sorted_index, torch.arange(adapters + 1, device=index.device, dtype=index.dtype))
    return order, bounds


def _work_table(bounds: torch.Tensor, tokens: int, adapters: int, block_m: int) -> torch.Tensor:
    """The work table of the grouping with these bounds [N + 1], on bounds' device."""
    device = bounds.device
    # segments: [below 0] + adapters 0..N-1 + [N and above]
    edges = torch.cat([bounds.new_zeros(1), bounds, bounds.new_full((1,), tokens)])
    seg_first, seg_end = edges[:-1], edges[1:]
    labels = torch.arange(-1, adapters + 1, device=device)
    labels[-1] = OUT_OF_RANGE
    seg_blocks = (seg_end - seg_first + block_m - 1) // block_m
    cumulative = torch.cumsum(seg_blocks, 0)
    num_blocks = triton.cdiv(tokens, block_m) + min(adapters + 2, tokens)
    block = torch.arange(num_blocks, device=device)
    seg = torch.searchsorted(cumulative, block, right=True)
    used = seg < adapters + 2
    seg = seg.clamp(max=adapters + 1)
    first = seg_first[seg] + (block - (cumulative[seg] - seg_blocks[seg])) * block_m
    label = torch.where(used, labels[seg], SPARE)
    return torch.stack([label, first, seg_end[seg]], 1).to(torch.int32).contiguous()


def group_rows(index: torch.Tensor, adapters: int, block_m: int):
    """Sort the rows by adapter and cut each adapter's rows into blocks of at most block_m, on the
    device, without a host synchronisation (RowGroups.from_index and its work table).

    index: [T] int64. Returns (order [T] int64: the row at each sorted position; work
    [cdiv(T, block_m) + min(N + 2, T), 3] int32: (adapter, first, end) sorted positions per block,
    adapter -1 for rows whose index is out of [0, N) and -2 for spare entries; bounds [N + 1] int64:
    adapter i's rows are order[bounds[i]:bounds[i + 1]])."""
    groups = RowGroups.from_index(index, adapters)
    return groups.order, groups.work(block_m), groups.bounds


def _groups(groups, index, adapters):
    """The caller's RowGroups, checked against this launch's index, or a new grouping of it."""
    if groups is None:
        return RowGroups.from_index(index, adapters)
    if groups.tokens != index.numel() or groups.adapters != adapters or groups.device != index.device:
        raise ValueError(f"groups (a RowGroups of {groups.tokens} rows, {groups.adapters} adapters, on "
                         f"{groups.device}) do not belong to this index ({index.numel()} rows, {adapters} adapters, "
                         f"on {index.device})")
    return groups


def multi_adapter_forward(
    x, index, down_weight, down_bias, up_weight, up_bias, scale, scale_value, residual,
    ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope, groups=None,
):
    """Launch the grouped fused forward. x, residual: [T, H] with unit column stride; index [T] int64;
    weights [N, R, H] / [N, H, R] and biases contiguous; scale None, [N] or [N, H]; groups: the
    RowGroups of this index (kept by the caller across launches), or None to group it here.
    Returns (out [T, H] in x's dtype, z [T, R] fp32, mean [T] / rstd [T] fp32, or [0] without LN)."""
    tokens, hidden = x.shape
    adapters, rank = down_weight.shape[0], down_weight.shape[1]
    outputs = forward_outputs(x, rank, layer_norm)
    if tokens == 0:
        return outputs
    scale_mode, scale = _scale_arguments(scale, x.device)
    block_m, block_r, block_h, num_warps = _tile_sizes(rank, hidden, tokens, adapters, x.dtype == torch.float32,
                                                       sms=multiprocessors(x.device) if x.is_cuda else None)
    groups = _groups(groups, index, adapters)
    work = groups.work(block_m)
    arguments, options = forward_launch(outputs, x, (groups.order, work), down_weight, down_bias, up_weight, up_bias,
                                        scale_mode, scale, scale_value, residual, ln_weight, ln_bias, ln_eps,
                                        layer_norm, activation, negative_slope, block_r)
    grid = (work.shape[0],)  # BLOCK_M is the work table's
    if not autotuning():
        adapter_fwd_kernel[grid](*arguments, **options, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps)
    else:
        multi_adapter_fwd_tuned[grid](*arguments, **options, BLOCK_M=block_m)
    return outputs


def _weight_block_sizes(rank: int, hidden: int, fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_H, num_warps) of the weights kernel: two fp32 accumulators of
    BLOCK_R x BLOCK_H (up to 4K elements each for 16-bit, 1K for fp32 operands, which spilled at 2K)."""
    block_r = max(16, min(64 if not fp32 else 32, triton.next_power_of_2(rank)))
    block_h = max(16, min(64 if not fp32 else 32, triton.next_power_of_2(hidden)))
    return 32, block_r, block_h, 8 if block_r * block_h >= 4096 or fp32 else 4


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(adapters: int, tiles: int, tokens: int, block_m: int, device) -> int:
    """Programs per adapter in the weights kernel: enough programs to fill the GPU when there are
    few adapters, never more than the rows give whole blocks for; 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    programs = adapters * tiles
    target = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while split < 8 and programs * split < target and tokens >= adapters * block_m * split * 4:
        split *= 2
    return split


def multi_adapter_backward(
    grad, x, index, down_weight, up_weight, up_bias, scale, scale_value, residual, ln_weight, z, mean, rstd,
    layer_norm, activation, negative_slope, need, groups=None,
):
    """Launch the backward. grad, x, residual: [T, H] with unit column stride; index [T] int64; z the
    forward's fp32 pre-activation, mean / rstd its LayerNorm statistics. need: dict of booleans over
    x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias. groups: as
    multi_adapter_forward's (the forward's RowGroups: the backward then sorts nothing).
    Returns a dict with the gradients asked for (dx, d_residual, d_down_weight, ... in the weights'
    dtype, d_scaling fp32 [N] or [N, H], d_ln_weight / d_ln_bias fp32 [H])."""
    tokens, hidden = grad.shape
    adapters, rank = down_weight.shape[0], down_weight.shape[1]
    device, dtype = grad.device, grad.dtype
    fp32 = dtype == torch.float32
    dot_fp32, precision = dot_settings(dtype)
    scale_mode, scale_tensor = _scale_arguments(scale, device)
    result = {}

    # ---- rows kernel: dy (LayerNorm), dz, dx, per-block sums
    block_m, block_r, block_h, num_warps = _tile_sizes(rank, hidden, tokens, adapters, fp32, backward=True,
                                                       layer_norm=layer_norm,
                                                       sms=multiprocessors(device) if grad.is_cuda else None)
    groups = _groups(groups, index, adapters)
    order, work, bounds = groups.order, groups.work(block_m), groups.bounds
    num_blocks = work.shape[0]
    need_dscale = need["scaling"] and scale is not None
    need_dlnw = need["ln_weight"] and layer_norm and ln_weight is not None
    need_dlnb = need["ln_bias"] and layer_norm
    dz = torch.empty((tokens, rank), dtype=torch.float32, device=device)
    dy = torch.empty((tokens, hidden), dtype=dtype, device=device) if layer_norm else None
    dx = torch.empty((tokens, hidden), dtype=dtype, device=device) if need["x"] else None

    def partials(needed):
        return torch.empty((num_blocks, hidden), dtype=torch.float32, device=device) if needed else None

    dscale_part, dlnw_part, dlnb_part = partials(need_dscale), partials(need_dlnw), partials(need_dlnb)
    if tokens:
        dummy = dz
        arguments = (
            grad, residual if residual is not None else x, order, work, down_weight, up_weight,
            up_bias if up_bias is not None else dummy, scale_tensor, ln_weight if ln_weight is not None else dummy,
            z, mean if layer_norm else dummy, rstd if layer_norm else dummy,
            dy if dy is not None else dummy, dz, dx if dx is not None else dummy,
            dummy,  # the up bias' partial sums: its gradient comes from the weights kernel (NEED_DBU=False)
            *(p if p is not None else dummy for p in (dscale_part, dlnw_part, dlnb_part)),
            tokens, hidden, rank, grad.stride(0), (residual if residual is not None else x).stride(0),
            dy.stride(0) if dy is not None else 0, dx.stride(0) if dx is not None else 0,
            float(scale_value), float(negative_slope), token_bucket(tokens),
        )
        options = dict(
            ACTIVATION=activation, SCALE_MODE=scale_mode, HAS_UP_BIAS=up_bias is not None,
            HAS_LN=layer_norm, HAS_LN_WEIGHT=ln_weight is not None,
            NEED_U=layer_norm or need_dscale, NEED_DBU=False, NEED_DSCALE=need_dscale, NEED_DLNW=need_dlnw,
            NEED_DLNB=need_dlnb, NEED_DX=need["x"], DX_ADD_DY=residual is None, GROUPED=True,
            DOT_FP32=dot_fp32, DOT_PRECISION=precision, REVERSE_SWEEPS=rows_.REVERSE_SWEEPS,
            BLOCK_M=block_m, BLOCK_R=block_r,
        )
        if not autotuning():
            adapter_bwd_rows_kernel[(num_blocks,)](*arguments, **options, BLOCK_H=block_h, num_warps=num_warps)
        else:
            multi_adapter_bwd_rows_tuned[(num_blocks,)](*arguments, **options)
    if dy is None:
        dy = grad
    if need["x"]:
        result["x"] = dx
    if need["residual"]:
        result["residual"] = dy

    # per-block sums -> per adapter (scaling) or over all in-range blocks (LayerNorm)
    labels = work[:, 0].to(torch.int64)
    in_range = (labels >= 0)[:, None]
    if need_dscale:
        sums = torch.where(in_range, dscale_part, 0.0)
        if scale_mode == SCALE_ADAPTER:
            sums = sums.sum(1)
        result["scaling"] = torch.zeros((adapters, *sums.shape[1:]), dtype=torch.float32, device=device).index_add_(
            0, labels.clamp(min=0), sums)
    if need_dlnw:
        result["ln_weight"] = torch.where(in_range, dlnw_part, 0.0).sum(0)
    if need_dlnb:
        result["ln_bias"] = torch.where(in_range, dlnb_part, 0.0).sum(0)

    # ---- weights kernel: dWd, dbd, dWu, dbu per adapter
    flags = dict(NEED_DWD=need["down_weight"], NEED_DBD=need["down_bias"],
                 NEED_DWU=need["up_weight"], NEED_DBU=need["up_bias"])
    if any(flags.values()):
        block_m, block_r, block_h, num_warps = _weight_block_sizes(rank, hidden, fp32)
        tiles = triton.cdiv(rank, block_r) * triton.cdiv(hidden, block_h)
        split = _split(adapters, tiles, tokens, block_m, device)
        out_dtype = dtype if split == 1 else torch.float32

        def buffer(flag, *shape):
            return torch.empty((split, adapters, *shape), dtype=out_dtype, device=device) if flags[flag] else None

        dwd, dbd = buffer("NEED_DWD", rank, hidden), buffer("NEED_DBD", rank)
        dwu, dbu = buffer("NEED_DWU", hidden, rank), buffer("NEED_DBU", hidden)
        dummy = dz
        grid = (adapters * split, triton.cdiv(rank, block_r), triton.cdiv(hidden, block_h))
        multi_adapter_bwd_weights_kernel[grid](
            x, dy, z, dz, order, bounds, scale_tensor,
            *(t if t is not None else dummy for t in (dwd, dbd, dwu, dbu)),
            adapters, hidden, rank, x.stride(0), dy.stride(0), float(scale_value), float(negative_slope),
            ACTIVATION=activation, SCALE_MODE=scale_mode, SPLIT=split, **flags,
            DOT_FP32=dot_fp32, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h,
            num_warps=num_warps,
        )
        for name, tensor in (("down_weight", dwd), ("down_bias", dbd), ("up_weight", dwu), ("up_bias", dbu)):
            if tensor is not None:
                result[name] = tensor[0] if split == 1 else tensor.sum(0).to(dtype)
    return result


# ------------------------------------------------------------------------ ahead-of-time compile list

DATA_POINTERS = frozenset({"x_ptr", "wd_ptr", "bd_ptr", "wu_ptr", "bu_ptr", "res_ptr", "lnw_ptr", "lnb_ptr",
                           "out_ptr", "grad_ptr", "dy_ptr", "dx_ptr", "dwd_ptr", "dbd_ptr", "dwu_ptr", "dbu_ptr"})


def compile_variants(hidden: int = 4096):
    """The launch configurations kernels/compile_check.py compiles for a GPU target: every dtype,
    with and without LayerNorm, ranks 16/64/256, at the heuristic tile sizes (BLOCK_M at its largest).
    Yields (name, kernel, dtype, constexprs, data_pointers, num_warps, num_stages, launch values)."""
    for dtype in ("bfloat16", "float16", "float32"):
        dot_fp32 = dtype == "float32"
        for rank in (16, 64, 256):
            # the integer arguments of a headline launch (contiguous [T, H] rows) for compile_check's hints
            values = {"H": hidden, "R": rank, **{name: hidden for name in (
                "stride_x", "stride_res", "stride_out", "stride_grad", "stride_dy", "stride_dx")}}
            for layer_norm in (False, True):
                ln = "ln" if layer_norm else "noln"
                block_m, block_r, block_h, warps = _tile_sizes(rank, hidden, 1 << 20, 1, dot_fp32)
                yield (f"fwd-{dtype}-r{rank}-{ln}", adapter_fwd_kernel, dtype,
                       dict(ACTIVATION=GELU, SCALE_MODE=SCALE_CHANNEL, HAS_DOWN_BIAS=True, HAS_UP_BIAS=True,
                            HAS_LN=layer_norm, HAS_LN_WEIGHT=True, HAS_LN_BIAS=True, GROUPED=True,
                            DOT_FP32=dot_fp32, DOT_PRECISION="ieee", REVERSE_SWEEPS=True, BLOCK_M=block_m,
                            BLOCK_R=block_r, BLOCK_H=block_h),
                       DATA_POINTERS, warps, 3, values)
                block_m, block_r, block_h, warps = _tile_sizes(rank, hidden, 1 << 20, 1, dot_fp32, backward=True,
                                                               layer_norm=layer_norm)
                yield (f"bwd-rows-{dtype}-r{rank}-{ln}", adapter_bwd_rows_kernel, dtype,
                       dict(ACTIVATION=GELU, SCALE_MODE=SCALE_CHANNEL, HAS_UP_BIAS=True, HAS_LN=layer_norm,
                            HAS_LN_WEIGHT=True, NEED_U=layer_norm, NEED_DBU=False, NEED_DSCALE=False,
                            NEED_DLNW=layer_norm, NEED_DLNB=layer_norm, NEED_DX=True, DX_ADD_DY=True,
                            GROUPED=True, DOT_FP32=dot_fp32,
                            DOT_PRECISION="ieee", REVERSE_SWEEPS=True, BLOCK_M=block_m, BLOCK_R=block_r,
                            BLOCK_H=block_h),
                       DATA_POINTERS, warps, 2, values)
            block_m, block_r, block_h, warps = _weight_block_sizes(rank, hidden, dot_fp32)
            yield (f"bwd-weights-{dtype}-r{rank}", multi_adapter_bwd_weights_kernel, dtype,
                   dict(ACTIVATION=GELU, SCALE_MODE=SCALE_CHANNEL, SPLIT=1, NEED_DWD=True, NEED_DBD=True,
                        NEED_DWU=True, NEED_DBU=True, DOT_FP32=dot_fp32, DOT_PRECISION="ieee",
                        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h),
                   DATA_POINTERS, warps, 3, values)
