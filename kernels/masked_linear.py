"""Mask-tuning: linear layers whose frozen weight is masked by a 1-bit packed mask.

    forward      y      = x @ (W ⊙ M).T + b          [M, N]
    grad_input   dx     = dy @ (W ⊙ M)                [M, K]
    grad_scores  dS     = (dyᵀ @ x) ⊙ W               [N, K], fp32 (straight-through estimator)
    pack         packed = packbits(S > threshold)     [N, ceil(K / 8)], uint8

Mask format: uint8 [N, ceil(K / 8)]; bit j of byte b is input column 8·b + j (numpy.packbits(axis=1,
bitorder="little")); unused tail bits are zero. W ⊙ M is never written to memory: the GEMMs load a
weight tile and its mask bytes, expand the bits in registers ((byte >> (k % 8)) & 1) and select the
kept weights (tl.where, so even inf/NaN in a masked-out weight has no effect) before tl.dot; the
scores gradient applies ⊙W in the epilogue, so dW_eff = dyᵀ x is never stored either.

The forward and grad_input GEMMs compute the transposed product (swap-AB): the masked weight tile is
the dot's left operand, which the Hopper wgmma path can take straight from registers after the
select (the right operand must come from shared memory), and the token dimension becomes the dot's
N dimension, which may be as narrow as 16: small batches waste less of each MMA.

References: Triton tutorial 03 (matrix multiplication); Zhao et al., "Masking as an Efficient
Alternative to Finetuning for Pretrained Language Models" (EMNLP 2020); numpy.packbits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autotuning, dot_settings, limit_configs


@triton.jit
def _masked_weight_tile(
    w_ptr, mask_ptr, n64, n_mask, k_start, N, K, KB, stride_wn, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The [BLOCK_N, BLOCK_K] tile of W ⊙ M at rows n64 and columns k_start + arange(BLOCK_K),
    zero outside [N, K]. BLOCK_K is a multiple of 8 and k_start of BLOCK_K, so the tile covers
    whole mask bytes: BLOCK_K // 8 bytes per row, each expanded into its 8 bits."""
    ks = k_start + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    w = tl.load(
        w_ptr + n64[:, None] * stride_wn + ks[None, :].to(tl.int64) * stride_wk,
        mask=n_mask[:, None] & k_mask[None, :], other=0.0,
    )
    byte_columns = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    mask_bytes = tl.load(  # [BLOCK_N, BLOCK_K // 8]
        mask_ptr + n64[:, None] * KB + byte_columns[None, :],
        mask=n_mask[:, None] & (byte_columns < KB)[None, :], other=0,
    ).to(tl.int32)
    shifts = tl.arange(0, 8)
    bits = (mask_bytes[:, :, None] >> shifts[None, None, :]) & 1  # [BLOCK_N, BLOCK_K // 8, 8]
    bits = tl.reshape(bits, (BLOCK_N, BLOCK_K))  # row-major: column 8·b + j is bit j of byte b
    return tl.where(bits != 0, w, tl.zeros_like(w))


@triton.jit
def masked_linear_fwd_kernel(
    x_ptr,  # [M, K], unit column stride
    w_ptr,  # [N, K], any strides
    mask_ptr,  # [N, KB] uint8, contiguous, KB = ceil(K / 8)
    b_ptr,  # [N]
    y_ptr,  # [M, N], unit column stride
    M, N, K, KB,
    stride_xm, stride_wn, stride_wk, stride_ym,
    m_bucket,  # autotuning key only: next power of two of M, clamped to [16, 4096]
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Typed here rather than by the caller so that the ahead-of-time compile check (which gives
    # every non-activation pointer fp32) compiles the real byte loads.
    mask_ptr = mask_ptr.to(tl.pointer_type(tl.uint8))
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    n64 = n.to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    m64 = m.to(tl.int64)

    # acc = (W ⊙ M) @ x.T: [BLOCK_N, BLOCK_M], fp32
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        wm = _masked_weight_tile(w_ptr, mask_ptr, n64, n_mask, k_start, N, K, KB, stride_wn, stride_wk,
                                 BLOCK_N, BLOCK_K)
        ks = k_start + tl.arange(0, BLOCK_K)
        x_t = tl.load(  # [BLOCK_K, BLOCK_M] view of x.T
            x_ptr + m64[None, :] * stride_xm + ks[:, None],
            mask=m_mask[None, :] & (ks < K)[:, None], other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(wm.to(tl.float32), x_t.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(wm, x_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(
        y_ptr + m64[None, :] * stride_ym + n64[:, None],
        acc.to(y_ptr.dtype.element_ty),
        mask=n_mask[:, None] & m_mask[None, :],
    )


@triton.jit
def masked_linear_grad_input_kernel(
    grad_ptr,  # [M, N], unit column stride
    w_ptr,  # [N, K], any strides
    mask_ptr,  # [N, KB] uint8, contiguous, KB = ceil(K / 8)
    dx_ptr,  # [M, K], unit column stride
    M, N, K, KB,
    stride_gm, stride_wn, stride_wk, stride_dxm,
    m_bucket,  # autotuning key only
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    mask_ptr = mask_ptr.to(tl.pointer_type(tl.uint8))
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    m64 = m.to(tl.int64)

    # acc = (W ⊙ M).T @ grad.T: [BLOCK_K, BLOCK_M], fp32, reducing over N
    acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_mask = n < N
        wm = _masked_weight_tile(w_ptr, mask_ptr, n.to(tl.int64), n_mask, pid_k * BLOCK_K, N, K, KB,
                                 stride_wn, stride_wk, BLOCK_N, BLOCK_K)
        g_t = tl.load(  # [BLOCK_N, BLOCK_M] view of grad.T
            grad_ptr + m64[None, :] * stride_gm + n[:, None],
            mask=m_mask[None, :] & n_mask[:, None], other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(tl.trans(wm.to(tl.float32)), g_t.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(tl.trans(wm), g_t, acc, input_precision=DOT_PRECISION)
    tl.store(
        dx_ptr + m64[None, :] * stride_dxm + ks[:, None],
        acc.to(dx_ptr.dtype.element_ty),
        mask=k_mask[:, None] & m_mask[None, :],
    )


@triton.jit
def masked_linear_grad_scores_kernel(
    grad_ptr,  # [M, N], unit column stride
    x_ptr,  # [M, K], unit column stride
    w_ptr,  # [N, K], any strides
    ds_ptr,  # [N, K] float32, contiguous
    M, N, K,
    stride_gm, stride_xm, stride_wn, stride_wk,
    m_bucket,  # autotuning key only
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    n64 = n.to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K

    # acc = grad.T @ x: [BLOCK_N, BLOCK_K], fp32, reducing over the M rows
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m_start in range(0, M, BLOCK_M):
        m = m_start + tl.arange(0, BLOCK_M)
        m_mask = m < M
        m64 = m.to(tl.int64)
        g_t = tl.load(  # [BLOCK_N, BLOCK_M] view of grad.T
            grad_ptr + m64[None, :] * stride_gm + n[:, None],
            mask=m_mask[None, :] & n_mask[:, None], other=0.0,
        )
        x = tl.load(  # [BLOCK_M, BLOCK_K]
            x_ptr + m64[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(g_t.to(tl.float32), x.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(g_t, x, acc, input_precision=DOT_PRECISION)
    tile_mask = n_mask[:, None] & k_mask[None, :]
    w = tl.load(w_ptr + n64[:, None] * stride_wn + ks[None, :].to(tl.int64) * stride_wk, mask=tile_mask, other=0.0)
    tl.store(ds_ptr + n64[:, None] * K + ks[None, :], acc * w.to(tl.float32), mask=tile_mask)


@triton.jit
def pack_mask_kernel(
    scores_ptr,  # [N, K], any float dtype, any strides
    threshold_ptr,  # [1], scores' dtype: the threshold rounded as torch rounds a scalar operand
    packed_ptr,  # [N, KB] uint8, contiguous, KB = ceil(K / 8)
    N, K, KB,
    stride_sn, stride_sk,
    BLOCK_ROWS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    packed_ptr = packed_ptr.to(tl.pointer_type(tl.uint8))
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    byte_columns = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    shifts = tl.arange(0, 8)
    ks = byte_columns[None, :, None] * 8 + shifts[None, None, :]  # [1, BLOCK_BYTES, 8]
    in_range = row_mask[:, None, None] & (ks < K)  # [BLOCK_ROWS, BLOCK_BYTES, 8]
    scores = tl.load(scores_ptr + rows64[:, None, None] * stride_sn + ks.to(tl.int64) * stride_sk,
                     mask=in_range, other=0.0)
    threshold = tl.load(threshold_ptr)
    if scores_ptr.dtype.element_ty != tl.float64:
        # exact for every narrower float (and the interpreter's bf16 comparison is not)
        scores = scores.to(tl.float32)
        threshold = threshold.to(tl.float32)
    bits = ((scores > threshold) & in_range).to(tl.int32) << shifts[None, None, :]
    packed = tl.sum(bits, axis=2)  # the 8 bits are disjoint: their sum is their OR
    tl.store(packed_ptr + rows64[:, None] * KB + byte_columns[None, :], packed.to(tl.uint8),
             mask=row_mask[:, None] & (byte_columns < KB)[None, :])


# ----------------------------------------------------------------------------------- autotuning
# On a GPU the tile sizes are tuned per (M bucket, N, K, dtypes; weight layout for the two masked
# GEMMs); under the interpreter, and for problems too small to be worth tuning (_TUNE_MIN_MACS), the
# heuristic config of _gemm_blocks runs alone.

_MAX_M_BUCKET = 4096


def _m_bucket(rows: int) -> int:
    return min(_MAX_M_BUCKET, max(16, triton.next_power_of_2(rows)))


# (BLOCK_M, BLOCK_N, BLOCK_K) candidates. fwd: a [BLOCK_N, BLOCK_M] accumulator (weight rows x
# tokens), K reduced; grad_input: [BLOCK_K, BLOCK_M] (input columns x tokens), N reduced;
# grad_scores: [BLOCK_N, BLOCK_K], the M rows reduced.
_FWD_SHAPES = [
    (16, 64, 128), (16, 128, 64), (16, 128, 128), (32, 64, 128), (32, 128, 64), (64, 64, 64), (64, 128, 64),
    (128, 64, 64), (128, 128, 32), (128, 128, 64), (128, 256, 64), (256, 128, 64),
]
_GRAD_INPUT_SHAPES = [
    (16, 64, 128), (16, 128, 64), (16, 128, 128), (32, 64, 128), (32, 128, 64), (64, 64, 64), (64, 64, 128),
    (64, 128, 64), (128, 64, 64), (128, 64, 128), (128, 128, 64), (256, 64, 128),
]
_SCORES_SHAPES = [
    (32, 64, 128), (32, 128, 128), (64, 64, 64), (64, 64, 128), (64, 128, 64), (64, 128, 128), (32, 128, 256),
    (64, 256, 128),
]
_ACCUMULATOR = {  # elements of the fp32 accumulator of a (BLOCK_M, BLOCK_N, BLOCK_K) tile
    "forward": lambda block_m, block_n, block_k: block_n * block_m,
    "grad_input": lambda block_m, block_n, block_k: block_k * block_m,
    "grad_scores": lambda block_m, block_n, block_k: block_n * block_k,
}
_STAGE_BYTES = {  # operand bytes of one pipeline stage, per element size
    "forward": lambda block_m, block_n, block_k, size: (block_m + block_n) * block_k * size + block_n * block_k // 8,
    "grad_input": lambda block_m, block_n, block_k, size: (block_m + block_k) * block_n * size + block_n * block_k // 8,
    "grad_scores": lambda block_m, block_n, block_k, size: (block_n + block_k) * block_m * size,
}


def _gemm_configs(kind, shapes):
    """4 warps below an 8192-element accumulator, 8 above it, both at it; small accumulators also
    try a 4-stage pipeline."""
    configs = []
    for block_m, block_n, block_k in shapes:
        accumulator = _ACCUMULATOR[kind](block_m, block_n, block_k)
        warp_choices = (4,) if accumulator < 8192 else (4, 8) if accumulator == 8192 else (8,)
        configs += [
            triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps,
                          num_stages=stages)
            for warps in warp_choices for stages in ((3, 4) if accumulator <= 4096 else (3,))
        ]
    return configs


def _pruner(kind, pointer_name):
    """Keeps the configs whose tiles fit the problem: BLOCK_M between a quarter of the (bucketed)
    row count, at most 128, and the bucket (or the smallest BLOCK_M there is); the other two no
    larger than needed; the pipelined operands within 220 KiB of shared memory; fp32 accumulators
    within 64 registers a thread. The smallest config survives if nothing else does. ptxas for
    sm_90 with the 16-byte alignment of a real launch, contiguous and Conv1D weights, 3 stages: no
    16-bit survivor spills but fwd 128x256x64 (4 bytes), no fp32 one more than 20 bytes."""

    def prune(configs, named_args, **kwargs):
        bucket = named_args["m_bucket"]
        size = named_args[pointer_name].element_size()
        caps = {"BLOCK_M": max(bucket, min(c.kwargs["BLOCK_M"] for c in configs)),
                "BLOCK_N": max(64, triton.next_power_of_2(named_args["N"])),
                "BLOCK_K": max(64, triton.next_power_of_2(named_args["K"]))}
        kept = []
        for config in configs:
            blocks = tuple(config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            if any(config.kwargs[name] > cap for name, cap in caps.items()) or blocks[0] < min(bucket, 128) // 4:
                continue
            if _STAGE_BYTES[kind](*blocks, size) * config.num_stages > 220 * 1024:
                continue
            if size == 4 and _ACCUMULATOR[kind](*blocks) > 64 * 32 * config.num_warps:
                continue
            kept.append(config)
        kept = kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"],
                                                    c.num_stages))]
        block_m, block_n, block_k, warps, _ = _gemm_blocks(kind, bucket, named_args["N"], named_args["K"], size == 4)
        return limit_configs(kept, {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, warps)

    return prune


# The autotuner appends every tensor argument's dtype to the key itself; stride_wk tells a
# contiguous weight (1) from a transposed Conv1D view (N).
masked_linear_fwd_tuned = triton.autotune(
    configs=_gemm_configs("forward", _FWD_SHAPES), key=["m_bucket", "N", "K", "stride_wk"],
    prune_configs_by={"early_config_prune": _pruner("forward", "w_ptr")},
)(masked_linear_fwd_kernel)
masked_linear_grad_input_tuned = triton.autotune(
    configs=_gemm_configs("grad_input", _GRAD_INPUT_SHAPES), key=["m_bucket", "N", "K", "stride_wk"],
    prune_configs_by={"early_config_prune": _pruner("grad_input", "w_ptr")},
)(masked_linear_grad_input_kernel)
masked_linear_grad_scores_tuned = triton.autotune(
    configs=_gemm_configs("grad_scores", _SCORES_SHAPES), key=["m_bucket", "N", "K"],
    prune_configs_by={"early_config_prune": _pruner("grad_scores", "x_ptr")},
)(masked_linear_grad_scores_kernel)


# ----------------------------------------------------------------------------------- launchers


# (BLOCK_M, BLOCK_N, BLOCK_K) at most, for 16-bit and for fp32 operands.
_HEURISTIC_BLOCKS = {
    "forward": ((128, 128, 32), (64, 64, 32)),
    "grad_input": ((128, 64, 64), (128, 16, 64)),
    "grad_scores": ((64, 128, 64), (32, 64, 64)),
}


def _gemm_blocks(kind: str, rows: int, out_features: int, in_features: int, fp32: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the interpreter, small problems and
    the compile check, clamped to the problem (a dot needs 16 on each side). fwd: up to a 128 x 128 (weight rows x
    tokens) accumulator, 32 deep; grad_input: 64 input columns x 128 tokens, 64 weight rows a step;
    grad_scores: a 128 x 64 [N, K] tile, 64 rows a step. fp32 operands take smaller tiles. 8 warps
    from 8192 accumulator elements (4096 for fp32). `python -m pefops.kernels.compile_check`
    compiles them without the 16-byte alignment a real launch is specialised on (every load scalar,
    the worst case): no spills for 16-bit on sm_90 nor sm_80, none for fp32 either."""
    def clamp(block, size):
        return max(16, min(block, triton.next_power_of_2(max(size, 1))))

    block_m, block_n, block_k = _HEURISTIC_BLOCKS[kind][1 if fp32 else 0]
    block_m, block_n, block_k = clamp(block_m, rows), clamp(block_n, out_features), clamp(block_k, in_features)
    accumulator = _ACCUMULATOR[kind](block_m, block_n, block_k)
    num_warps = 8 if accumulator >= (4096 if fp32 else 8192) else 4
    return block_m, block_n, block_k, num_warps, 3


# Below this many multiply-adds a GEMM takes microseconds and is launch-bound: tuning it would cost
# seconds of compilation per new shape for nothing, so the heuristic config runs (also on a GPU).
_TUNE_MIN_MACS = 1 << 24


def _launch(kind, kernel, tuned, arguments, options, grid, rows, out_features, in_features, fp32):
    """The heuristic config under the interpreter and for small problems, else the autotuned kernel.
    grid: (meta dict of the block sizes) -> launch grid."""
    if not autotuning() or rows * out_features * in_features < _TUNE_MIN_MACS:
        block_m, block_n, block_k, warps, stages = _gemm_blocks(kind, rows, out_features, in_features, fp32)
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        kernel[grid(blocks)](*arguments, **options, **blocks, num_warps=warps, num_stages=stages)
    else:
        tuned[grid](*arguments, **options)


def masked_linear_forward(x, weight, packed_mask, bias=None):
    """y = x @ (weight ⊙ unpack(packed_mask)).T + bias. x [M, K] with unit column stride; weight
    [N, K] with any strides (a transposed Conv1D view included), x's dtype; packed_mask uint8
    [N, ceil(K / 8)] contiguous; bias [N] or None. Returns y [M, N] in x's dtype (fp32 accumulation)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0 or out_features == 0:
        return y
    if in_features == 0:
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    dot_fp32, precision = dot_settings(x.dtype)
    arguments = (
        x, weight, packed_mask, bias if bias is not None else y, y,
        rows, out_features, in_features, packed_mask.shape[1],
        x.stride(0), weight.stride(0), weight.stride(1), y.stride(0), _m_bucket(rows),
    )
    options = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, DOT_PRECISION=precision)
    _launch("forward", masked_linear_fwd_kernel, masked_linear_fwd_tuned, arguments, options,
            lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"])),
            rows, out_features, in_features, x.dtype == torch.float32)
    return y


def masked_linear_grad_input(grad, weight, packed_mask):
    """dx = grad @ (weight ⊙ unpack(packed_mask)). grad [M, N] with unit column stride; weight and
    packed_mask as for the forward. Returns dx [M, K] in grad's dtype (fp32 accumulation)."""
    rows, out_features = grad.shape
    in_features = weight.shape[1]
    dx = torch.empty((rows, in_features), dtype=grad.dtype, device=grad.device)
    if rows == 0 or in_features == 0:
        return dx
    if out_features == 0:
        return dx.zero_()
    dot_fp32, precision = dot_settings(grad.dtype)
    arguments = (
        grad, weight, packed_mask, dx, rows, out_features, in_features, packed_mask.shape[1],
        grad.stride(0), weight.stride(0), weight.stride(1), dx.stride(0), _m_bucket(rows),
    )
    options = dict(DOT_FP32=dot_fp32, DOT_PRECISION=precision)
    _launch("grad_input", masked_linear_grad_input_kernel, masked_linear_grad_input_tuned, arguments, options,
            lambda meta: (triton.cdiv(in_features, meta["BLOCK_K"]), triton.cdiv(rows, meta["BLOCK_M"])),
            rows, out_features, in_features, grad.dtype == torch.float32)
    return dx


def masked_linear_grad_scores(grad, x, weight):
    """dscores = (grad.T @ x) ⊙ weight, the straight-through gradient of the scores. grad [M, N] and
    x [M, K] with unit column strides, weight [N, K] with any strides, all one dtype. Returns
    float32 [N, K] (contiguous); dW_eff = grad.T @ x is never written."""
    rows, out_features = grad.shape
    in_features = x.shape[1]
    dscores = torch.empty((out_features, in_features), dtype=torch.float32, device=x.device)
    if out_features == 0 or in_features == 0:
        return dscores
    if rows == 0:
        return dscores.zero_()
    dot_fp32, precision = dot_settings(x.dtype)
    arguments = (
        grad, x, weight, dscores, rows, out_features, in_features,
        grad.stride(0), x.stride(0), weight.stride(0), weight.stride(1), _m_bucket(rows),
    )
    options = dict(DOT_FP32=dot_fp32, DOT_PRECISION=precision)
    _launch("grad_scores", masked_linear_grad_scores_kernel, masked_linear_grad_scores_tuned, arguments, options,
            lambda meta: (triton.cdiv(in_features, meta["BLOCK_K"]), triton.cdiv(out_features, meta["BLOCK_N"])),
            rows, out_features, in_features, x.dtype == torch.float32)
    return dscores


_PACK_ROWS, _PACK_BYTES, _PACK_WARPS = 16, 32, 8  # 4096 scores a program (4 warps: ptxas spills 8 bytes)


def pack_mask_from_scores(scores, threshold):
    """packed [N, ceil(K / 8)] uint8 with bit = scores > threshold (little bit order, tail bits zero).
    scores [N, K], any float dtype and strides. The threshold is rounded to the scores' dtype first,
    as torch does for `scores > threshold`, so this matches the torch reference bit for bit."""
    out_features, in_features = scores.shape
    packed_bytes = (in_features + 7) // 8
    packed = torch.empty((out_features, packed_bytes), dtype=torch.uint8, device=scores.device)
    if out_features == 0 or packed_bytes == 0:
        return packed
    threshold_tensor = torch.full((1,), float(threshold), dtype=scores.dtype, device=scores.device)
    block_rows = max(1, min(_PACK_ROWS, triton.next_power_of_2(out_features)))
    block_bytes = max(1, min(_PACK_BYTES, triton.next_power_of_2(packed_bytes)))
    grid = (triton.cdiv(out_features, block_rows), triton.cdiv(packed_bytes, block_bytes))
    pack_mask_kernel[grid](scores, threshold_tensor, packed, out_features, in_features, packed_bytes,
                           scores.stride(0), scores.stride(1), BLOCK_ROWS=block_rows, BLOCK_BYTES=block_bytes,
                           num_warps=_PACK_WARPS)
    return packed


# ------------------------------------------------------------------------ ahead-of-time compile list

DATA_POINTERS = frozenset({"x_ptr", "w_ptr", "b_ptr", "y_ptr", "grad_ptr", "dx_ptr"})


def _launch_values(kind: str, rows: int, out_features: int, in_features: int) -> dict:
    """The integer arguments a launch on contiguous x [rows, K], weight [N, K], packed mask, y [rows, N]
    passes (compile_check's hints; stride_wk = 1 becomes a constant as Triton specialises it). The row
    count M is left out (any token count); m_bucket is the autotuning key the launch passes."""
    values = {"N": out_features, "K": in_features, "stride_wn": in_features, "stride_wk": 1,
              "m_bucket": _m_bucket(rows)}
    if kind == "fwd":
        values.update(KB=(in_features + 7) // 8, stride_xm=in_features, stride_ym=out_features)
    elif kind == "grad_input":
        values.update(KB=(in_features + 7) // 8, stride_gm=out_features, stride_dxm=in_features)
    else:
        values.update(stride_gm=out_features, stride_xm=in_features)
    return values


def compile_variants(out_features: int = 4096, in_features: int = 4096):
    """The launch configurations kernels/compile_check.py compiles for a GPU target: the three GEMMs
    in every dtype at the heuristic tile sizes for a [4096, 4096] weight and 4096 rows, the forward
    also at 16 rows (the narrowest tile), and the pack kernel per scores dtype. Yields
    (name, kernel, dtype, constexprs, data_pointers, num_warps, num_stages, launch values)."""
    for dtype in ("bfloat16", "float16", "float32"):
        dot_fp32 = dtype == "float32"
        for kind, kernel, rows in (("fwd", masked_linear_fwd_kernel, 4096), ("fwd", masked_linear_fwd_kernel, 16),
                                   ("grad_input", masked_linear_grad_input_kernel, 4096),
                                   ("grad_scores", masked_linear_grad_scores_kernel, 4096)):
            heuristic_kind = "forward" if kind == "fwd" else kind
            block_m, block_n, block_k, warps, stages = _gemm_blocks(heuristic_kind, rows, out_features, in_features,
                                                                    dot_fp32)
            constexprs = dict(DOT_FP32=dot_fp32, DOT_PRECISION="ieee", BLOCK_M=block_m, BLOCK_N=block_n,
                              BLOCK_K=block_k)
            if kind == "fwd":
                constexprs["HAS_BIAS"] = True
            yield (f"{kind}-{dtype}-m{rows}", kernel, dtype, constexprs, DATA_POINTERS, warps, stages,
                   _launch_values(kind, rows, out_features, in_features))
        yield (f"pack-{dtype}", pack_mask_kernel, dtype, dict(BLOCK_ROWS=_PACK_ROWS, BLOCK_BYTES=_PACK_BYTES),
               frozenset({"scores_ptr", "threshold_ptr"}), _PACK_WARPS, 1,
               {"N": out_features, "K": in_features, "KB": (in_features + 7) // 8, "stride_sn": in_features,
                "stride_sk": 1})
