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

Both kernels are kernels/adapter_kernels.py's, launched with GROUPED=False (rows in order, one
adapter); kernels/multi_adapter.py launches the same two with GROUPED=True. Their row passes live in
kernels/adapter_rows.py; a pass over H that follows another over the same rows runs in the opposite
column order, so it starts on the columns still in L2. Forward and backward tune BLOCK_M per token
bucket; this file keeps the launchers, the autotuning and the compile variants.

References: Triton tutorials 03 (matrix multiplication) and 05 (layer norm); Liger-Kernel's
layer_norm; Welford / Chan et al. for merging chunk statistics.
"""

from __future__ import annotations

import torch
import triton

from . import adapter_rows as rows_
from .adapter_kernels import adapter_bwd_rows_kernel, adapter_fwd_kernel, forward_launch, forward_outputs
from .adapter_rows import SCALE_CHANNEL, SCALE_FLOAT, SCALE_SCALAR
from .launch import autotuning, dot_settings, token_bucket
from .shared import GELU

__all__ = ["SCALE_FLOAT", "SCALE_SCALAR", "SCALE_CHANNEL", "bottleneck_adapter_forward",
           "bottleneck_adapter_backward_rows", "compile_variants"]


# ----------------------------------------------------------------------------------- autotuning
# On a GPU the tile sizes are tuned per (H, R, dtype, options, token bucket); under the interpreter
# the heuristic config of row_block_sizes runs alone (tuning there would only multiply the test time).

_block_sizes = rows_.row_block_sizes


def _prune_forward_configs(configs, named_args, **kwargs):
    block_m, _, block_h, warps = _block_sizes(named_args["R"], named_args["H"],
                                              fp32=rows_.operands_fp32(named_args, backward=False))
    return rows_.prune_row_configs(configs, named_args, (block_m, block_h, warps), backward=False)


def _prune_backward_configs(configs, named_args, **kwargs):
    block_m, _, block_h, warps = _block_sizes(named_args["R"], named_args["H"], backward=True,
                                              fp32=rows_.operands_fp32(named_args, backward=True))
    return rows_.prune_row_configs(configs, named_args, (block_m, block_h, warps), backward=True)


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
)(adapter_fwd_kernel)

# BLOCK_M is tuned backward too: the launcher sizes the partial-sum buffers for the smallest
# candidate and sums only the rows the chosen config wrote.
_BACKWARD_BLOCK_M = (16, 32, 64, 128)
_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_H": block_h}, num_warps=warps, num_stages=stages)
    for block_m in _BACKWARD_BLOCK_M
    for block_h in (32, 64, 128)
    for warps, stages in ((8, 2), (8, 3), (4, 2))
]
bottleneck_adapter_bwd_rows_tuned = triton.autotune(
    configs=_BACKWARD_CONFIGS, key=_TUNING_KEY + ["NEED_DSCALE"],
    prune_configs_by={"early_config_prune": _prune_backward_configs},
)(adapter_bwd_rows_kernel)


# ----------------------------------------------------------------------------------- launchers


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
    outputs = forward_outputs(x, rank, layer_norm)
    if tokens == 0:
        return outputs
    scale_mode, scale = _scale_arguments(scale, scale_value, hidden, x.device)
    block_m, block_r, block_h, num_warps = _block_sizes(rank, hidden, fp32=x.dtype == torch.float32)
    arguments, options = forward_launch(outputs, x, None, down_weight, down_bias, up_weight, up_bias, scale_mode,
                                        scale, scale_value, residual, ln_weight, ln_bias, ln_eps, layer_norm,
                                        activation, negative_slope, block_r)
    if not autotuning():
        grid = (triton.cdiv(tokens, block_m),)
        adapter_fwd_kernel[grid](*arguments, **options, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps)
    else:
        bottleneck_adapter_fwd_tuned[lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]),)](*arguments, **options)
    return outputs


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
    tuned = autotuning()
    # tuned, BLOCK_M is chosen at launch: the partial sums get rows for the smallest candidate
    num_blocks = triton.cdiv(tokens, min(_BACKWARD_BLOCK_M) if tuned else block_m)
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
    dummy = dz  # also order_ptr, work_ptr (unread without GROUPED), wd_ptr and dx_ptr (without NEED_DX)
    arguments = (
        grad, residual if residual is not None else dummy, dummy, dummy, dummy, up_weight,
        up_bias if up_bias is not None else dummy, scale, ln_weight if ln_weight is not None else dummy,
        z, mean if layer_norm else dummy, rstd if layer_norm else dummy,
        dy if dy is not None else dummy, dz, dummy,
        *(p if p is not None else dummy for p in (dbu_part, dscale_part, dlnw_part, dlnb_part)),
        tokens, hidden, rank, grad.stride(0), residual.stride(0) if residual is not None else 0,
        dy.stride(0) if dy is not None else 0, 0,
        float(scale_value), float(negative_slope), token_bucket(tokens),
    )
    options = dict(
        ACTIVATION=activation, SCALE_MODE=scale_mode, HAS_UP_BIAS=up_bias is not None,
        HAS_LN=layer_norm, HAS_LN_WEIGHT=ln_weight is not None,
        NEED_U=layer_norm or need_scale_grad, NEED_DBU=need_up_bias_grad, NEED_DSCALE=need_scale_grad,
        NEED_DLNW=need_ln_weight_grad, NEED_DLNB=need_ln_bias_grad, NEED_DX=False, DX_ADD_DY=False,
        GROUPED=False, DOT_FP32=dot_fp32, DOT_PRECISION=precision, REVERSE_SWEEPS=rows_.REVERSE_SWEEPS, BLOCK_R=block_r,
    )
    if not tuned:
        adapter_bwd_rows_kernel[(num_blocks,)](*arguments, **options, BLOCK_M=block_m, BLOCK_H=block_h,
                                               num_warps=num_warps)
    else:
        bottleneck_adapter_bwd_rows_tuned[lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]),)](*arguments, **options)
        # the rows of the partial sums this launch wrote (best_config: the config the call ran, a host value)
        num_blocks = triton.cdiv(tokens, bottleneck_adapter_bwd_rows_tuned.best_config.kwargs["BLOCK_M"])
    sums = [p[:num_blocks].sum(0) if p is not None else None for p in (dbu_part, dscale_part, dlnw_part, dlnb_part)]
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
                yield (f"fwd-{dtype}-r{rank}-{'ln' if layer_norm else 'noln'}", adapter_fwd_kernel, dtype,
                       dict(ACTIVATION=GELU, SCALE_MODE=SCALE_CHANNEL, HAS_DOWN_BIAS=True, HAS_UP_BIAS=True,
                            HAS_LN=layer_norm, HAS_LN_WEIGHT=True, HAS_LN_BIAS=True, GROUPED=False,
                            DOT_FP32=dot_fp32, DOT_PRECISION="ieee", REVERSE_SWEEPS=True, BLOCK_M=block_m,
                            BLOCK_R=block_r, BLOCK_H=block_h),
                       DATA_POINTERS, warps, 3, _launch_values(hidden, rank))
                block_m, block_r, block_h, warps = _block_sizes(rank, hidden, backward=True, fp32=dot_fp32)
                yield (f"bwd-{dtype}-r{rank}-{'ln' if layer_norm else 'noln'}", adapter_bwd_rows_kernel, dtype,
                       dict(ACTIVATION=GELU, SCALE_MODE=SCALE_CHANNEL, HAS_UP_BIAS=True, HAS_LN=layer_norm,
                            HAS_LN_WEIGHT=True, NEED_U=layer_norm, NEED_DBU=True, NEED_DSCALE=False,
                            NEED_DLNW=layer_norm, NEED_DLNB=layer_norm, NEED_DX=False, DX_ADD_DY=False,
                            GROUPED=False, DOT_FP32=dot_fp32, DOT_PRECISION="ieee", REVERSE_SWEEPS=True, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h),
                       DATA_POINTERS, warps, 2, _launch_values(hidden, rank))
