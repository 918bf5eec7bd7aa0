"""Backward of the LSH chunked-attention core (kernels/lsh_attention.py): recompute from the saved lse.

Per hash round r (round = sorted position // S) two kernels run, and all rounds' dq kernels run
before any dk/dv kernel (a window reaches into the neighbouring rounds, whose delta must exist):

1. dq kernel, one program per (query block of round r, batch * head): gathers its query rows,
   their dO and O rows (round r, original positions), forms delta = rowsum(dO * O) - dlse and
   stores it ([B, H, nh, S] fp32), then walks the window like the forward:
   p = exp(s - lse), dp = dO v^T, ds = p * (dp - delta) (zero where a mask constant replaced the
   score: no gradient there), dq += ds k; dq = scale * dq.
2. dk/dv kernel, one program per (key block of round r, batch * head): a key chunk c is seen by
   the query chunks c + before - w for window steps w = 0 .. before + after (mod NC, every repeat
   counted), so it walks those query blocks: dv += p^T dO, dk += scale * ds^T q.

dq, dk, dv come out [B, H, S, D(v)] at the original positions, float32 or the inputs' dtype. Within
one round every original position occurs once, so a round's programs never write the same row;
rounds are separate launches, round 0 stores and later rounds add (load + add + store in a fixed
round order): no atomics, bit-identical results run to run, and no per-round gradient buffers. The
last round stores its complete float32 sum straight in the gradient's dtype (one rounding, as a
cast of the float32 result would give, without the cast's extra pass: 8 of its 10 bytes per element
for 16-bit gradients, and no float32 buffer at all with one round).

Why the rounds are not summed in registers in one pass: a program owns a block of *sorted* rows of
one round; the same original positions sit in other sorted chunks (other windows of keys) in every
other round, so one program cannot hold a position's rows of all rounds as one tile. Summing in one
launch would need atomics (not deterministic) or per-round buffers (more bytes than the
read-modify-write they replace).

Dropout (z = keep / (1 - dropout_p), the forward's mask redrawn by the shared helper dropout_keep
from the same seed and counters, O the dropped output): dv += (p z)^T dO, ds = p * (z dp - delta)
with delta = rowsum(dO * O) - dlse as without dropout (rowsum(dO * O) = sum_j p_j z_j dp_j). The
dk/dv kernel's window step w of key chunk c meets query chunk c + before - w, whose forward step
toward c is the same w, so both kernels address the counter by (sorted query, w * L + key offset).

The saved lse gives p = exp(s - lse), the probabilities of the forward (which normalises by the
fp32-rounded lse as transformers does), and both kernels read it.

Roofline (bf16, B=8, H=8, D=Dv=64, S=16k, nh=4, L=64, before=1, after=0; per sorted row and round,
N = 4.19 M): dq kernel reads q, dO, O (3 x 128 B), k and v once from HBM (256 B, the neighbour copy
from L2), indices (16 B), lse / dlse and writes delta, m, 1/l (20 B), read-modify-writes dq in fp32
(256 B written, 256 B read after round 0); dk/dv kernel reads k, v (256 B), q, dO once from HBM
(256 B), m, 1/l, delta, indices (28 B), read-modify-writes dk, dv in fp32 (512 B written, 512 B read
after round 0). About 2.5 kB a row: 10.6 GB, >= 2.5 ms at 4.3 TB/s; 7 dot products of
2 * 64 * 128 per row: 0.48 TFLOP (0.5 ms of bf16 tensor cores). Memory-bound, 40 % of it the fp32
gradient read-modify-writes (the price of determinism without atomics or per-round buffers):
expect ~3.5-4.5 ms.

References: Triton tutorial 06 (fused attention backward: separate dq and dk/dv passes over
recomputed probabilities); FlashAttention-2 (Dao, 2023); Kitaev et al., ICLR 2020 (Reformer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_settings
from .lsh_common import (block_sizes, dropout_keep, even_blocks, gather_rows, head_slices, index_arguments,
                         load_key_keep, mask_scores, program_block, sorted_rows, unit_last, window_offset)

DATA_POINTERS = frozenset({"q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_out_ptr", "dk_out_ptr", "dv_out_ptr"})


@triton.jit
def lsh_bwd_dq_kernel(
    q_ptr,  # [B, H, S, D], unit stride on D
    k_ptr,  # [B, H, S, D], unit stride on D, q's dtype
    v_ptr,  # [B, H, S, Dv], unit stride on Dv, q's dtype
    q_idx_ptr,  # [B, H, nh * S] int64, contiguous
    k_idx_ptr,  # [B, H, nh * S] int64, contiguous
    key_mask_ptr,  # [B, S] int8 (1 = keep), unit stride on S; read only with HAS_KEY_MASK
    out_ptr,  # [B, H, nh, S, Dv] contiguous, q's dtype: the forward's out_rounds
    do_ptr,  # [B, H, nh, S, Dv] contiguous, q's dtype: gradient of out_rounds
    lse_ptr,  # [B, H, nh, S] contiguous, float32: the forward's lse_rounds
    dlse_ptr,  # [B, H, nh, S] contiguous, float32: gradient of lse_rounds (read only with HAS_DLSE)
    delta_ptr,  # [B, H, nh, S] out, contiguous, float32: rowsum(dO * O) - dlse
    dq_ptr,  # [B, H, S, D] out, contiguous, float32: the sum of the rounds before the last
    dq_out_ptr,  # [B, H, S, D] out, contiguous, the gradient's dtype: the last round's store (dq_ptr for float32)
    H, S, CHUNK, NUM_CHUNKS, WINDOW, BEFORE, ROUND, LAST_ROUND,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb,
    scale_value, dropout_p, seed,
    MASK_VALUE: tl.constexpr, SELF_MASK_VALUE: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, SELF_MASK: tl.constexpr, HAS_DLSE: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,  # head dims: constexpr, so unpadded tiles load unmasked (vectorised)
    EVEN: tl.constexpr,  # BLOCK_M and BLOCK_N divide CHUNK: no row masks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh, b, h, chunk, in_chunk_first = program_block(H, ROUND * (S // CHUNK), CHUNK, BLOCK_M)
    # int64 bases per (b, h) and per (b, h, round); int32 offsets inside (as in the forward)
    q_ptr, k_ptr, v_ptr, q_idx_ptr, k_idx_ptr, key_mask_ptr = head_slices(
        q_ptr, k_ptr, v_ptr, q_idx_ptr, k_idx_ptr, key_mask_ptr, bh, b, h, NUM_CHUNKS, CHUNK, stride_qb, stride_qh,
        stride_kb, stride_kh, stride_vb, stride_vh, stride_mb)
    round_row = bh * NUM_CHUNKS * CHUNK + ROUND * S  # this round's rows of [B * H * nh, S]
    do_ptr += round_row * DV
    out_ptr += round_row * DV
    dq_ptr += bh * S * D
    dq_out_ptr += bh * S * D
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    q_pos, q_ok = sorted_rows(q_idx_ptr, chunk * CHUNK + in_chunk_first, CHUNK - in_chunk_first, EVEN, BLOCK_M)
    q = gather_rows(q_ptr, q_pos, q_ok, stride_qs, offs_d, d_mask, EVEN, DOT_FP32)
    do = gather_rows(do_ptr, q_pos, q_ok, DV, offs_dv, dv_mask, EVEN, False)
    o = gather_rows(out_ptr, q_pos, q_ok, DV, offs_dv, dv_mask, EVEN, False)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + round_row + q_pos, mask=q_ok, other=0.0)
    tl.store(delta_ptr + round_row + q_pos, delta, mask=q_ok)
    if DOT_FP32:
        do = do.to(tl.float32)

    # p = exp(s - lse) with the saved fp32 lse: the probabilities the forward used (and transformers'
    # autograd uses: logsumexp's backward is exp(s - result)), also where lse's rounding is visible
    lse = tl.load(lse_ptr + round_row + q_pos, mask=q_ok, other=0.0)
    # the dropout counter's rows, as in the forward: (b, h) and the sorted query index
    drop_rows = bh * NUM_CHUNKS * CHUNK + chunk * CHUNK + in_chunk_first + tl.arange(0, BLOCK_M)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for w in range(WINDOW):
        key_chunk = (chunk + window_offset(w, BEFORE, NUM_CHUNKS) + NUM_CHUNKS) % NUM_CHUNKS
        for kb in range(0, CHUNK, BLOCK_N):
            k_pos, k_ok = sorted_rows(k_idx_ptr, key_chunk * CHUNK + kb, CHUNK - kb, EVEN, BLOCK_N)
            k = gather_rows(k_ptr, k_pos, k_ok, stride_ks, offs_d, d_mask, EVEN, DOT_FP32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_value
            s, live = mask_scores(s, q_pos[:, None], k_pos[None, :],
                                   load_key_keep(key_mask_ptr, k_pos, HAS_KEY_MASK)[None, :], HAS_KEY_MASK, CAUSAL,
                                   SELF_MASK, MASK_VALUE, SELF_MASK_VALUE)
            if not EVEN:  # rows past the chunk are no keys at all
                s = tl.where(k_ok[None, :], s, float("-inf"))
                live = live & k_ok[None, :]
            p = tl.exp(s - lse[:, None])
            v = gather_rows(v_ptr, k_pos, k_ok, stride_vs, offs_dv, dv_mask, EVEN, DOT_FP32)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if DROPOUT:  # d(out) / d(p) = z * (dO . v): the forward's keep mask, redrawn
                slots = w * CHUNK + kb + tl.arange(0, BLOCK_N)
                keep = dropout_keep(seed, dropout_p, drop_rows[:, None], slots[None, :], WINDOW * CHUNK)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = tl.where(live, p * (dp - delta[:, None]), 0.0)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * scale_value
    dq_rows = q_pos[:, None] * D + offs_d[None, :]
    dq_mask = d_mask[None, :]
    if not EVEN:
        dq_mask = q_ok[:, None] & d_mask[None, :]
    if ROUND > 0:
        dq += tl.load(dq_ptr + dq_rows, mask=dq_mask, other=0.0)
    if ROUND == LAST_ROUND:  # the sum is complete: rounded once, to the gradient's dtype
        tl.store(dq_out_ptr + dq_rows, dq.to(dq_out_ptr.dtype.element_ty), mask=dq_mask)
    else:
        tl.store(dq_ptr + dq_rows, dq, mask=dq_mask)


@triton.jit
def lsh_bwd_dkdv_kernel(
    q_ptr,  # [B, H, S, D], unit stride on D
    k_ptr,  # [B, H, S, D], unit stride on D, q's dtype
    v_ptr,  # [B, H, S, Dv], unit stride on Dv, q's dtype
    q_idx_ptr,  # [B, H, nh * S] int64, contiguous
    k_idx_ptr,  # [B, H, nh * S] int64, contiguous
    key_mask_ptr,  # [B, S] int8 (1 = keep), unit stride on S; read only with HAS_KEY_MASK
    do_ptr,  # [B, H, nh, S, Dv] contiguous, q's dtype: gradient of out_rounds
    delta_ptr,  # [B, H, nh, S] contiguous, float32: from the dq kernel
    lse_ptr,  # [B, H, nh, S] contiguous, float32: the forward's lse_rounds
    dk_ptr,  # [B, H, S, D] out, contiguous, float32: the sum of the rounds before the last
    dv_ptr,  # [B, H, S, Dv] out, contiguous, float32: the sum of the rounds before the last
    dk_out_ptr,  # [B, H, S, D] out, contiguous, the gradient's dtype: the last round's store (dk_ptr for float32)
    dv_out_ptr,  # [B, H, S, Dv] out, contiguous, the gradient's dtype: the last round's store (dv_ptr for float32)
    H, S, CHUNK, NUM_CHUNKS, WINDOW, BEFORE, ROUND, LAST_ROUND,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb,
    scale_value, dropout_p, seed,
    MASK_VALUE: tl.constexpr, SELF_MASK_VALUE: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, SELF_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,  # head dims: constexpr, so unpadded tiles load unmasked (vectorised)
    EVEN: tl.constexpr,  # BLOCK_M and BLOCK_N divide CHUNK: no row masks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # the key chunk and the first of this program's keys in it
    bh, b, h, chunk, in_chunk_first = program_block(H, ROUND * (S // CHUNK), CHUNK, BLOCK_N)
    q_ptr, k_ptr, v_ptr, q_idx_ptr, k_idx_ptr, key_mask_ptr = head_slices(
        q_ptr, k_ptr, v_ptr, q_idx_ptr, k_idx_ptr, key_mask_ptr, bh, b, h, NUM_CHUNKS, CHUNK, stride_qb, stride_qh,
        stride_kb, stride_kh, stride_vb, stride_vh, stride_mb)
    bh_row = bh * NUM_CHUNKS * CHUNK  # this (b, h)'s first row of [B * H * nh, S]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    k_pos, k_ok = sorted_rows(k_idx_ptr, chunk * CHUNK + in_chunk_first, CHUNK - in_chunk_first, EVEN, BLOCK_N)
    k = gather_rows(k_ptr, k_pos, k_ok, stride_ks, offs_d, d_mask, EVEN, DOT_FP32)
    v = gather_rows(v_ptr, k_pos, k_ok, stride_vs, offs_dv, dv_mask, EVEN, DOT_FP32)
    key_keep = load_key_keep(key_mask_ptr, k_pos, HAS_KEY_MASK)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for w in range(WINDOW):
        # window step w of query chunk c' is key chunk c' + offset(w), so key chunk c is step w of
        # query chunk c - offset(w) (one query chunk per step: the offset depends on w only)
        q_chunk = (chunk - window_offset(w, BEFORE, NUM_CHUNKS) + NUM_CHUNKS) % NUM_CHUNKS
        round_row = bh_row + (q_chunk * CHUNK // S) * S  # the query chunk's round, a row of [B * H * nh, S]
        for qb in range(0, CHUNK, BLOCK_M):
            q_pos, q_ok = sorted_rows(q_idx_ptr, q_chunk * CHUNK + qb, CHUNK - qb, EVEN, BLOCK_M)
            q = gather_rows(q_ptr, q_pos, q_ok, stride_qs, offs_d, d_mask, EVEN, DOT_FP32)
            do = gather_rows(do_ptr + round_row * DV, q_pos, q_ok, DV, offs_dv, dv_mask, EVEN, DOT_FP32)
            lse = tl.load(lse_ptr + round_row + q_pos, mask=q_ok, other=0.0)
            delta = tl.load(delta_ptr + round_row + q_pos, mask=q_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_value  # [BLOCK_N, BLOCK_M]
            s_t, live_t = mask_scores(s_t, q_pos[None, :], k_pos[:, None], key_keep[:, None], HAS_KEY_MASK, CAUSAL,
                                       SELF_MASK, MASK_VALUE, SELF_MASK_VALUE)
            if not EVEN:  # rows past the chunk are no queries / keys at all
                s_t = tl.where(k_ok[:, None] & q_ok[None, :], s_t, float("-inf"))
            p_t = tl.exp(s_t - lse[None, :])
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:  # the forward's step w toward this key chunk is w too: same counters
                drop_rows = bh_row + q_chunk * CHUNK + qb + tl.arange(0, BLOCK_M)
                slots = w * CHUNK + in_chunk_first + tl.arange(0, BLOCK_N)
                keep_t = dropout_keep(seed, dropout_p, drop_rows[None, :], slots[:, None], WINDOW * CHUNK)
                dv = tl.dot(tl.where(keep_t, p_t * (1.0 / (1.0 - dropout_p)), 0.0).to(do.dtype), do, dv,
                            input_precision=DOT_PRECISION)
                dp_t = tl.where(keep_t, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
            else:
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            ds_t = tl.where(live_t, p_t * (dp_t - delta[None, :]), 0.0)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * scale_value
    dk_rows = bh * S * D + k_pos[:, None] * D + offs_d[None, :]
    dv_rows = bh * S * DV + k_pos[:, None] * DV + offs_dv[None, :]
    dk_mask = d_mask[None, :]
    dv_store_mask = dv_mask[None, :]
    if not EVEN:
        dk_mask = k_ok[:, None] & d_mask[None, :]
        dv_store_mask = k_ok[:, None] & dv_mask[None, :]
    if ROUND > 0:
        dk += tl.load(dk_ptr + dk_rows, mask=dk_mask, other=0.0)
        dv += tl.load(dv_ptr + dv_rows, mask=dv_store_mask, other=0.0)
    if ROUND == LAST_ROUND:  # the sums are complete: rounded once, to the gradients' dtypes
        tl.store(dk_out_ptr + dk_rows, dk.to(dk_out_ptr.dtype.element_ty), mask=dk_mask)
        tl.store(dv_out_ptr + dv_rows, dv.to(dv_out_ptr.dtype.element_ty), mask=dv_store_mask)
    else:
        tl.store(dk_ptr + dk_rows, dk, mask=dk_mask)
        tl.store(dv_ptr + dv_rows, dv, mask=dv_store_mask)


def chunked_backward(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, lse_rounds, *,
                     chunk_length, chunks_before, chunks_after, causal, self_mask, scale, mask_value, self_mask_value,
                     dropout_p=0.0, seed=0, out_dtypes=None):
    """(dq, dk, dv) shaped like q, k, v, float32 or in out_dtypes (dq's, dk's, dv's dtypes: the last
    round stores them rounded once from its float32 sum, so no separate cast pass runs); inputs
    checked by lsh_chunked_backward."""
    batch, heads, seq, head_dim = q.shape
    value_dim = v.shape[3]
    rounds = q_idx.shape[2] // seq
    expected = (batch, heads, rounds, seq)
    for name, tensor, shape in (("out_rounds", out_rounds, expected + (value_dim,)),
                                ("lse_rounds", lse_rounds, expected),
                                ("grad_out_rounds", grad_out_rounds, expected + (value_dim,))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"lsh_chunked_backward: {name} must be {list(shape)}, got {tuple(tensor.shape)}")
    if grad_lse_rounds is not None and tuple(grad_lse_rounds.shape) != expected:
        raise ValueError(f"lsh_chunked_backward: grad_lse_rounds must be {list(expected)}, got "
                         f"{tuple(grad_lse_rounds.shape)}")
    device = q.device
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    q_idx, k_idx, mask_argument, stride_mb = index_arguments(q_idx, k_idx, key_mask, device)
    out_rounds = out_rounds.to(v.dtype).contiguous()
    grad_out = (torch.zeros_like(out_rounds) if grad_out_rounds is None
                else grad_out_rounds.to(v.dtype).contiguous())
    lse = lse_rounds.to(torch.float32).contiguous()
    has_dlse = grad_lse_rounds is not None
    dlse = grad_lse_rounds.to(torch.float32).contiguous() if has_dlse else lse
    delta = torch.empty(expected, dtype=torch.float32, device=device)
    out_dtypes = out_dtypes or (torch.float32,) * 3
    shapes = ((batch, heads, seq, head_dim), (batch, heads, seq, head_dim), (batch, heads, seq, value_dim))
    grads = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in zip(shapes, out_dtypes)]
    if batch * heads == 0:
        return tuple(grads)
    # float32 sums of the rounds before the last (the last adds its own and stores the result in
    # the gradient's dtype): the float32 gradient itself, a separate buffer for 16-bit gradients
    # with several rounds, else a one-element stand-in that is never read (one round stores at once)
    sums = [grad if grad.dtype == torch.float32
            else torch.empty(shape if rounds > 1 else (1,), dtype=torch.float32, device=device)
            for grad, shape in zip(grads, shapes)]
    num_chunks = rounds * seq // chunk_length
    window = 1 + chunks_before + chunks_after
    dot_fp32, precision = dot_settings(q.dtype)
    sizes = (heads, seq, chunk_length, num_chunks, window)
    dq_sum, dk_sum, dv_sum = sums
    dq, dk, dv = grads
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
               v.stride(1), v.stride(2), stride_mb, float(scale), float(dropout_p), int(seed))
    options = dict(MASK_VALUE=float(mask_value), SELF_MASK_VALUE=float(self_mask_value),
                   HAS_KEY_MASK=key_mask is not None, CAUSAL=bool(causal), SELF_MASK=bool(self_mask),
                   DROPOUT=dropout_p > 0.0,
                   DOT_FP32=dot_fp32, DOT_PRECISION=precision, D=head_dim, DV=value_dim, num_stages=2)

    def tiles(kind):
        block_m, block_n, block_d, block_dv, num_warps = block_sizes(kind, chunk_length, head_dim, value_dim, q.dtype)
        return dict(EVEN=even_blocks(chunk_length, block_m, block_n), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                    BLOCK_DV=block_dv, num_warps=num_warps)

    dq_tiles, dkdv_tiles = tiles("dq"), tiles("dkdv")
    chunks_per_round = seq // chunk_length
    # every round's delta must exist before a dk/dv program reads a neighbouring round's queries
    for round_index in range(rounds):
        grid = (chunks_per_round * triton.cdiv(chunk_length, dq_tiles["BLOCK_M"]), batch * heads)
        lsh_bwd_dq_kernel[grid](
            q, k, v, q_idx, k_idx, mask_argument, out_rounds, grad_out, lse, dlse, delta, dq_sum, dq,
            *sizes, chunks_before, round_index, rounds - 1, *strides, HAS_DLSE=has_dlse, **options, **dq_tiles)
    for round_index in range(rounds):
        grid = (chunks_per_round * triton.cdiv(chunk_length, dkdv_tiles["BLOCK_N"]), batch * heads)
        lsh_bwd_dkdv_kernel[grid](
            q, k, v, q_idx, k_idx, mask_argument, grad_out, delta, lse, dk_sum, dv_sum, dk, dv,
            *sizes, chunks_before, round_index, rounds - 1, *strides, **options, **dkdv_tiles)
    return dq, dk, dv


def bwd_variants(dtype_name, dtype, head_dim, chunk, mask_value, self_mask_value, dropout=False, values=None):
    """compile_variants() entries of the two backward kernels (every mask on); `values`: the launch's
    integer arguments (lsh_attention.launch_values) for compile_check's hints."""
    common = dict(MASK_VALUE=mask_value, SELF_MASK_VALUE=self_mask_value, HAS_KEY_MASK=True, CAUSAL=True,
                  SELF_MASK=True, DROPOUT=dropout, DOT_FP32=dtype == torch.float32, DOT_PRECISION="ieee", D=head_dim,
                  DV=head_dim)
    for kind, kernel, extra in (("dq", lsh_bwd_dq_kernel, dict(HAS_DLSE=True)), ("dkdv", lsh_bwd_dkdv_kernel, {})):
        block_m, block_n, block_d, block_dv, warps = block_sizes(kind, chunk, head_dim, head_dim, dtype)
        yield (f"bwd-{kind}-{dtype_name}-d{head_dim}-c{chunk}{'-dropout' if dropout else ''}", kernel, dtype_name,
               dict(common, **extra, EVEN=even_blocks(chunk, block_m, block_n), BLOCK_M=block_m, BLOCK_N=block_n,
                    BLOCK_D=block_d, BLOCK_DV=block_dv), DATA_POINTERS, warps, 2, values)
