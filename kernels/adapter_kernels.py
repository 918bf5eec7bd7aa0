"""The two rows kernels of both bottleneck adapter families: one forward and one backward-rows kernel
serve kernels/bottleneck_adapter.py (one adapter, rows in order) and kernels/multi_adapter.py (an
adapter per row, rows gathered by adapter). Each family keeps its own launchers, autotuning and
compile variants; the passes over H the kernels run are in kernels/adapter_rows.py.

The constexpr GROUPED picks how a program finds its rows and weights:

- GROUPED=False (bottleneck_adapter): program pid takes rows pid * BLOCK_M + arange(BLOCK_M), masked
  at T, and the weight pointers as given; order_ptr and work_ptr are never read. The compiled code
  is the ungrouped kernel's alone: every grouped step sits under `if GROUPED`, except the spare
  check, a branch on a constant 0 that folds away (ptxas reports the same registers and spills as
  the separate kernels had: bench/NOTES.md, issue #14).
- GROUPED=True (multi_adapter): program pid takes work item pid of the work table (kernels/
  multi_adapter.group_rows): a label (the adapter, OUT_OF_RANGE for rows whose index is outside
  [0, N), SPARE for an unused item, whose program returns at once) and the item's first and end
  positions in the adapter-sorted order; the rows are gathered through order_ptr, the weight
  pointers offset to the adapter's slice of the stacked weights, and the outputs of out-of-range
  rows become NaN.

The backward's flags say which family's extra outputs a launch writes: NEED_DBU the per-block column
sums of s * dy for the up bias (bottleneck_adapter, whose launcher hands the weight gradients to
the BLAS), NEED_DX / DX_ADD_DY the in-kernel third pass dx = dz @ Wd (+ dy) (multi_adapter, whose
weight gradients come from its own weights kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adapter_rows import (
    REVERSE_SWEEPS,
    activation_derivative,
    backward_row_state,
    chunk_columns,
    down_projection,
    dy_da_pass,
    up_projection_passes,
)
from .launch import dot_settings, token_bucket

# Work table labels besides an adapter number (kernels/multi_adapter.py builds the table).
OUT_OF_RANGE, SPARE = -1, -2
_SPARE = tl.constexpr(SPARE)


@triton.jit
def index_pointers(order_ptr, table_ptr, TABLE_TYPE: tl.constexpr = tl.int32):
    """The index arrays' element types, stated (a no-op for the launchers' int64 / int32 tensors;
    kernels/compile_check.py types every non-data pointer as fp32)."""
    return order_ptr.to(tl.pointer_type(tl.int64)), table_ptr.to(tl.pointer_type(TABLE_TYPE))


@triton.jit
def adapter_scale(scale_ptr, adapter, H, SCALE_MODE: tl.constexpr):
    """The adapter's slice of the stacked scaling tensor ([N] or [N, H]), in the layout
    adapter_rows.chunk_scale reads."""
    if SCALE_MODE == 2:
        scale_ptr += adapter * H
    elif SCALE_MODE == 1:
        scale_ptr += adapter
    return scale_ptr


@triton.jit
def _work_label(work_ptr, GROUPED: tl.constexpr):
    """This program's label: with GROUPED its work item's (an adapter, OUT_OF_RANGE or SPARE); without,
    a constant 0 (the kernels' spare check on it folds away, and nothing else reads it)."""
    if GROUPED:
        label = tl.load(work_ptr.to(tl.pointer_type(tl.int32)) + tl.program_id(0) * 3)
    else:
        label = tl.full([], 0, tl.int32)
    return label


@triton.jit
def _adapter(label):
    """The adapter whose weights a work item reads (int64): its label; adapter 0 for rows whose
    index is out of range (their outputs are NaN)."""
    return tl.maximum(label, 0).to(tl.int64)


@triton.jit
def _block_and_adapter(
    order_ptr, work_ptr, wu_ptr, bu_ptr, scale_ptr, label, T, H, R,
    SCALE_MODE: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """This program's rows and its adapter's up-projection weights: (rows64, row_mask, out_of_range,
    wu_ptr, bu_ptr, scale_ptr, r_offsets, r_mask). With GROUPED the rows are its work item's
    original row numbers (int64, gathered through the sorted order) and the pointers are moved to
    the adapter's slices of the stacked weights; without, the rows are pid * BLOCK_M + arange(BLOCK_M)
    below T and the pointers stay as given (out_of_range is then never read)."""
    pid = tl.program_id(0)
    if GROUPED:
        order_ptr, work_ptr = index_pointers(order_ptr, work_ptr)
        first = tl.load(work_ptr + pid * 3 + 1)
        end = tl.load(work_ptr + pid * 3 + 2)
        positions = first + tl.arange(0, BLOCK_M)
        row_mask = positions < end
        rows64 = tl.load(order_ptr + positions, mask=row_mask, other=0).to(tl.int64)
        out_of_range = label < 0
        adapter = _adapter(label)
        wu_ptr += adapter * H * R
        bu_ptr += adapter * H
        scale_ptr = adapter_scale(scale_ptr, adapter, H, SCALE_MODE)
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < T
        rows64 = rows.to(tl.int64)
        out_of_range = label < 0
    r_offsets = tl.arange(0, BLOCK_R)
    r_mask = r_offsets < R
    return rows64, row_mask, out_of_range, wu_ptr, bu_ptr, scale_ptr, r_offsets, r_mask


@triton.jit
def adapter_fwd_kernel(
    x_ptr,  # [T, H]
    order_ptr,  # GROUPED: [T] int64, the row at each position of the adapter-sorted order
    work_ptr,  # GROUPED: [num_items, 3] int32, (label, first, end) sorted positions per work item
    wd_ptr,  # [R, H], GROUPED [N, R, H]
    bd_ptr,  # [R], GROUPED [N, R]
    wu_ptr,  # [H, R], GROUPED [N, H, R]
    bu_ptr,  # [H], GROUPED [N, H]
    scale_ptr,  # float32: [H] or [1]; GROUPED [N] or [N, H]
    res_ptr,  # [T, H] (x_ptr when the residual is x)
    lnw_ptr,  # [H]
    lnb_ptr,  # [H]
    out_ptr,  # [T, H]
    z_ptr,  # [T, R] float32, pre-activation, saved for backward
    mean_ptr,  # [T] float32
    rstd_ptr,  # [T] float32
    T, H, R,
    stride_x, stride_res, stride_out,
    scale_value, eps, negative_slope,
    t_bucket,  # autotuning key only: launch.token_bucket(T)
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr,
    HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, REVERSE_SWEEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    label = _work_label(work_ptr, GROUPED)
    if label == _SPARE:  # without GROUPED a constant 0: the branch folds away
        return
    rows64, row_mask, out_of_range, wu_ptr, bu_ptr, scale_ptr, r_offsets, r_mask = _block_and_adapter(
        order_ptr, work_ptr, wu_ptr, bu_ptr, scale_ptr, label, T, H, R, SCALE_MODE, GROUPED, BLOCK_M, BLOCK_R)
    if GROUPED:
        wd_ptr += _adapter(label) * R * H
        bd_ptr += _adapter(label) * R

    a_dot = down_projection(x_ptr, wd_ptr, bd_ptr, z_ptr, out_ptr, rows64, row_mask, r_offsets, r_mask, out_of_range,
                            H, R, stride_x, negative_slope, ACTIVATION, HAS_DOWN_BIAS, GROUPED, DOT_FP32, DOT_PRECISION,
                            BLOCK_M, BLOCK_R, BLOCK_H)
    up_projection_passes(a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, lnb_ptr, out_ptr, mean_ptr, rstd_ptr,
                         rows64, row_mask, r_offsets, r_mask, out_of_range, H, R, stride_res, stride_out, scale_value,
                         eps, SCALE_MODE, HAS_UP_BIAS, HAS_LN, HAS_LN_WEIGHT, HAS_LN_BIAS, GROUPED, DOT_PRECISION,
                         REVERSE_SWEEPS, BLOCK_M, BLOCK_H)


@triton.jit
def adapter_bwd_rows_kernel(
    grad_ptr,  # [T, H] upstream gradient of the output
    res_ptr,  # [T, H] residual (x when the residual is x); read only when the up-projection is needed
    order_ptr,  # GROUPED: [T] int64, the row at each position of the adapter-sorted order
    work_ptr,  # GROUPED: [num_items, 3] int32, (label, first, end) sorted positions per work item
    wd_ptr,  # [R, H], GROUPED [N, R, H]; read only with NEED_DX
    wu_ptr,  # [H, R], GROUPED [N, H, R]
    bu_ptr,  # [H], GROUPED [N, H]
    scale_ptr,  # float32: [H] or [1]; GROUPED [N] or [N, H]
    lnw_ptr,  # [H]
    z_ptr,  # [T, R] float32, saved pre-activation
    mean_ptr,  # [T] float32
    rstd_ptr,  # [T] float32
    dy_ptr,  # [T, H] out: gradient at the pre-LayerNorm sum y (written only with LayerNorm)
    dz_ptr,  # [T, R] out float32: gradient at the pre-activation
    dx_ptr,  # [T, H] out (NEED_DX): dz @ Wd (+ dy when the residual is x)
    dbu_part_ptr,  # [>= num_blocks, H] out float32 (NEED_DBU): per-block column sums of s * dy
    dscale_part_ptr,  # [>= num_blocks, H] out float32: per-block column sums of dy * u
    dlnw_part_ptr,  # [>= num_blocks, H] out float32: per-block column sums of grad * xhat
    dlnb_part_ptr,  # [>= num_blocks, H] out float32: per-block column sums of grad
    T, H, R,
    stride_grad, stride_res, stride_dy, stride_dx,
    scale_value, negative_slope,
    t_bucket,  # autotuning key only: launch.token_bucket(T)
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr,
    NEED_U: tl.constexpr, NEED_DBU: tl.constexpr, NEED_DSCALE: tl.constexpr,
    NEED_DLNW: tl.constexpr, NEED_DLNB: tl.constexpr, NEED_DX: tl.constexpr, DX_ADD_DY: tl.constexpr,
    GROUPED: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REVERSE_SWEEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    label = _work_label(work_ptr, GROUPED)
    if label == _SPARE:  # without GROUPED a constant 0: the branch folds away
        return
    rows64, row_mask, out_of_range, wu_ptr, bu_ptr, scale_ptr, r_offsets, r_mask = _block_and_adapter(
        order_ptr, work_ptr, wu_ptr, bu_ptr, scale_ptr, label, T, H, R, SCALE_MODE, GROUPED, BLOCK_M, BLOCK_R)

    z, a_dot, mean, rstd, mean_g, mean_g_xhat = backward_row_state(
        grad_ptr, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, z_ptr, mean_ptr, rstd_ptr, rows64, row_mask, r_offsets,
        r_mask, H, R, stride_grad, stride_res, scale_value, negative_slope, ACTIVATION, SCALE_MODE, HAS_UP_BIAS,
        HAS_LN, HAS_LN_WEIGHT, DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_H)
    # the dy sweep runs backwards after the LayerNorm sums' forward sweep (the columns still in L2
    # first); the dx sweep below runs opposite to the dy sweep
    dy_reversed = REVERSE_SWEEPS and HAS_LN
    da = dy_da_pass(a_dot, grad_ptr, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, dy_ptr, dbu_part_ptr,
                    dscale_part_ptr, dlnw_part_ptr, dlnb_part_ptr, tl.program_id(0).to(tl.int64) * H, rows64,
                    row_mask, r_offsets, r_mask, mean, rstd, mean_g, mean_g_xhat, out_of_range, H, R, stride_grad,
                    stride_res, stride_dy, scale_value, SCALE_MODE, HAS_UP_BIAS, HAS_LN, HAS_LN_WEIGHT, NEED_U,
                    NEED_DBU, NEED_DSCALE, NEED_DLNW, NEED_DLNB, GROUPED, DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_R,
                    BLOCK_H, dy_reversed)
    dz = da * activation_derivative(z, ACTIVATION, negative_slope)
    if GROUPED:
        dz = tl.where(out_of_range, float("nan"), dz)
    tl.store(dz_ptr + rows64[:, None] * R + r_offsets[None, :], dz, mask=row_mask[:, None] & r_mask[None, :])

    if NEED_DX:
        if DX_ADD_DY and HAS_LN:
            tl.debug_barrier()  # this program's dy stores above are read back below
        dz_dot = dz if DOT_FP32 else dz.to(dx_ptr.dtype.element_ty)
        if GROUPED:
            wd_ptr += _adapter(label) * R * H
        _dx_pass(dz_dot, wd_ptr, grad_ptr, dy_ptr, dx_ptr, rows64, row_mask, r_offsets, r_mask, H, stride_grad,
                 stride_dy, stride_dx, HAS_LN, DX_ADD_DY, DOT_FP32, DOT_PRECISION, BLOCK_H, REVERSE_SWEEPS and not dy_reversed)


@triton.jit
def _dx_pass(
    dz_dot, wd_ptr, grad_ptr, dy_ptr, dx_ptr, rows64, row_mask, r_offsets, r_mask, H, stride_grad, stride_dy,
    stride_dx,
    HAS_LN: tl.constexpr, DX_ADD_DY: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, REVERSE: tl.constexpr,
):
    """dx = dz @ Wd (+ dy, read back from dy_ptr with LayerNorm, else the upstream gradient), chunk by
    chunk over H."""
    for h_start in range(0, H, BLOCK_H):
        chunk_start, cols, col_mask = chunk_columns(h_start, H, BLOCK_H, REVERSE)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        wd = tl.load(  # [BLOCK_R, BLOCK_H]
            wd_ptr + r_offsets[:, None].to(tl.int64) * H + cols[None, :],
            mask=r_mask[:, None] & col_mask[None, :], other=0.0,
        )
        if DOT_FP32:
            wd = wd.to(tl.float32)
        dx = tl.dot(dz_dot, wd, input_precision=DOT_PRECISION)
        if DX_ADD_DY:
            if HAS_LN:
                dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=tile_mask, other=0.0)
            else:
                dy = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :], mask=tile_mask, other=0.0)
            dx += dy.to(tl.float32)
        tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------- launch helpers


def forward_outputs(x: torch.Tensor, rank: int, layer_norm: bool):
    """The forward's outputs, allocated: (out [T, H] in x's dtype, z [T, R] fp32, mean [T] and
    rstd [T] fp32, or [0] without LayerNorm)."""
    tokens, hidden = x.shape
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    z = torch.empty((tokens, rank), dtype=torch.float32, device=x.device)
    stats_size = tokens if layer_norm else 0
    mean = torch.empty(stats_size, dtype=torch.float32, device=x.device)
    rstd = torch.empty(stats_size, dtype=torch.float32, device=x.device)
    return out, z, mean, rstd


def forward_launch(outputs, x, rows, down_weight, down_bias, up_weight, up_bias, scale_mode, scale, scale_value,
                   residual, ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope, block_r):
    """(arguments, constexpr options) of an adapter_fwd_kernel launch writing `outputs` (forward_outputs'):
    GROUPED with rows = (order, work) of a multi-adapter grouping, rows in order with rows = None.
    The caller adds BLOCK_M and BLOCK_H (or lets the autotuner pick them) and the grid."""
    out, z, mean, rstd = outputs
    tokens, hidden = x.shape
    dummy = z  # any pointer for arguments a constexpr switch leaves unread
    order, work = rows if rows is not None else (dummy, dummy)
    residual = x if residual is None else residual
    dot_fp32, precision = dot_settings(x.dtype)
    arguments = (
        x, order, work, down_weight, down_bias if down_bias is not None else dummy, up_weight,
        up_bias if up_bias is not None else dummy, scale, residual,
        ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
        out, z, mean if layer_norm else dummy, rstd if layer_norm else dummy,
        tokens, hidden, down_weight.shape[-2], x.stride(0), residual.stride(0), out.stride(0),
        float(scale_value), float(ln_eps), float(negative_slope), token_bucket(tokens),
    )
    options = dict(
        ACTIVATION=activation, SCALE_MODE=scale_mode,
        HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None,
        HAS_LN=layer_norm, HAS_LN_WEIGHT=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None,
        GROUPED=rows is not None, DOT_FP32=dot_fp32, DOT_PRECISION=precision, REVERSE_SWEEPS=REVERSE_SWEEPS,
        BLOCK_R=block_r,
    )
    return arguments, options
