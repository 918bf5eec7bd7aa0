"""Backward kernels of prefix attention (kernels/prefix_attention.py has the forward and re-exports
this launcher; kernels/prefix_common.py the mask helpers and the tile table both use), with
recompute: no [Sq, P + Sk] matrix in memory.

    delta = rowsum(dO * O)                                  (fp32, one program per query block)
    p = exp2(s - lse), dV += p^T dO, dS = p * (dO V^T - delta), dK += s dS^T Q, dQ += s dS K

With dropout (z = keep / (1 - dropout_p), the forward's mask redrawn by the shared helper
dropout_keep from the same seed and counters, O the dropped output):
    dV += (p z)^T dO, dS = p * (z dO V^T - delta), delta = rowsum(dO * O) as before

dK/dV: one program per (key block, kv head, batch row), looping over the query heads of its group
and over the query blocks (causal: from the first block that sees the keys; blocks that see them
whole skip the per-element test). Run once over the sequence (writing dk, dv in the input dtype)
and once over the prefix (no masks), where it writes per-(batch row, kv head) fp32 partials that the
launcher sums over the batch for a shared prefix: a fixed order, no atomics, deterministic.
dQ: one program per (query block, query head, batch row), looping over prefix then sequence blocks.

References: Dao et al., FlashAttention-2 (2023) and the Triton fused-attention tutorial (06).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_settings
from .shared import unit_stride_rows
from .prefix_common import (DELTA_WARPS, block_dim, causal_key_range, dropout_keep, mask_arguments, query_block,
                            sequence_columns, sequence_scores, strides3, tile_sizes)

__all__ = ["prefix_attention_backward"]


@triton.jit
def prefix_attention_bwd_delta_kernel(
    out_ptr,  # [B, Hq, Sq, Dv]
    dout_ptr,  # [B, Hq, Sq, Dv] contiguous
    delta_ptr,  # [B, Hq, Sq] float32
    Sq, Dv, stride_ob, stride_oh, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, the softmax backward's row term. One program per (query
    block, head, batch row)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs_m < Sq
    row_base = (b * tl.num_programs(1) + h) * Sq
    out_rows = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
    dout_rows = dout_ptr + (row_base + offs_m[:, None]) * Dv
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, Dv, BLOCK_DV):
        cols = start + tl.arange(0, BLOCK_DV)
        tile = valid[:, None] & (cols[None, :] < Dv)
        o = tl.load(out_rows + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        do = tl.load(dout_rows + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        total += tl.sum(o * do, 1)
    tl.store(delta_ptr + row_base + offs_m, total, mask=valid)


@triton.jit
def _query_rows(q_base, stride_qm, dout_ptr, lse_ptr, delta_ptr, row_base, offs_m, m_valid, offs_d, d_valid, offs_dv,
                dv_valid, Dv, DOT_FP32: tl.constexpr):
    """(q [BLOCK_M, BLOCK_D], dO [BLOCK_M, BLOCK_DV], lse in base 2, delta) of one query block, as both
    backward kernels read them; rows past Sq get lse +inf, so their probabilities are 0."""
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],  # [BLOCK_M, BLOCK_D]
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    do = tl.load(dout_ptr + (row_base + offs_m[:, None]) * Dv + offs_dv[None, :],  # [BLOCK_M, BLOCK_DV]
                 mask=m_valid[:, None] & dv_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse_log2 = tl.load(lse_ptr + row_base + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)
    return q, do, lse_log2, delta


@triton.jit
def _probabilities(q, k_t, offs_m, offs_n, m_valid, n_valid, lse_log2, qk_scale, mask_ptr, stride_mm, stride_mn,
                   causal_shift, IS_SEQUENCE: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                   MASK_ROWS: tl.constexpr, PREFIX_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The forward's probabilities of one [BM, BN] tile, recomputed from the saved row lse."""
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if IS_SEQUENCE or PREFIX_MASK:  # a prefix block under PREFIX_MASK: its mask columns, never causal
        s = sequence_scores(s, offs_m, offs_n, m_valid, n_valid, mask_ptr, stride_mm, stride_mn, causal_shift,
                            CAUSAL and IS_SEQUENCE, MASK_KIND, MASK_ROWS)
    else:
        s = tl.where(n_valid[None, :], s, float("-inf"))
    return tl.math.exp2(s - lse_log2[:, None])


@triton.jit
def _dkdv_step(dk, dv, k_t, v_t, q_base, dout_ptr, lse_ptr, delta_ptr, row_base, m0, Sq, Dv, stride_qm, offs_n,
               n_valid, offs_d, d_valid, offs_dv, dv_valid, qk_scale, mask_ptr, stride_mm, stride_mn, causal_shift,
               seed, dropout_p, key_shift, key_count,
               IS_SEQUENCE: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr,
               PREFIX_MASK: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """One query block of dK/dV: dv += p^T dO, dk += (p * (dO v^T - delta))^T q (scaled by the caller);
    with DROPOUT the dropped, rescaled p in dv and the same mask on dO v^T."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Sq
    q, do, lse_log2, delta = _query_rows(q_base, stride_qm, dout_ptr, lse_ptr, delta_ptr, row_base, offs_m, m_valid,
                                         offs_d, d_valid, offs_dv, dv_valid, Dv, DOT_FP32)
    p = _probabilities(q, k_t, offs_m, offs_n, m_valid, n_valid, lse_log2, qk_scale, mask_ptr, stride_mm, stride_mn,
                       causal_shift, IS_SEQUENCE, CAUSAL, MASK_KIND, MASK_ROWS, PREFIX_MASK, DOT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, dropout_p, row_base + offs_m, offs_n, key_shift, key_count)
        keep_scale = 1.0 / (1.0 - dropout_p)
        dv = tl.dot(tl.trans(tl.where(keep, p * keep_scale, 0.0).to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        dp = tl.where(keep, tl.dot(do, v_t, input_precision=DOT_PRECISION) * keep_scale, 0.0)
    else:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def prefix_attention_bwd_dkdv_kernel(
    q_ptr,  # [B, Hq, Sq, D]
    k_ptr,  # [Bk, Hkv, N, D]: the sequence keys (N = Sk), or the prefix (N = P, Bk = 1 or B)
    v_ptr,  # [Bk, Hkv, N, Dv]
    mask_ptr,  # [Bm, Hm, Sqm, Sk] (read for the sequence; unused without a mask), or [Bm, Hm, Sqm, P + Sk] with
    #            PREFIX_MASK: columns [prefix ; sequence], read for both
    dout_ptr,  # [B, Hq, Sq, Dv] contiguous
    lse_ptr,  # [B, Hq, Sq] float32
    delta_ptr,  # [B, Hq, Sq] float32
    dk_ptr,  # [B, Hkv, N, D] contiguous: the sequence's dk, or per-row fp32 partials of the prefix's
    dv_ptr,  # [B, Hkv, N, Dv] contiguous
    Sq, Sk, N, D, Dv, GROUP, P,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    scale_value, dropout_p, seed,
    IS_SEQUENCE: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr,
    PREFIX_MASK: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kv_heads = tl.num_programs(1)
    q_heads = kv_heads * GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_valid = offs_dv < Dv
    k_t = tl.load(k_ptr + b * stride_kb + g * stride_kh + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                  mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    v_t = tl.load(v_ptr + b * stride_vb + g * stride_vh + offs_n[None, :].to(tl.int64) * stride_vn + offs_dv[:, None],
                  mask=n_valid[None, :] & dv_valid[:, None], other=0.0)  # [BLOCK_DV, BLOCK_N]
    if DOT_FP32:
        k_t = k_t.to(tl.float32)
        v_t = v_t.to(tl.float32)
    qk_scale = scale_value * 1.4426950408889634
    causal_shift = Sk - Sq
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    key_shift = P if IS_SEQUENCE else 0  # the dropout counter's key index runs over [prefix ; sequence]
    if IS_SEQUENCE:
        mask_ptr = sequence_columns(mask_ptr, P, stride_mn, PREFIX_MASK)
    start_m = 0
    full_start = 0
    if IS_SEQUENCE and CAUSAL:
        # row i sees key j when i >= j - causal_shift: query blocks before start_m see none of this key
        # block, blocks from full_start on see all of it (no per-element causal test there)
        start_m = tl.maximum(pid_n * BLOCK_N - causal_shift, 0) // BLOCK_M * BLOCK_M
        full_start = tl.maximum(tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M,
                                start_m)
    for head in range(0, GROUP):
        h = g * GROUP + head
        row_base = (b * q_heads + h) * Sq  # [B, Hq, Sq] row of lse, delta and dout
        q_base = q_ptr + b * stride_qb + h * stride_qh
        head_mask_ptr = mask_ptr + b * stride_mb + h * stride_mh
        for m0 in range(start_m, tl.minimum(full_start, Sq), BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k_t, v_t, q_base, dout_ptr, lse_ptr, delta_ptr, row_base, m0, Sq, Dv,
                                stride_qm, offs_n, n_valid, offs_d, d_valid, offs_dv, dv_valid, qk_scale,
                                head_mask_ptr, stride_mm, stride_mn, causal_shift, seed, dropout_p, key_shift, P + Sk,
                                IS_SEQUENCE, True, MASK_KIND, MASK_ROWS, PREFIX_MASK, DOT_FP32, DOT_PRECISION, DROPOUT,
                                BLOCK_M)
        for m0 in range(full_start, Sq, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k_t, v_t, q_base, dout_ptr, lse_ptr, delta_ptr, row_base, m0, Sq, Dv,
                                stride_qm, offs_n, n_valid, offs_d, d_valid, offs_dv, dv_valid, qk_scale,
                                head_mask_ptr, stride_mm, stride_mn, causal_shift, seed, dropout_p, key_shift, P + Sk,
                                IS_SEQUENCE, False, MASK_KIND, MASK_ROWS, PREFIX_MASK, DOT_FP32, DOT_PRECISION, DROPOUT,
                                BLOCK_M)
    dk = dk * scale_value
    out_rows = ((b * kv_heads + g) * N + offs_n[:, None]).to(tl.int64)
    tl.store(dk_ptr + out_rows * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=n_valid[:, None] & d_valid[None, :])
    tl.store(dv_ptr + out_rows * Dv + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=n_valid[:, None] & dv_valid[None, :])


@triton.jit
def _dq_step(dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_vn, start_n, n_limit, offs_m, m_valid,
             offs_d, d_valid, offs_dv, dv_valid, qk_scale, mask_ptr, stride_mm, stride_mn, causal_shift,
             seed, dropout_p, rows, key_shift, key_count,
             IS_SEQUENCE: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr,
             PREFIX_MASK: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """One key block of dQ: dq += (p * (dO v^T - delta)) @ k (DROPOUT: dO v^T masked and rescaled)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < n_limit
    k_t = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],  # [BLOCK_D, BLOCK_N]
                  mask=n_valid[None, :] & d_valid[:, None], other=0.0)
    v_t = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vn + offs_dv[:, None],  # [BLOCK_DV, BLOCK_N]
                  mask=n_valid[None, :] & dv_valid[:, None], other=0.0)
    if DOT_FP32:
        k_t = k_t.to(tl.float32)
        v_t = v_t.to(tl.float32)
    p = _probabilities(q, k_t, offs_m, offs_n, m_valid, n_valid, lse_log2, qk_scale, mask_ptr, stride_mm, stride_mn,
                       causal_shift, IS_SEQUENCE, CAUSAL, MASK_KIND, MASK_ROWS, PREFIX_MASK, DOT_PRECISION)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, dropout_p, rows, offs_n, key_shift, key_count)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)


@triton.jit
def prefix_attention_bwd_dq_kernel(
    q_ptr,  # [B, Hq, Sq, D]
    k_ptr,  # [B, Hkv, Sk, D]
    v_ptr,  # [B, Hkv, Sk, Dv]
    pk_ptr,  # [Bp, Hkv, P, D]
    pv_ptr,  # [Bp, Hkv, P, Dv]
    mask_ptr,  # [Bm, Hm, Sqm, Sk] (unused without a mask), or [Bm, Hm, Sqm, P + Sk] with PREFIX_MASK
    dout_ptr,  # [B, Hq, Sq, Dv] contiguous
    lse_ptr,  # [B, Hq, Sq] float32
    delta_ptr,  # [B, Hq, Sq] float32
    dq_ptr,  # [B, Hq, Sq, D] contiguous
    Sq, Sk, P, D, Dv, GROUP,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    scale_value, dropout_p, seed,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, PREFIX_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, h, b, g, offs_m, m_valid, offs_d, d_valid, offs_dv, dv_valid = query_block(
        Sq, GROUP, D, Dv, CAUSAL, BLOCK_M, BLOCK_D, BLOCK_DV)
    row_base = (b * tl.num_programs(1) + h) * Sq
    q, do, lse_log2, delta = _query_rows(q_ptr + b * stride_qb + h * stride_qh, stride_qm, dout_ptr, lse_ptr, delta_ptr,
                                         row_base, offs_m, m_valid, offs_d, d_valid, offs_dv, dv_valid, Dv, DOT_FP32)
    qk_scale = scale_value * 1.4426950408889634
    mask_ptr += b * stride_mb + h * stride_mh
    seq_mask_ptr = sequence_columns(mask_ptr, P, stride_mn, PREFIX_MASK)
    causal_shift = Sk - Sq
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rows = row_base + offs_m  # [BLOCK_M] int64: the dropout counter's row
    pk_base = pk_ptr + b * stride_pkb + g * stride_pkh
    pv_base = pv_ptr + b * stride_pvb + g * stride_pvh
    for start_n in range(0, P, BLOCK_N):
        dq = _dq_step(dq, q, do, lse_log2, delta, pk_base, pv_base, stride_pkn, stride_pvn, start_n, P, offs_m,
                      m_valid, offs_d, d_valid, offs_dv, dv_valid, qk_scale, mask_ptr, stride_mm, stride_mn,
                      causal_shift, seed, dropout_p, rows, 0, P + Sk, False, CAUSAL, MASK_KIND, MASK_ROWS, PREFIX_MASK,
                      DOT_FP32, DOT_PRECISION, DROPOUT, BLOCK_N)
    full_end, end_n = causal_key_range(pid_m, Sk, causal_shift, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_vn, start_n, Sk, offs_m,
                      m_valid, offs_d, d_valid, offs_dv, dv_valid, qk_scale, seq_mask_ptr, stride_mm, stride_mn,
                      causal_shift, seed, dropout_p, rows, P, P + Sk, True, False, MASK_KIND, MASK_ROWS, PREFIX_MASK,
                      DOT_FP32, DOT_PRECISION, DROPOUT, BLOCK_N)
    for start_n in range(full_end, end_n, BLOCK_N):
        dq = _dq_step(dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_vn, start_n, Sk, offs_m,
                      m_valid, offs_d, d_valid, offs_dv, dv_valid, qk_scale, seq_mask_ptr, stride_mm, stride_mn,
                      causal_shift, seed, dropout_p, rows, P, P + Sk, True, True, MASK_KIND, MASK_ROWS, PREFIX_MASK,
                      DOT_FP32, DOT_PRECISION, DROPOUT, BLOCK_N)
    dq = dq * scale_value
    tl.store(dq_ptr + (row_base + offs_m[:, None]).to(tl.int64) * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])


# ------------------------------------------------------------------------------------ launcher


def prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal: bool, scale: float,
                              need=None, dropout_p: float = 0.0, seed: int = 0):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of prefix_attention_forward (with the forward's
    dropout_p and seed, so the same keep mask is redrawn), shapes and dtypes
    of the inputs (a shared prefix's gradient summed over the batch in fp32). need: {"q", "k", "v",
    "prefix_k", "prefix_v"} -> bool (default all); a kernel none of whose gradients is needed is not
    launched and its gradients come back as None."""
    need = {name: True for name in ("q", "k", "v", "prefix_k", "prefix_v")} | dict(need or {})
    q, k, v, prefix_k, prefix_v, out = (unit_stride_rows(t) for t in (q, k, v, prefix_k, prefix_v, out))
    grad_out = grad_out.contiguous()
    batch, q_heads, sq, dim = q.shape
    kv_heads, sk, value_dim = k.shape[1], k.shape[2], v.shape[3]
    prefix_len = prefix_k.shape[2]
    launch = bool(batch * q_heads * sq and (prefix_len or sk))
    # the kernels write every element (zeros where no query sees a key); without a launch: zeros
    allocate = torch.empty if launch else torch.zeros

    def gradient(needed, shape, dtype):
        return allocate(shape, dtype=dtype, device=q.device) if needed else None

    dq = gradient(need["q"], (batch, q_heads, sq, dim), q.dtype)
    need_sequence = need["k"] or need["v"]
    dk = gradient(need_sequence, (batch, kv_heads, sk, dim), k.dtype)
    dv = gradient(need_sequence, (batch, kv_heads, sk, value_dim), v.dtype)
    # per-row fp32 partials of the prefix's gradients (summed over the batch below when shared)
    need_prefix = need["prefix_k"] or need["prefix_v"]
    dpk = gradient(need_prefix, (batch, kv_heads, prefix_len, dim), torch.float32)
    dpv = gradient(need_prefix, (batch, kv_heads, prefix_len, value_dim), torch.float32)
    if launch:
        delta = torch.empty((batch, q_heads, sq), dtype=torch.float32, device=q.device)
        prefix_attention_bwd_delta_kernel[(triton.cdiv(sq, 64), q_heads, batch)](
            out, grad_out, delta, sq, value_dim, *out.stride()[:3], BLOCK_M=64, BLOCK_DV=min(block_dim(value_dim), 64),
            num_warps=DELTA_WARPS,
        )
        dot_fp32, precision = dot_settings(q.dtype)
        fp32 = q.dtype == torch.float32
        mask_tensor, mask_kind, mask_rows, prefix_mask, mask_strides = mask_arguments(mask, q, sk)
        common = dict(CAUSAL=bool(causal), MASK_KIND=mask_kind, MASK_ROWS=mask_rows, PREFIX_MASK=prefix_mask,
                      DOT_FP32=dot_fp32, DOT_PRECISION=precision, DROPOUT=dropout_p > 0.0, BLOCK_D=block_dim(dim),
                      BLOCK_DV=block_dim(value_dim))
        sizes = (sq, sk)
        block_m, block_n, warps, stages = tile_sizes(dim, value_dim, fp32, "dkdv")
        sources = [(k, v, dk, dv, sk, True, need_sequence),
                   (prefix_k, prefix_v, dpk, dpv, prefix_len, False, need_prefix)]
        for keys, values, d_keys, d_values, length, is_sequence, needed in sources:
            if length == 0 or not needed:
                continue
            key_strides = keys.stride()[:3] if is_sequence else strides3(keys)
            value_strides = values.stride()[:3] if is_sequence else strides3(values)
            prefix_attention_bwd_dkdv_kernel[(triton.cdiv(length, block_n), kv_heads, batch)](
                q, keys, values, mask_tensor, grad_out, lse, delta, d_keys, d_values,
                *sizes, length, dim, value_dim, q_heads // kv_heads, prefix_len,
                *q.stride()[:3], *key_strides, *value_strides, *mask_strides,
                float(scale), float(dropout_p), int(seed), IS_SEQUENCE=is_sequence, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps, num_stages=stages, **common,
            )
        if need["q"]:
            block_m, block_n, warps, stages = tile_sizes(dim, value_dim, fp32, "dq", dropout=dropout_p > 0.0,
                                                         prefix_rows=prefix_mask and mask_rows)
            prefix_attention_bwd_dq_kernel[(triton.cdiv(sq, block_m), q_heads, batch)](
                q, k if sk else q, v if sk else q, prefix_k if prefix_len else q, prefix_v if prefix_len else q,
                mask_tensor, grad_out, lse, delta, dq,
                *sizes, prefix_len, dim, value_dim, q_heads // kv_heads,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *strides3(prefix_k), *strides3(prefix_v),
                *mask_strides, float(scale), float(dropout_p), int(seed), BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps, num_stages=stages, **common,
            )
    if need_prefix:
        if prefix_k.shape[0] != batch:  # shared by the batch: fixed-order sum over the rows
            dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
        dpk, dpv = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv
