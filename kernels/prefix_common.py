"""Shared pieces of the prefix-attention kernels (kernels/prefix_attention.py forward,
kernels/prefix_attention_bwd.py backward): the @triton.jit helpers both directions call (the
sequence masks, the dropout bits, the causal key range, the query block of a program) and the host
helpers that size and prepare a launch (tiles, strides, the mask's pointer and kind). Both kernel
files import from here and never from each other's internals.

References: Dao et al., FlashAttention-2 (2023) and the Triton fused-attention tutorial (06).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["NO_MASK", "BOOL_MASK", "ADDITIVE_MASK", "DELTA_WARPS", "sequence_scores", "sequence_columns",
           "dropout_keep", "causal_key_range", "query_block", "tile_sizes", "block_dim", "strides3",
           "mask_arguments"]

# mask kinds
NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2
# the delta kernel's warps: at 4 warps ptxas spills its [64, 64] fp16 tile (sm_90)
DELTA_WARPS = 8


@triton.jit
def sequence_scores(s, offs_m, offs_n, m_valid, n_valid, mask_ptr, stride_mm, stride_mn, causal_shift,
                    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr):
    """The base-2 scores s [BM, BN] of a sequence block with its masks applied: hidden keys -inf,
    additive values added (clamped at -2e38 so finfo.min stays finite after scaling by log2 e).
    MASK_ROWS: the mask varies by query row (a [BM, BN] tile, int32 offsets within the (b, h)
    slice, checked by the launcher); else one [BN] row of key padding broadcast to every query."""
    keep = n_valid[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    if MASK_KIND != 0:
        if MASK_ROWS:
            tile_mask = m_valid[:, None] & n_valid[None, :]
            offsets = offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        else:
            tile_mask = n_valid[None, :]
            offsets = offs_n[None, :] * stride_mn
        if MASK_KIND == 1:
            visible = tl.load(mask_ptr.to(tl.pointer_type(tl.int8)) + offsets, mask=tile_mask, other=0)
            keep = keep & (visible != 0)
        else:
            bias = tl.load(mask_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
            keep = keep & (bias != float("-inf"))
            s = s + tl.maximum(bias, -2.0e38) * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def sequence_columns(mask_ptr, P, stride_mn, PREFIX_MASK: tl.constexpr):
    """The mask pointer (at column 0 of a (b, h) slice) moved to the first sequence key: past the P
    prefix columns of a mask that covers them, else where it is."""
    if PREFIX_MASK:
        mask_ptr += P * stride_mn
    return mask_ptr


@triton.jit
def dropout_keep(seed, dropout_p, rows, offs_n, key_shift, key_count):
    """The dropout keep mask [BM, BN] of one tile, shared by the forward, the backward and the debug
    launcher so all three draw the same bits: keep = rand(seed, counter) >= dropout_p with the
    Philox counter ((b * Hq + h) * Sq + query) * (P + Sk) + key, the key index over [prefix ;
    sequence] (key_shift: 0 for the prefix, P for the sequence). rows [BM] holds (b * Hq + h) * Sq +
    query as int64, so the counter is int64 (tl.rand feeds its low and high words to Philox): unique
    and exact up to B * Hq * Sq * (P + Sk) < 2**63, no wrap for any size that fits in memory."""
    offsets = rows[:, None] * key_count + (key_shift + offs_n)[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def causal_key_range(pid_m, Sk, causal_shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """(full_end, end_n) for query block pid_m: sequence key blocks below full_end are visible to
    every row of the block, [full_end, end_n) straddle the causal diagonal, keys from end_n on are
    hidden from every row. Without causal: (Sk, Sk)."""
    if CAUSAL:
        # row i sees keys j <= i + causal_shift
        end_n = tl.maximum(tl.minimum(Sk, (pid_m + 1) * BLOCK_M + causal_shift), 0)
        full_end = tl.minimum(tl.maximum(pid_m * BLOCK_M + causal_shift + 1, 0) // BLOCK_N * BLOCK_N, end_n)
    else:
        end_n = Sk
        full_end = Sk
    return full_end, end_n


@triton.jit
def query_block(Sq, GROUP, D, Dv, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """The query block of a (query block, query head, batch row) program: (pid_m, h, b, g = the kv
    head, offs_m, m_valid, offs_d, d_valid, offs_dv, dv_valid). Under causal the last query blocks
    see the most keys, so they are started first (a shorter tail)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    return pid_m, h, b, h // GROUP, offs_m, offs_m < Sq, offs_d, offs_d < D, offs_dv, offs_dv < Dv


def tile_sizes(head_dim: int, value_dim: int, fp32: bool, kernel: str, masked: bool = False,
               mask_rows: bool = False, dropout: bool = False, prefix_rows: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head size. Forward: a [BLOCK_M, Dv]
    fp32 accumulator and the q tile stay on chip; dK/dV: two [BLOCK_N, D] fp32 accumulators; dQ: one
    [BLOCK_M, D]. A per-query-row mask tile (mask_rows) or any mask / causal (masked) at the widest
    heads costs registers: narrower key blocks there. fp32 inputs (no tensor-core dot unless TF32)
    take small tiles, dK/dV without software pipelining. Dropout's Philox bits cost registers: at
    the widest heads the forward takes [32, 32] tiles on 4 warps, dQ at D 128 [64, 16] (the heuristic
    tiles spilled there, causal with padding). prefix_rows (a per-query-row mask over [prefix ; keys]):
    dQ at D 64 pipelines 2 stages instead of 3, as the prefix loop's mask tile, 3 deep, spilled there
    (48 bytes with an additive mask under triton 3.6). Checked on sm_90 by kernels/compile_check.py: no
    spills for 16-bit, none or a few bytes for fp32."""
    size = 0 if max(head_dim, value_dim) <= 64 else 1 if max(head_dim, value_dim) <= 128 else 2
    if fp32:
        return {"forward": ((16, 16, 4, 3), (16, 16, 4, 3), (16, 16, 4, 3)),
                "dkdv": ((32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)),
                "dq": ((32, 32, 4, 3), (16, 16, 4, 3), (16, 16, 4, 3))}[kernel][size]
    if dropout and (kernel, size) == ("forward", 2):
        return (32, 32, 4, 3)
    if dropout and (kernel, size) == ("dq", 1):
        return (64, 16, 8, 3)
    if prefix_rows and (kernel, size) == ("dq", 0):
        return (64, 64, 4, 2)
    if kernel == "forward":
        return ((128, 64, 8, 3), (128, 32 if mask_rows else 64, 8, 3), (64, 16 if masked else 32, 8, 3))[size]
    if kernel == "dkdv":
        return ((32, 64, 8, 3), (32, 64, 8, 3), (32, 32, 8, 3))[size]
    return ((64, 64, 4, 3), (64, 32, 8, 3), (32, 32, 8, 3))[size]


def block_dim(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def strides3(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a [B, H, N, X] tensor; a size-1 batch (a shared prefix) gets
    stride 0 so every row of the batch reads it."""
    stride_b = 0 if tensor.shape[0] == 1 else tensor.stride(0)
    return stride_b, tensor.stride(1), tensor.stride(2)


def mask_arguments(mask, dummy, sk: int):
    """(pointer tensor, kind, per-query-row?, covers the prefix?, [b, h, m, n] strides) of the
    normalised 4-D mask, stride 0 on its size-1 (broadcast) dimensions. A mask wider than the Sk
    sequence keys covers [prefix ; sequence] (pefops.ops.prefix_attention validated its width P + Sk).
    Offsets inside one (b, h) slice are int32 in the kernels: a view whose slice spans more is copied
    compactly first."""
    if mask is None:
        return dummy, NO_MASK, False, False, (0, 0, 0, 0)

    def strides_of(tensor):
        return tuple(0 if size == 1 else stride for size, stride in zip(tensor.shape, tensor.stride()))

    def slice_span(strides):
        return (mask.shape[2] - 1) * strides[2] + (mask.shape[3] - 1) * strides[3]

    strides = strides_of(mask)
    if slice_span(strides) >= 2**31:
        mask = mask.contiguous()
        strides = strides_of(mask)
        if slice_span(strides) >= 2**31:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} is too large for the Triton kernel "
                             "(over 2**31 elements per batch row and head); use backend='torch'")
    kind = BOOL_MASK if mask.dtype == torch.bool else ADDITIVE_MASK
    return mask, kind, mask.shape[2] != 1, mask.shape[3] != sk, strides

