"""Fused bottleneck adapter: y = residual + s * (act(x @ Wd.T + bd) @ Wu.T + bu), then LayerNorm.

Forward: one program per block of rows. The [rows, r] down-projection stays in registers; the
up-projection, scaling, residual and LayerNorm run chunk by chunk over the hidden size, so the only
[tokens, hidden] traffic is reading x (and the residual) and writing the output. With LayerNorm the
chunks are computed twice (statistics, then output) rather than storing unnormalised rows: one extra
small GEMM per chunk instead of a write and a read of [tokens, hidden].

Backward (rows kernel): recomputes the up-projection from the saved fp32 pre-activation z, forms
dy (through LayerNorm when present), accumulates da = (s * dy) @ Wu on chip, and writes dz [tokens, r]
and per-block column partial sums for the bias, scaling and LayerNorm gradients. The three
remaining products (dx = dz @ Wd + dy, dWd = dz.T @ x, dWu = (s * dy).T @ a) are plain GEMMs that
the ops layer hands to the BLAS.

References: Triton tutorials 03 (matrix multiplication) and 05 (layer norm); Liger-Kernel's
layer_norm; Welford / Chan et al. for merging chunk statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import shared
from .launch import autotuning, dot_settings, fill_the_device, interpreting, limit_configs, token_bucket
from .shared import GELU

# The activation codes (kernels/shared.py) as constexpr globals, the kind @triton.jit functions may read.
_RELU = tl.constexpr(shared.RELU)
_GELU = tl.constexpr(shared.GELU)
_GELU_TANH = tl.constexpr(shared.GELU_TANH)
_SILU = tl.constexpr(shared.SILU)
_TANH = tl.constexpr(shared.TANH)
_LEAKY_RELU = tl.constexpr(shared.LEAKY_RELU)

# Scaling modes: a Python float, one learnable scalar, or one value per hidden channel.
SCALE_FLOAT, SCALE_SCALAR, SCALE_CHANNEL = range(3)


@triton.jit
def _tanh(v):
    # 1 - 2 / (exp(2v) + 1): exact limits at ±inf, no libdevice dependency.
    return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr, negative_slope):
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
def _activation_derivative(z, ACTIVATION: tl.constexpr, negative_slope):
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
def _chunk_scale(scale_ptr, cols, col_mask, scale_value, SCALE_MODE: tl.constexpr):
    if SCALE_MODE == 2:
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    elif SCALE_MODE == 1:
        scale = tl.load(scale_ptr)
    else:
        scale = scale_value
    return scale


@triton.jit
def _chunk_sum(
    u, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, stride_res, scale_value,
    SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
):
    """From the product u = a @ Wu[cols].T: adds the bias, returns (u, y = residual + s * u, s)."""
    if HAS_UP_BIAS:
        u += tl.load(bu_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    scale = _chunk_scale(scale_ptr, cols, col_mask, scale_value, SCALE_MODE)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    residual = tl.load(res_ptr + rows64[:, None] * stride_res + cols[None, :], mask=tile_mask, other=0.0)
    y = residual.to(tl.float32) + scale * u
    return u, y, scale


@triton.jit
def _up_projection_chunk(
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
    return _chunk_sum(u, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, stride_res, scale_value,
                      SCALE_MODE, HAS_UP_BIAS)


@triton.jit
def bottleneck_adapter_fwd_kernel(
    x_ptr,  # [T, H]
    wd_ptr,  # [R, H]
    bd_ptr,  # [R]
    wu_ptr,  # [H, R]
    bu_ptr,  # [H]
    scale_ptr,  # [H] or [1], float32
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
    HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    r_offsets = tl.arange(0, BLOCK_R)
    r_mask = r_offsets < R

    # Down-projection: z = x @ Wd.T + bd, accumulated in fp32 over chunks of H.
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
    tl.store(z_ptr + rows64[:, None] * R + r_offsets[None, :], z, mask=row_mask[:, None] & r_mask[None, :])

    a = _activation(z, ACTIVATION, negative_slope)
    if DOT_FP32:
        a_dot = a
    else:
        a_dot = a.to(out_ptr.dtype.element_ty)

    if HAS_LN:
        # Pass 1: row statistics, merging each chunk's mean and M2 (Chan et al.).
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        count = 0.0
        for h_start in range(0, H, BLOCK_H):
            cols = h_start + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            u, y, scale = _up_projection_chunk(
                a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, r_offsets,
                r_mask, R, stride_res, scale_value, SCALE_MODE, HAS_UP_BIAS, DOT_PRECISION,
            )
            chunk_count = tl.minimum(H - h_start, BLOCK_H).to(tl.float32)
            chunk_mean = tl.sum(tl.where(col_mask[None, :], y, 0.0), axis=1) / chunk_count
            centred = tl.where(col_mask[None, :], y - chunk_mean[:, None], 0.0)
            chunk_m2 = tl.sum(centred * centred, axis=1)
            total = count + chunk_count
            delta = chunk_mean - mean
            mean += delta * (chunk_count / total)
            m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / H + eps)
        tl.store(mean_ptr + rows64, mean, mask=row_mask)
        tl.store(rstd_ptr + rows64, rstd, mask=row_mask)

    # Pass 2 (the only pass without LayerNorm): recompute each chunk and write the output.
    for h_start in range(0, H, BLOCK_H):
        cols = h_start + tl.arange(0, BLOCK_H)
        col_mask = cols < H
        u, y, scale = _up_projection_chunk(
            a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, r_offsets,
            r_mask, R, stride_res, scale_value, SCALE_MODE, HAS_UP_BIAS, DOT_PRECISION,
        )
        if HAS_LN:
            y = (y - mean[:, None]) * rstd[:, None]
            if HAS_LN_WEIGHT:
                y = y * tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_LN_BIAS:
                y = y + tl.load(lnb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows64[:, None] * stride_out + cols[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )


@triton.jit
def bottleneck_adapter_bwd_rows_kernel(
    grad_ptr,  # [T, H] upstream gradient of the output
    res_ptr,  # [T, H] residual (x when the residual is x); read only with LayerNorm
    wu_ptr,  # [H, R]
    bu_ptr,  # [H]
    scale_ptr,  # [H] or [1], float32
    lnw_ptr,  # [H]
    z_ptr,  # [T, R] float32, saved pre-activation
    mean_ptr,  # [T] float32
    rstd_ptr,  # [T] float32
    dy_ptr,  # [T, H] out: gradient at the pre-LayerNorm sum y (written only with LayerNorm)
    dz_ptr,  # [T, R] out float32: gradient at the pre-activation
    dbu_part_ptr,  # [num_blocks, H] out float32: per-block column sums of s * dy
    dscale_part_ptr,  # [num_blocks, H] out float32: per-block column sums of dy * u
    dlnw_part_ptr,  # [num_blocks, H] out float32: per-block column sums of grad * xhat
    dlnb_part_ptr,  # [num_blocks, H] out float32: per-block column sums of grad
    T, H, R,
    stride_grad, stride_res, stride_dy,
    scale_value, negative_slope,
    t_bucket,  # autotuning key only: launch.token_bucket(T)
    ACTIVATION: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr,
    NEED_U: tl.constexpr, NEED_DBU: tl.constexpr, NEED_DSCALE: tl.constexpr,
    NEED_DLNW: tl.constexpr, NEED_DLNB: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    r_offsets = tl.arange(0, BLOCK_R)
    r_mask = r_offsets < R
    part_row = pid.to(tl.int64) * H

    z = tl.load(z_ptr + rows64[:, None] * R + r_offsets[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
    a = _activation(z, ACTIVATION, negative_slope)
    if DOT_FP32:
        a_dot = a
    else:
        a_dot = a.to(grad_ptr.dtype.element_ty)

    if HAS_LN:
        mean = tl.load(mean_ptr + rows64, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows64, mask=row_mask, other=0.0)
        # Pass 1: the two row reductions of the LayerNorm backward.
        sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
        sum_g_xhat = tl.zeros([BLOCK_M], dtype=tl.float32)
        for h_start in range(0, H, BLOCK_H):
            cols = h_start + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            tile_mask = row_mask[:, None] & col_mask[None, :]
            u, y, scale = _up_projection_chunk(
                a_dot, wu_ptr, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, r_offsets,
                r_mask, R, stride_res, scale_value, SCALE_MODE, HAS_UP_BIAS, DOT_PRECISION,
            )
            xhat = (y - mean[:, None]) * rstd[:, None]
            g = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            if HAS_LN_WEIGHT:
                g = g * tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            sum_g += tl.sum(g, axis=1)
            sum_g_xhat += tl.sum(tl.where(tile_mask, g * xhat, 0.0), axis=1)
        mean_g = sum_g / H
        mean_g_xhat = sum_g_xhat / H

    # Pass 2: dy per chunk, da accumulated on chip, column partial sums.
    da = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        cols = h_start + tl.arange(0, BLOCK_H)
        col_mask = cols < H
        tile_mask = row_mask[:, None] & col_mask[None, :]
        grad = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        wu = tl.load(  # [BLOCK_H, BLOCK_R], loaded once for both products of this chunk
            wu_ptr + cols[:, None].to(tl.int64) * R + r_offsets[None, :],
            mask=col_mask[:, None] & r_mask[None, :], other=0.0,
        )
        if DOT_FP32:
            wu = wu.to(tl.float32)
        if NEED_U:
            u = tl.dot(a_dot, tl.trans(wu), input_precision=DOT_PRECISION)
            u, y, scale = _chunk_sum(u, bu_ptr, scale_ptr, res_ptr, rows64, row_mask, cols, col_mask, stride_res,
                                     scale_value, SCALE_MODE, HAS_UP_BIAS)
        else:
            scale = _chunk_scale(scale_ptr, cols, col_mask, scale_value, SCALE_MODE)
        if HAS_LN:
            xhat = (y - mean[:, None]) * rstd[:, None]
            g = grad
            if HAS_LN_WEIGHT:
                g = g * tl.load(lnw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            dy = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
            dy = tl.where(tile_mask, dy, 0.0)
            tl.store(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=tile_mask)
            if NEED_DLNW:
                tl.store(dlnw_part_ptr + part_row + cols, tl.sum(tl.where(tile_mask, grad * xhat, 0.0), axis=0), mask=col_mask)
            if NEED_DLNB:
                tl.store(dlnb_part_ptr + part_row + cols, tl.sum(grad, axis=0), mask=col_mask)
        else:
            dy = grad
        du = dy * scale
        if NEED_DBU:
            tl.store(dbu_part_ptr + part_row + cols, tl.sum(du, axis=0), mask=col_mask)
        if NEED_DSCALE:
            tl.store(dscale_part_ptr + part_row + cols, tl.sum(tl.where(tile_mask, dy * u, 0.0), axis=0), mask=col_mask)
        da = tl.dot(du.to(wu.dtype), wu, da, input_precision=DOT_PRECISION)

    dz = da * _activation_derivative(z, ACTIVATION, negative_slope)
    tl.store(dz_ptr + rows64[:, None] * R + r_offsets[None, :], dz, mask=row_mask[:, None] & r_mask[None, :])


# ----------------------------------------------------------------------------------- autotuning
# On a GPU the tile sizes are tuned per (H, R, dtype, options); under the interpreter the heuristic
# config of _block_sizes runs alone (tuning there would only multiply the test time).


def _heuristic_like(named_args, pointer, backward=False):
    block_m, _, block_h, warps = _block_sizes(named_args["R"], named_args["H"], backward=backward,
                                              fp32=named_args[pointer].dtype == torch.float32)
    return {"BLOCK_M": block_m, "BLOCK_H": block_h}, warps


def _prune_forward_configs(configs, named_args, **kwargs):
    block_r = max(16, triton.next_power_of_2(named_args["R"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_r <= 16384 and block_r * c.kwargs["BLOCK_H"] <= 32768]
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_H"])]
    kept = fill_the_device(kept, named_args["t_bucket"], named_args["x_ptr"].device)
    like, warps = _heuristic_like(named_args, "x_ptr")
    return limit_configs(kept, like, warps)


_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_H": block_h}, num_warps=warps, num_stages=stages)
    for block_m in (16, 32, 64, 128)
    for block_h in (32, 64, 128)
    for warps, stages in ((4, 3), (8, 3), (4, 4))
]
# t_bucket (the token count's power-of-two bucket): the best BLOCK_M at 512 tokens is not the one at 64K
_TUNING_KEY = ["H", "R", "ACTIVATION", "SCALE_MODE", "HAS_LN", "t_bucket"]
bottleneck_adapter_fwd_tuned = triton.autotune(
    configs=_FORWARD_CONFIGS, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune_forward_configs},
)(bottleneck_adapter_fwd_kernel)

# The backward's partial-sum buffers are sized by BLOCK_M, so BLOCK_M stays the heuristic one.
_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_H": block_h}, num_warps=warps, num_stages=stages)
    for block_h in (32, 64, 128)
    for warps, stages in ((8, 2), (8, 3), (4, 2))
]


def _prune_backward_configs(configs, named_args, **kwargs):
    block_r = max(16, triton.next_power_of_2(named_args["R"]))
    kept = [c for c in configs if block_r * c.kwargs["BLOCK_H"] <= 32768]
    like, warps = _heuristic_like(named_args, "grad_ptr", backward=True)
    like.pop("BLOCK_M")
    return limit_configs(kept or configs[:1], like, warps)


bottleneck_adapter_bwd_rows_tuned = triton.autotune(
    configs=_BACKWARD_CONFIGS, key=_TUNING_KEY + ["NEED_DSCALE"],
    prune_configs_by={"early_config_prune": _prune_backward_configs},
)(bottleneck_adapter_bwd_rows_kernel)


# ----------------------------------------------------------------------------------- launchers


def _block_sizes(rank: int, hidden: int, backward: bool = False, fp32: bool = False) -> tuple[int, int, int, int]:
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


def _scale_arguments(scale: torch.Tensor | None, scale_value: float, hidden: int, device) -> tuple[int, torch.Tensor]:
    if scale is None:
        return SCALE_FLOAT, torch.empty(1, dtype=torch.float32, device=device)
    scale = scale.detach().to(torch.float32).contiguous().reshape(-1)
    return (SCALE_CHANNEL if scale.numel() == hidden and hidden != 1 else SCALE_SCALAR), scale


def bottleneck_adapter_forward(
    x, down_weight, down_bias, up_weight, up_bias, scale, scale_value, residual,
    ln_weight, ln_bias, ln_eps, layer_norm, activation, negative_slope,
):
    """Launch the fused forward. x, residual: [T, H] with unit column stride; weights contiguous.
    Returns (out [T, H] in x's dtype, z [T, R] fp32, mean [T] / rstd [T] fp32, or [0] without LN)."""
    tokens, hidden = x.shape
    rank = down_weight.shape[0]
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    z = torch.empty((tokens, rank), dtype=torch.float32, device=x.device)
    stats_size = tokens if layer_norm else 0
    mean = torch.empty(stats_size, dtype=torch.float32, device=x.device)
    rstd = torch.empty(stats_size, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return out, z, mean, rstd
    residual = x if residual is None else residual
    scale_mode, scale = _scale_arguments(scale, scale_value, hidden, x.device)
    dot_fp32, precision = dot_settings(x.dtype)
    block_m, block_r, block_h, num_warps = _block_sizes(rank, hidden, fp32=x.dtype == torch.float32)
    dummy = z  # any pointer for arguments a constexpr switch leaves unread
    arguments = (
        x, down_weight, down_bias if down_bias is not None else dummy, up_weight,
        up_bias if up_bias is not None else dummy, scale, residual,
        ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
        out, z, mean if layer_norm else dummy, rstd if layer_norm else dummy,
        tokens, hidden, rank, x.stride(0), residual.stride(0), out.stride(0),
        float(scale_value), float(ln_eps), float(negative_slope), token_bucket(tokens),
    )
    options = dict(
        ACTIVATION=activation, SCALE_MODE=scale_mode,
        HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None,
        HAS_LN=layer_norm, HAS_LN_WEIGHT=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision, BLOCK_R=block_r,
    )
    if not autotuning():
        grid = (triton.cdiv(tokens, block_m),)
        bottleneck_adapter_fwd_kernel[grid](*arguments, **options, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps)
    else:
        bottleneck_adapter_fwd_tuned[lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]),)](*arguments, **options)
    return out, z, mean, rstd


def bottleneck_adapter_backward_rows(
    grad, residual, up_weight, up_bias, scale, scale_value, ln_weight, z, mean, rstd, layer_norm,
    activation, negative_slope, need_up_bias_grad, need_scale_grad, need_ln_weight_grad, need_ln_bias_grad,
):
    """Launch the rows part of the backward. grad, residual: [T, H] with unit column stride.
    Returns dy ([T, H] in grad's dtype with LayerNorm, else None), dz [T, R] fp32, and the column
    sums (fp32 [H], or None when not asked for) of s*dy, dy*u, grad*xhat and grad."""
    tokens, hidden = grad.shape
    rank = z.shape[1]
    device = grad.device
    block_m, block_r, block_h, num_warps = _block_sizes(rank, hidden, backward=True, fp32=grad.dtype == torch.float32)
    num_blocks = triton.cdiv(tokens, block_m)
    dz = torch.empty((tokens, rank), dtype=torch.float32, device=device)
    dy = torch.empty((tokens, hidden), dtype=grad.dtype, device=device) if layer_norm else None

    def partials(needed):
        return torch.empty((num_blocks, hidden), dtype=torch.float32, device=device) if needed else None

    need_ln_weight_grad = need_ln_weight_grad and layer_norm
    need_ln_bias_grad = need_ln_bias_grad and layer_norm
    dbu_part, dscale_part = partials(need_up_bias_grad), partials(need_scale_grad)
    dlnw_part, dlnb_part = partials(need_ln_weight_grad), partials(need_ln_bias_grad)
    if tokens == 0:
        zero_sum = torch.zeros(hidden, dtype=torch.float32, device=device)
        sums = [zero_sum if p is not None else None for p in (dbu_part, dscale_part, dlnw_part, dlnb_part)]
        return (dy, dz, *sums)
    scale_mode, scale = _scale_arguments(scale, scale_value, hidden, device)
    dot_fp32, precision = dot_settings(grad.dtype)
    dummy = dz
    arguments = (
        grad, residual if residual is not None else dummy, up_weight,
        up_bias if up_bias is not None else dummy, scale, ln_weight if ln_weight is not None else dummy,
        z, mean if layer_norm else dummy, rstd if layer_norm else dummy,
        dy if dy is not None else dummy, dz,
        *(p if p is not None else dummy for p in (dbu_part, dscale_part, dlnw_part, dlnb_part)),
        tokens, hidden, rank, grad.stride(0), residual.stride(0) if residual is not None else 0,
        dy.stride(0) if dy is not None else 0,
        float(scale_value), float(negative_slope), token_bucket(tokens),
    )
    options = dict(
        ACTIVATION=activation, SCALE_MODE=scale_mode, HAS_UP_BIAS=up_bias is not None,
        HAS_LN=layer_norm, HAS_LN_WEIGHT=ln_weight is not None,
        NEED_U=layer_norm or need_scale_grad, NEED_DBU=need_up_bias_grad, NEED_DSCALE=need_scale_grad,
        NEED_DLNW=need_ln_weight_grad, NEED_DLNB=need_ln_bias_grad,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_R=block_r,
    )
    if not autotuning():
        bottleneck_adapter_bwd_rows_kernel[(num_blocks,)](*arguments, **options, BLOCK_H=block_h, num_warps=num_warps)
    else:
        bottleneck_adapter_bwd_rows_tuned[(num_blocks,)](*arguments, **options)
    sums = [p.sum(0) if p is not None else None for p in (dbu_part, dscale_part, dlnw_part, dlnb_part)]
    return (dy, dz, *sums)


# ------------------------------------------------------------------------ ahead-of-time compile list

DATA_POINTERS = frozenset({"x_ptr", "wd_ptr", "bd_ptr", "wu_ptr", "bu_ptr", "res_ptr", "lnw_ptr", "lnb_ptr",
                           "out_ptr", "grad_ptr", "dy_ptr"})


def _launch_values(hidden: int, rank: int) -> dict:
    """The integer arguments of a headline launch (contiguous [T, H] rows), for compile_check's hints;
    T is left out (any token count)."""
    return {"H": hidden, "R": rank, **{name: hidden for name in ("stride_x", "stride_res", "stride_out",
                                                                 "stride_grad", "stride_dy")}}


def compile_variants(hidden: int = 4096):
    """The launch configurations kernels/compile_check.py compiles for a GPU target: every dtype,
    with and without LayerNorm, ranks 16/64/256, at the heuristic tile sizes. Yields
    (name, kernel, dtype, constexprs, data_pointers, num_warps, num_stages)."""
    for dtype in ("bfloat16", "float16", "float32"):
        for layer_norm in (False, True):
            for rank in (16, 64, 256):
                dot_fp32 = dtype == "float32"
                block_m, block_r, block_h, warps = _block_sizes(rank, hidden, fp32=dot_fp32)
                yield (f"fwd-{dtype}-r{rank}-{'ln' if layer_norm else 'noln'}", bottleneck_adapter_fwd_kernel, dtype,
                       dict(ACTIVATION=GELU, SCALE_MODE=SCALE_CHANNEL, HAS_DOWN_BIAS=True, HAS_UP_BIAS=True,
                            HAS_LN=layer_norm, HAS_LN_WEIGHT=True, HAS_LN_BIAS=True, DOT_FP32=dot_fp32,
                            DOT_PRECISION="ieee", BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h),
                       DATA_POINTERS, warps, 3, _launch_values(hidden, rank))
                block_m, block_r, block_h, warps = _block_sizes(rank, hidden, backward=True, fp32=dot_fp32)
                yield (f"bwd-{dtype}-r{rank}-{'ln' if layer_norm else 'noln'}", bottleneck_adapter_bwd_rows_kernel,
                       dtype,
                       dict(ACTIVATION=GELU, SCALE_MODE=SCALE_CHANNEL, HAS_UP_BIAS=True, HAS_LN=layer_norm,
                            HAS_LN_WEIGHT=True, NEED_U=layer_norm, NEED_DBU=True, NEED_DSCALE=False,
                            NEED_DLNW=layer_norm, NEED_DLNB=layer_norm, DOT_FP32=dot_fp32, DOT_PRECISION="ieee",
                            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h),
                       DATA_POINTERS, warps, 2, _launch_values(hidden, rank))
