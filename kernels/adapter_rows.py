"""The row passes of a bottleneck adapter, shared by kernels/bottleneck_adapter.py (one adapter, rows
in order) and kernels/multi_adapter.py (rows gathered per adapter): each kernel there is a shell that
finds its rows and weights, then calls these @triton.jit helpers.

    y = residual + s * (act(x @ Wd.T + bd) @ Wu.T + bu), out = LayerNorm(y) when asked

Row blocks are addressed by `rows64` (int64 row numbers, in order or gathered) and `row_mask`.
`poison` (a scalar bool, read only with GATHERED) marks a block of rows whose adapter index was out
of range: their outputs become NaN.

Sweep order: a pass over H that follows another pass over the same rows runs in the opposite column
order (REVERSE), so it starts on the columns the previous pass read last, the ones still in L2
(bench/NOTES.md, issue #13). REVERSE_SWEEPS below switches that off, for tests comparing the orders.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import shared
from .launch import fill_the_device, limit_configs

# The activation codes (kernels/shared.py) as constexpr globals, the kind @triton.jit functions may read.
_RELU = tl.constexpr(shared.RELU)
_GELU = tl.constexpr(shared.GELU)
_GELU_TANH = tl.constexpr(shared.GELU_TANH)
_SILU = tl.constexpr(shared.SILU)
_TANH = tl.constexpr(shared.TANH)
_LEAKY_RELU = tl.constexpr(shared.LEAKY_RELU)

# Scaling modes: a Python float, one learnable scalar (one per adapter), or one value per channel.
SCALE_FLOAT, SCALE_SCALAR, SCALE_CHANNEL = range(3)

# Whether the launchers ask for alternating sweep orders (a constexpr of every rows kernel).
REVERSE_SWEEPS = True


@triton.jit
def _tanh(v):
    # 1 - 2 / (exp(2v) + 1): exact limits at ±inf, no libdevice dependency.
    return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)


@triton.jit
def activation(z, ACTIVATION: tl.constexpr, negative_slope):
    if ACTIVATION == _RELU:
        # torch.relu keeps NaN; a GPU max.f32 (tl.maximum) returns the other operand: 0
        a = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == _GELU:
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == _GELU_TANH:
        a = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == _SILU:
        a = z * tl.sigmoid(z)
    elif ACTIVATION == _TANH:
        a = _tanh(z)
    elif ACTIVATION == _LEAKY_RELU:
        a = tl.where(z > 0, z, z * negative_slope)
    else:
        a = z
    return a


@triton.jit
def activation_derivative(z, ACTIVATION: tl.constexpr, negative_slope):
    if ACTIVATION == _RELU:
        d = tl.where(z <= 0, 0.0, 1.0)  # threshold_backward's rule: a NaN z passes the gradient
    elif ACTIVATION == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d = cdf + z * pdf
    elif ACTIVATION == _GELU_TANH:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == _SILU:
        sig = tl.sigmoid(z)
        d = sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == _TANH:
        t = _tanh(z)
        d = 1.0 - t * t
    elif ACTIVATION == _LEAKY_RELU:
        d = tl.where(z > 0, 1.0, negative_slope)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def chunk_columns(h_start, H, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr):
    """The hidden columns of the chunk a sweep `for h_start in range(0, H, BLOCK_H)` is at: that
    chunk, or with REVERSE its mirror, so the sweep runs last to first. (The loop keeps the plain
    form either way: ptxas gave the step-counting form up to 30 more registers.)"""
    if REVERSE:
        h_start = (tl.cdiv(H, BLOCK_H) - 1) * BLOCK_H - h_start
    cols = h_start + tl.arange(0, BLOCK_H)
    return h_start, cols, cols < H


@triton.jit
def chunk_scale(scale_ptr, cols, col_mask, scale_value, SCALE_MODE: tl.constexpr):
    if SCALE_MODE == 2:
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    elif SCALE_MODE == 1:
        scale = tl.load(scale_ptr)
    else:
        scale = scale_value
    return scale


@triton.jit
def chunk_sum(
    u, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, stride_res, scale_value,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
):
    """From the product u = a @ Wu[cols].T: adds the bias, returns (u, y = residual + s * u, s)."""
    if HAS_UP_BIAS:
        u += tl.load(bu_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    scale = chunk_scale(scale_ptr, cols, col_mask, scale_value, SCALE_MODE)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    residual = tl.load(res_ptr + rows64[:, None] * stride_res + cols[None, :], mask=tile_mask, other=0.0)
    y = residual.to(tl.float32) + scale * u
    return u, y, scale


@triton.jit
def up_projection_chunk(
    a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, r_offsets, r_mask,
    R, stride_res, scale_value,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """u = a @ Wu[cols].T + bu[cols] and y = residual + s * u for one chunk of hidden columns."""
    wu_t = tl.load(  # [BLOCK_R, BLOCK_H] view of Wu.T
        wu_ptr + cols[None, :].to(tl.int64) * R + r_offsets[:, None],
        mask=r_mask[:, None] & col_mask[None, :], other=0.0,
    )
    u = tl.dot(a_dot, wu_t.to(a_dot.dtype), input_precision=DOT_PRECISION)
    return chunk_sum(u, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, stride_res, scale_value,
                     SCALE_MODE, HAS_UP_BIAS)


@triton.jit
def down_projection(
    x_ptr, wd_ptr, bd_ptr, z_ptr, out_ptr, rows64, row_mask, r_offsets, r_mask, poison, H, R, stride_x,
    negative_slope,
    ACTIVATION: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, GATHERED: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """z = x @ Wd.T + bd for the block's rows, accumulated in fp32 over chunks of H (first to last),
    stored at z_ptr (fp32 [T, R], saved for backward). Returns act(z) as the up-projection's
    operand (fp32, or out_ptr's dtype)."""
    z = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        cols = h_start + tl.arange(0, BLOCK_H)
        col_mask = cols < H
        x_tile = tl.load(
            x_ptr + rows64[:, None] * stride_x + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )
        wd_t = tl.load(  # [BLOCK_H, BLOCK_R] view of Wd.T
            wd_ptr + r_offsets[None, :].to(tl.int64) * H + cols[:, None],
            mask=r_mask[None, :] & col_mask[:, None], other=0.0,
        )
        if DOT_FP32:
            z = tl.dot(x_tile.to(tl.float32), wd_t.to(tl.float32), z, input_precision=DOT_PRECISION)
        else:
            z = tl.dot(x_tile, wd_t, z, input_precision=DOT_PRECISION)
    if HAS_DOWN_BIAS:
        z += tl.load(bd_ptr + r_offsets, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    if GATHERED:
        z = tl.where(poison, float("nan"), z)
    tl.store(z_ptr + rows64[:, None] * R + r_offsets[None, :], z, mask=row_mask[:, None] & r_mask[None, :])
    a = activation(z, ACTIVATION, negative_slope)
    return a if DOT_FP32 else a.to(out_ptr.dtype.element_ty)


@triton.jit
def ln_statistics(
    a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, r_offsets, r_mask,
    H, R, stride_res, scale_value, eps,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr,
):
    """(mean, rstd) of each row of y, merging each chunk's mean and M2 (Chan et al.)."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = 0.0
    for h_start in range(0, H, BLOCK_H):
        chunk_start, cols, col_mask = chunk_columns(h_start, H, BLOCK_H, REVERSE)
        u, y, scale = up_projection_chunk(
            a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, r_offsets,
            r_mask, R, stride_res, scale_value, SCALE_MODE, HAS_UP_BIAS, DOT_PRECISION,
        )
        chunk_count = tl.minimum(H - chunk_start, BLOCK_H).to(tl.float32)
        chunk_mean = tl.sum(tl.where(col_mask[None, :], y, 0.0), axis=1) / chunk_count
        centred = tl.where(col_mask[None, :], y - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(centred * centred, axis=1)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
        count = total
    return mean, 1.0 / tl.sqrt(m2 / H + eps)


@triton.jit
def output_pass(
    a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, lnb_ptr, out_ptr, rows64, row_mask, r_offsets, r_mask,
    mean, rstd, poison, H, R, stride_res, stride_out, scale_value,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    GATHERED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr,
):
    """Recompute each chunk of y, normalise it (with LayerNorm) and write the output."""
    for h_start in range(0, H, BLOCK_H):
        chunk_start, cols, col_mask = chunk_columns(h_start, H, BLOCK_H, REVERSE)
        u, y, scale = up_projection_chunk(
            a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, r_offsets,
            r_mask, R, stride_res, scale_value, SCALE_MODE, HAS_UP_BIAS, DOT_PRECISION,
        )
        if HAS_LN:
            y = (y - mean[:, None]) * rstd[:, None]
            if HAS_LN_WEIGHT:
                y = y * tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_LN_BIAS:
                y = y + tl.load(lnb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATHERED:
            y = tl.where(poison, float("nan"), y)
        tl.store(
            out_ptr + rows64[:, None] * stride_out + cols[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )


@triton.jit
def up_projection_passes(
    a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, lnb_ptr, out_ptr, mean_ptr, rstd_ptr, rows64, row_mask,
    r_offsets, r_mask, poison, H, R, stride_res, stride_out, scale_value, eps,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    GATHERED: tl.constexpr, DOT_PRECISION: tl.constexpr, REVERSE_SWEEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The forward after the down-projection's sweep (first to last column): with LayerNorm the
    statistics sweep (last to first; mean and rstd stored) then the output sweep (first to last);
    without, the output sweep alone (last to first)."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = mean
    if HAS_LN:
        mean, rstd = ln_statistics(a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, r_offsets, r_mask,
                                   H, R, stride_res, scale_value, eps, SCALE_MODE, HAS_UP_BIAS, DOT_PRECISION,
                                   BLOCK_M, BLOCK_H, REVERSE_SWEEPS)
        tl.store(mean_ptr + rows64, mean, mask=row_mask)
        tl.store(rstd_ptr + rows64, rstd, mask=row_mask)
    output_pass(a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, lnb_ptr, out_ptr, rows64, row_mask, r_offsets,
                r_mask, mean, rstd, poison, H, R, stride_res, stride_out, scale_value, SCALE_MODE, HAS_UP_BIAS,
                HAS_LN, HAS_LN_WEIGHT, HAS_LN_BIAS, GATHERED, DOT_PRECISION, BLOCK_H, REVERSE_SWEEPS and not HAS_LN)


@triton.jit
def ln_backward_sums(
    a_dot, grad_ptr, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, rows64, row_mask, r_offsets, r_mask,
    mean, rstd, H, R, stride_grad, stride_res, scale_value,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The two row reductions of the LayerNorm backward: mean(g) and mean(g * xhat), g = grad * w."""
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_g_xhat = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        cols = h_start + tl.arange(0, BLOCK_H)
        col_mask = cols < H
        tile_mask = row_mask[:, None] & col_mask[None, :]
        u, y, scale = up_projection_chunk(
            a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, r_offsets,
            r_mask, R, stride_res, scale_value, SCALE_MODE, HAS_UP_BIAS, DOT_PRECISION,
        )
        xhat = (y - mean[:, None]) * rstd[:, None]
        g = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_LN_WEIGHT:
            g = g * tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        sum_g += tl.sum(g, axis=1)
        sum_g_xhat += tl.sum(tl.where(tile_mask, g * xhat, 0.0), axis=1)
    return sum_g / H, sum_g_xhat / H


@triton.jit
def backward_row_state(
    grad_ptr, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, z_ptr, mean_ptr, rstd_ptr, rows64, row_mask,
    r_offsets, r_mask, H, R, stride_grad, stride_res, scale_value, negative_slope,
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_LN: tl.constexpr,
    HAS_LN_WEIGHT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The start of the backward for a block of rows: the saved fp32 pre-activation z, act(z) as the
    up-projection's operand (fp32, or grad's dtype) and, with LayerNorm, the saved mean and rstd and
    the row sums mean(g) and mean(g * xhat) of ln_backward_sums (zeros without LayerNorm).
    Returns (z, a_dot, mean, rstd, mean_g, mean_g_xhat)."""
    z = tl.load(z_ptr + rows64[:, None] * R + r_offsets[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
    a = activation(z, ACTIVATION, negative_slope)
    a_dot = a if DOT_FP32 else a.to(grad_ptr.dtype.element_ty)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd, mean_g, mean_g_xhat = mean, mean, mean
    if HAS_LN:
        mean = tl.load(mean_ptr + rows64, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows64, mask=row_mask, other=0.0)
        mean_g, mean_g_xhat = ln_backward_sums(a_dot, grad_ptr, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, rows64,
                                               row_mask, r_offsets, r_mask, mean, rstd, H, R, stride_grad, stride_res,
                                               scale_value, SCALE_MODE, HAS_UP_BIAS, HAS_LN_WEIGHT, DOT_PRECISION,
                                               BLOCK_M, BLOCK_H)
    return z, a_dot, mean, rstd, mean_g, mean_g_xhat


@triton.jit
def dy_da_pass(
    a_dot, grad_ptr, wu_ptr, bu_ptr, scale_ptr, res_ptr, lnw_ptr, dy_ptr,
    dbu_part_ptr, dscale_part_ptr, dlnw_part_ptr, dlnb_part_ptr, part_row,
    rows64, row_mask, r_offsets, r_mask, mean, rstd, mean_g, mean_g_xhat, poison,
    H, R, stride_grad, stride_res, stride_dy, scale_value,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr,
    NEED_U: tl.constexpr, NEED_DBU: tl.constexpr, NEED_DSCALE: tl.constexpr,
    NEED_DLNW: tl.constexpr, NEED_DLNB: tl.constexpr, GATHERED: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr,
):
    """dy per chunk (through LayerNorm, written to dy_ptr), the column partial sums of this block
    (row part_row of each partial buffer), and da = (s * dy) @ Wu accumulated on chip (returned)."""
    da = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        chunk_start, cols, col_mask = chunk_columns(h_start, H, BLOCK_H, REVERSE)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        grad = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :], mask=tile_mask, other=0.0)
        grad = grad.to(tl.float32)
        wu = tl.load(  # [BLOCK_H, BLOCK_R], loaded once for both products of this chunk
            wu_ptr + cols[:, None].to(tl.int64) * R + r_offsets[None, :],
            mask=col_mask[:, None] & r_mask[None, :], other=0.0,
        )
        if DOT_FP32:
            wu = wu.to(tl.float32)
        if NEED_U:
            u = tl.dot(a_dot, tl.trans(wu), input_precision=DOT_PRECISION)
            u, y, scale = chunk_sum(u, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, stride_res,
                                    scale_value, SCALE_MODE, HAS_UP_BIAS)
        else:
            scale = chunk_scale(scale_ptr, cols, col_mask, scale_value, SCALE_MODE)
        if HAS_LN:
            xhat = (y - mean[:, None]) * rstd[:, None]
            g = grad
            if HAS_LN_WEIGHT:
                g = g * tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            dy = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
            dy = tl.where(tile_mask, dy, 0.0)
            dy_out = dy
            if GATHERED:
                dy_out = tl.where(poison, float("nan"), dy)
            tl.store(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], dy_out.to(dy_ptr.dtype.element_ty),
                     mask=tile_mask)
            if NEED_DLNW:
                tl.store(dlnw_part_ptr + part_row + cols, tl.sum(tl.where(tile_mask, grad * xhat, 0.0), axis=0),
                         mask=col_mask)
            if NEED_DLNB:
                tl.store(dlnb_part_ptr + part_row + cols, tl.sum(grad, axis=0), mask=col_mask)
        else:
            dy = grad
        du = dy * scale
        if NEED_DBU:
            tl.store(dbu_part_ptr + part_row + cols, tl.sum(du, axis=0), mask=col_mask)
        if NEED_DSCALE:
            tl.store(dscale_part_ptr + part_row + cols, tl.sum(tl.where(tile_mask, dy * u, 0.0), axis=0),
                     mask=col_mask)
        da = tl.dot(du.to(wu.dtype), wu, da, input_precision=DOT_PRECISION)
    return da


# ----------------------------------------------------------------------------- host-side choices


def row_block_sizes(rank: int, hidden: int, backward: bool = False, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_H, num_warps) heuristics: the [BLOCK_M, BLOCK_R] fp32 accumulator
    stays near 8K elements forward and 4K backward (which holds two products per chunk), fp32
    operands take half the tile; ptxas reports for sm_90 (kernels/compile_check.py, bench/NOTES.md)
    show 16-bit variants at these sizes without spills."""
    block_r = max(16, triton.next_power_of_2(rank))
    budget = (4096 if backward else 8192) // (2 if fp32 else 1)
    block_m = max(16, min(32 if backward else 64, budget // block_r))
    block_h = (64 if block_r <= 128 else 32) // (2 if fp32 else 1)
    block_h = max(16, min(block_h, triton.next_power_of_2(hidden)))
    num_warps = 8 if block_m * max(block_r, block_h) >= 2048 else 4
    return block_m, block_r, block_h, num_warps


def prune_row_configs(configs, named_args, heuristic, backward: bool):
    """The early_config_prune of every rows kernel. Drops tiles whose [BLOCK_R, BLOCK_H] operand or
    [BLOCK_M, BLOCK_R] accumulators outgrow the register file; with a BLOCK_M among the configs,
    keeps those giving >= 2 programs per SM at this token bucket (kernels/launch.fill_the_device);
    then launch.limit_configs nearest to `heuristic` = (BLOCK_M or None, BLOCK_H, num_warps)."""
    block_r = max(16, triton.next_power_of_2(named_args["R"]))
    rows_budget = 8192 if backward else 16384  # the backward holds da, z and a; the forward z and a

    def fits(config):  # a config without BLOCK_M runs at the launcher's (multi_adapter's work table)
        block_m = config.kwargs.get("BLOCK_M", 16)
        return block_m * block_r <= rows_budget and block_r * config.kwargs["BLOCK_H"] <= 32768

    kept = [c for c in configs if fits(c)]
    kept = kept or [min(configs, key=lambda c: c.kwargs.get("BLOCK_M", 1) * c.kwargs["BLOCK_H"])]
    pointer = "grad_ptr" if backward else "x_ptr"
    kept = fill_the_device(kept, named_args["t_bucket"], named_args[pointer].device)
    block_m, block_h, warps = heuristic
    like = {"BLOCK_M": block_m, "BLOCK_H": block_h} if "BLOCK_M" in kept[0].kwargs else {"BLOCK_H": block_h}
    return limit_configs(kept, like, warps)


def operands_fp32(named_args, backward: bool) -> bool:
    """Whether a rows kernel launch has fp32 operands (its heuristic tiles are then halved)."""
    return named_args["grad_ptr" if backward else "x_ptr"].dtype == torch.float32
