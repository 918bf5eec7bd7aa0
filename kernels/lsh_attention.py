"""LSH bucketed attention (Reformer): the fused chunked-attention core, forward (backward in
kernels/lsh_attention_bwd.py; hashing and the round combine in kernels/lsh_attention_rounds.py,
re-exported here, like the backward launcher; the helpers both directions share in kernels/lsh_common.py).

The chunked core (semantics of transformers' LSHSelfAttention._attend): per (batch, head) the nh
hash rounds give a sorted order of length nh * S; q_idx / k_idx hold the original position
(0 .. S-1) of every sorted query / key (each round a permutation). The sorted order is cut into
NC = nh*S/L chunks of L = chunk_length; chunk c attends to chunks c - before .. c + after modulo NC
(wrap-around across round boundaries; with few chunks a chunk repeats in the window and every copy
counts), except that a step `i` chunks away with |i| >= NC is chunk c itself, as transformers'
_look_adjacent concatenates its shifted copies (see window_offset). Scores = q . k * scale, then
on original positions: the key padding mask (gathered by the key index) and causal q_pos >= k_pos
replace the score by mask_value, then q_pos == k_pos by self_mask_value (last). Finite constants
only, as transformers.

Forward kernel: one program per (query block of a sorted chunk, batch * head). It gathers its query
rows through q_idx and each window block's key / value rows through k_idx straight from q, k, v (no
sorted copies in memory), runs an online softmax in fp32 with natural exponents, normalises by exp(m - lse) with the fp32 lse
(transformers' exp(s - logsumexp(s)): where lse is a mask constant, -1e5 + log 2, its fp32 rounding
is visible and reproduced), and writes out and lse at the original position of
each query in its round (round = sorted position // S): out_rounds [B, H, nh, S, Dv] in v's dtype,
lse_rounds [B, H, nh, S] fp32. Offsets: int64 base pointers per (batch, head), int32 offsets inside
one (the launcher copies a tensor whose strides would overflow that); head dims are constexprs, so
unpadded rows load as 16-byte vectors.

Limits: any chunk_length (S a multiple of it; the full-attention path passes chunk_length = S);
row blocks of at most 64 (32 for fp32) that do not divide the chunk get row masks (EVEN = False),
rows past a chunk's end are no keys at all (-inf, not a mask constant); D, Dv <= 128 (padded to a
power of two with masks).

Dropout (DROPOUT constexpr, dropout_p in [0, 1), an integer seed): the window probabilities are
multiplied by keep / (1 - dropout_p) in the accumulator, keep = tl.rand(seed, counter) >= dropout_p
from the shared helper dropout_keep with a counter unique per (b * H + h, sorted query, window slot
w * L + key offset in the chunk); the backward redraws the same bits (the dk/dv kernel's step w of
a key chunk is the forward's step w of its query chunk), so no mask is stored. l and the lse stay
those of the un-dropped softmax. lsh_dropout_keep_mask materialises the mask.

Roofline (bf16, B=8, H=8, D=Dv=64, S=16k, nh=4, L=64, before=1, after=0; N = B*H*nh*S = 4.19 M
sorted rows). Forward: q read once per round (N * 128 B = 537 MB), k and v once per round from HBM
(the neighbour chunk's copy from L2: 1.07 GB), out_rounds written (537 MB), lse (17 MB), q_idx and
k_idx (67 MB): 2.23 GB, >= 0.52 ms at 4.3 TB/s; dot products N * 2 * 2 * 64 * 128 = 137 GFLOP
(0.14 ms of dense bf16 tensor cores). Memory-bound; random 128-byte row gathers will not stream at
full bandwidth: expect ~0.8-1.2 ms. (Backward: kernels/lsh_attention_bwd.py.)

References: Triton tutorial 06 (fused attention: online softmax, recompute backward); FlashAttention
(Dao et al., 2022) and FlashAttention-2 (Dao, 2023); Kitaev et al., ICLR 2020 (Reformer);
transformers' modeling_reformer.py (LSHSelfAttention) for the exact semantics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_settings
from .lsh_attention_bwd import bwd_variants, chunked_backward
from .lsh_attention_rounds import lsh_bucket_ids, lsh_combine_rounds, lsh_combine_rounds_backward, rounds_variants
from .lsh_common import (block_sizes, dropout_keep, even_blocks, gather_rows, head_slices, index_arguments,
                         load_key_keep, mask_scores, program_block, sorted_rows, unit_last, window_offset)

__all__ = [
    "MAX_HEAD_DIM", "lsh_chunked_forward", "lsh_dropout_keep_mask", "lsh_chunked_backward", "lsh_bucket_ids",
    "lsh_combine_rounds",
    "lsh_combine_rounds_backward", "compile_variants",
]

MAX_HEAD_DIM = 128


# ------------------------------------------------------------------------------- forward kernel


@triton.jit
def lsh_fwd_kernel(
    q_ptr,  # [B, H, S, D], unit stride on D
    k_ptr,  # [B, H, S, D], unit stride on D, q's dtype
    v_ptr,  # [B, H, S, Dv], unit stride on Dv, q's dtype
    q_idx_ptr,  # [B, H, nh * S] int64, contiguous: original position of each sorted query
    k_idx_ptr,  # [B, H, nh * S] int64, contiguous: original position of each sorted key
    key_mask_ptr,  # [B, S] int8 (1 = keep), unit stride on S; read only with HAS_KEY_MASK
    out_ptr,  # [B, H, nh, S, Dv] out, contiguous, q's dtype
    lse_ptr,  # [B, H, nh, S] out, contiguous, float32
    H, S, CHUNK, NUM_CHUNKS, WINDOW, BEFORE,
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
    bh, b, h, chunk, in_chunk_first = program_block(H, 0, CHUNK, BLOCK_M)
    q_ptr, k_ptr, v_ptr, q_idx_ptr, k_idx_ptr, key_mask_ptr = head_slices(
        q_ptr, k_ptr, v_ptr, q_idx_ptr, k_idx_ptr, key_mask_ptr, bh, b, h, NUM_CHUNKS, CHUNK, stride_qb, stride_qh,
        stride_kb, stride_kh, stride_vb, stride_vh, stride_mb)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    q_pos, q_ok = sorted_rows(q_idx_ptr, chunk * CHUNK + in_chunk_first, CHUNK - in_chunk_first, EVEN, BLOCK_M)
    q = gather_rows(q_ptr, q_pos, q_ok, stride_qs, offs_d, d_mask, EVEN, DOT_FP32)

    # the dropout counter's rows: (b, h) and the sorted query index, int64
    drop_rows = bh * NUM_CHUNKS * CHUNK + chunk * CHUNK + in_chunk_first + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for w in range(WINDOW):
        key_chunk = (chunk + window_offset(w, BEFORE, NUM_CHUNKS) + NUM_CHUNKS) % NUM_CHUNKS
        for kb in range(0, CHUNK, BLOCK_N):
            k_pos, k_ok = sorted_rows(k_idx_ptr, key_chunk * CHUNK + kb, CHUNK - kb, EVEN, BLOCK_N)
            k = gather_rows(k_ptr, k_pos, k_ok, stride_ks, offs_d, d_mask, EVEN, DOT_FP32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_value
            key_keep = load_key_keep(key_mask_ptr, k_pos, HAS_KEY_MASK)
            s, live = mask_scores(s, q_pos[:, None], k_pos[None, :], key_keep[None, :], HAS_KEY_MASK, CAUSAL,
                                   SELF_MASK, MASK_VALUE, SELF_MASK_VALUE)
            if not EVEN:  # rows past the chunk are no keys at all (not masked ones)
                s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = gather_rows(v_ptr, k_pos, k_ok, stride_vs, offs_dv, dv_mask, EVEN, DOT_FP32)
            if DROPOUT:  # l keeps every probability; the values see the dropped, rescaled ones
                slots = w * CHUNK + kb + tl.arange(0, BLOCK_N)  # window slot w * L + key offset in the chunk
                keep = dropout_keep(seed, dropout_p, drop_rows[:, None], slots[None, :], WINDOW * CHUNK)
                p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    # out = sum exp(s - lse) v with the fp32-rounded lse, as transformers computes it (not acc / l):
    # rows whose best score is a mask constant (lse near -1e5) then sum to 1 - 2e-3 exactly as there
    lse = m_i + tl.log(l_i)
    out = acc * tl.exp(m_i - lse)[:, None]
    # the block's round (a chunk lies in one round: S is a multiple of L), as a row of [B*H*nh, S]
    round_row = bh * NUM_CHUNKS * CHUNK + (chunk * CHUNK // S) * S
    out_mask = dv_mask[None, :]
    if not EVEN:
        out_mask = q_ok[:, None] & dv_mask[None, :]
    tl.store(out_ptr + round_row * DV + q_pos[:, None] * DV + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=out_mask)
    tl.store(lse_ptr + round_row + q_pos, lse, mask=q_ok)


# ------------------------------------------------------------------------------- launchers

def _mask_constants_ok(mask_value: float, self_mask_value: float):
    for name, value in (("mask_value", mask_value), ("self_mask_value", self_mask_value)):
        if not (isinstance(value, (int, float)) and abs(float(value)) < float("inf")):
            raise ValueError(f"lsh_chunked: {name} must be a finite float (never -inf), got {value!r}")


def _check_core(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after):
    """Validates the chunked core's inputs; returns (B, H, S, D, Dv, nh)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"lsh_chunked: q, k, v must be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, heads, seq, head_dim = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lsh_chunked: k must have q's shape {tuple(q.shape)} and v its [B, H, S], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"lsh_chunked: q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    value_dim = v.shape[3]
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM):
        raise ValueError(f"lsh_chunked: head dims 1..{MAX_HEAD_DIM} supported by the Triton kernels, got D = "
                         f"{head_dim}, Dv = {value_dim}")
    if not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"lsh_chunked: chunk_length must be a positive int, got {chunk_length!r}")
    if seq % chunk_length != 0:
        raise ValueError(f"lsh_chunked: S = {seq} must be a multiple of chunk_length = {chunk_length} (pad first)")
    if chunks_before < 0 or chunks_after < 0:
        raise ValueError(f"lsh_chunked: chunks_before / chunks_after must be >= 0, got {chunks_before}, "
                         f"{chunks_after}")
    for name, idx in (("q_idx", q_idx), ("k_idx", k_idx)):
        if (idx.dim() != 3 or tuple(idx.shape[:2]) != (batch, heads) or idx.shape[2] % seq != 0
                or idx.shape[2] == 0 or idx.is_floating_point()):
            raise ValueError(f"lsh_chunked: {name} must be an int tensor [B, H, nh * S] = [{batch}, {heads}, "
                             f"nh * {seq}], got {idx.dtype} {tuple(idx.shape)}")
    if q_idx.shape != k_idx.shape:
        raise ValueError(f"lsh_chunked: q_idx and k_idx must have one shape, got {tuple(q_idx.shape)} and "
                         f"{tuple(k_idx.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (batch, seq):
        raise ValueError(f"lsh_chunked: key_mask must be [B, S] = [{batch}, {seq}], got {tuple(key_mask.shape)}")
    return batch, heads, seq, head_dim, value_dim, q_idx.shape[2] // seq


def lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, *, chunk_length, chunks_before, chunks_after, causal,
                        self_mask, scale, mask_value, self_mask_value, dropout_p=0.0, seed=0):
    """The chunked attention core forward. q, k: [B, H, S, D] (k already normalised / scaled as the
    caller wants; scores are q . k * scale), v: [B, H, S, Dv], one dtype (fp32/fp16/bf16), any
    strides with a unit last stride (else copied); q_idx, k_idx: int [B, H, nh * S], the original
    position of every sorted query / key (each round a permutation of 0 .. S-1); key_mask: [B, S]
    bool (True = keep) or None. Returns (out_rounds [B, H, nh, S, Dv] in v's dtype, lse_rounds
    [B, H, nh, S] float32), both at the original positions of the queries. dropout_p > 0: the window
    probabilities dropped with the keep mask of (seed, dropout_p) (see lsh_dropout_keep_mask), the
    kept ones scaled by 1 / (1 - dropout_p); lse stays that of the un-dropped softmax."""
    _dropout_ok(dropout_p, seed)
    batch, heads, seq, head_dim, value_dim, rounds = _check_core(q, k, v, q_idx, k_idx, key_mask, chunk_length,
                                                                 chunks_before, chunks_after)
    _mask_constants_ok(mask_value, self_mask_value)
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    q_idx, k_idx, mask_argument, stride_mb = index_arguments(q_idx, k_idx, key_mask, q.device)
    out = torch.empty((batch, heads, rounds, seq, value_dim), dtype=v.dtype, device=q.device)
    lse = torch.empty((batch, heads, rounds, seq), dtype=torch.float32, device=q.device)
    if batch * heads == 0:
        return out, lse
    num_chunks = rounds * seq // chunk_length
    block_m, block_n, block_d, block_dv, num_warps = block_sizes("fwd", chunk_length, head_dim, value_dim, q.dtype)
    dot_fp32, precision = dot_settings(q.dtype)
    grid = (num_chunks * triton.cdiv(chunk_length, block_m), batch * heads)
    lsh_fwd_kernel[grid](
        q, k, v, q_idx, k_idx, mask_argument, out, lse,
        heads, seq, chunk_length, num_chunks, 1 + chunks_before + chunks_after, chunks_before,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), stride_mb, float(scale), float(dropout_p), int(seed),
        MASK_VALUE=float(mask_value), SELF_MASK_VALUE=float(self_mask_value), HAS_KEY_MASK=key_mask is not None,
        CAUSAL=bool(causal), SELF_MASK=bool(self_mask), DROPOUT=dropout_p > 0.0, DOT_FP32=dot_fp32,
        DOT_PRECISION=precision,
        D=head_dim, DV=value_dim, EVEN=even_blocks(chunk_length, block_m, block_n), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=num_warps, num_stages=2,
    )
    return out, lse


def lsh_chunked_backward(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, lse_rounds,
                         *, chunk_length, chunks_before, chunks_after, causal, self_mask, scale, mask_value,
                         self_mask_value, dropout_p=0.0, seed=0, out_dtypes=None):
    """(dq, dk, dv) of lsh_chunked_forward, shaped like q, k, v: float32, or the three dtypes of
    out_dtypes (each rounded once from the float32 sum of the rounds); see kernels/lsh_attention_bwd.py.
    dropout_p, seed: the forward's (its keep mask is redrawn)."""
    _dropout_ok(dropout_p, seed)
    _check_core(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after)
    _mask_constants_ok(mask_value, self_mask_value)
    return chunked_backward(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds,
                            lse_rounds, chunk_length=chunk_length, chunks_before=chunks_before,
                            chunks_after=chunks_after, causal=causal, self_mask=self_mask, scale=scale,
                            mask_value=mask_value, self_mask_value=self_mask_value, dropout_p=float(dropout_p),
                            seed=int(seed), out_dtypes=_out_dtypes(out_dtypes))


def _out_dtypes(out_dtypes):
    if out_dtypes is None:
        return None
    if len(tuple(out_dtypes)) != 3 or any(dtype not in (torch.float32, torch.float16, torch.bfloat16)
                                          for dtype in out_dtypes):
        raise ValueError(f"lsh_chunked: out_dtypes must be three of float32, float16, bfloat16 (dq, dk, dv); "
                         f"got {out_dtypes!r}")
    return tuple(out_dtypes)


def _dropout_ok(dropout_p, seed):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lsh_chunked: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"lsh_chunked: seed must be a non-negative int (the Philox seed), got {seed!r}")


@triton.jit
def lsh_dropout_keep_mask_kernel(
    keep_ptr,  # [B * H, NS, SLOTS] int8 out, contiguous (NS = nh * S sorted queries, SLOTS = W * L)
    NS, SLOTS, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The dropout keep mask the chunked-attention kernels draw, materialised (tests and debugging):
    the same helper and counters. One program per (sorted-query block, batch * head).

    References: Salmon et al., Parallel Random Numbers: As Easy as 1, 2, 3 (SC 2011), Philox."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = bh * NS + offs_m
    for start_n in range(0, SLOTS, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, dropout_p, rows[:, None], offs_n[None, :], SLOTS)
        tl.store(keep_ptr + rows[:, None] * SLOTS + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m[:, None] < NS) & (offs_n[None, :] < SLOTS))


def lsh_dropout_keep_mask(batch: int, heads: int, sorted_length: int, chunk_length: int, window: int,
                          dropout_p: float, seed: int, device="cpu") -> torch.Tensor:
    """The keep mask [B, H, nh * S, W * L] (bool, True = kept) that lsh_chunked_forward and its
    backward apply for (dropout_p, seed): row t is the sorted query t, column w * L + j the key j of
    window step w (key chunk = query chunk - before + w, modulo the number of chunks, or the query chunk
itself where |w - before| >= the number of chunks, as window_offset)."""
    slots = window * chunk_length
    keep = torch.zeros((batch, heads, sorted_length, slots), dtype=torch.int8, device=device)
    if keep.numel():
        lsh_dropout_keep_mask_kernel[(triton.cdiv(sorted_length, 16), batch * heads)](
            keep, sorted_length, slots, float(dropout_p), int(seed), BLOCK_M=16, BLOCK_N=32)
    return keep.bool()


# ------------------------------------------------------------------------ ahead-of-time compile list

DATA_POINTERS = frozenset({"q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr"})


def launch_values(head_dim: int, chunk: int, heads: int = 8, seq: int = 16384, rounds: int = 4,
                  chunks_before: int = 1, chunks_after: int = 0) -> dict:
    """The integer arguments of a chunked-attention launch at the headline sizes (bench/headline.py:
    H 8, S 16384, 4 rounds, one chunk before) for compile_check's hints: contiguous [B, H, S, D]
    q/k/v, a [B, S] key mask. BEFORE = 1 becomes a constant, as Triton specialises it. ROUND is left
    out: the backward launches once per round, and rounds after the first two pass a plain integer."""
    row = (heads * seq * head_dim, seq * head_dim, head_dim)
    values = dict(H=heads, S=seq, CHUNK=chunk, NUM_CHUNKS=rounds * seq // chunk,
                  WINDOW=1 + chunks_before + chunks_after, BEFORE=chunks_before, stride_mb=seq)
    for name in ("q", "k", "v"):
        values.update(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}s"), row))
    return values


def compile_variants():
    """The launch configurations kernels/compile_check.py compiles for a GPU target: forward and
    backward kernels for every dtype at D = Dv = 64 and 128, chunk 64 and 128, every mask on, and
    the hashing and round-combine kernels (kernels/lsh_attention_rounds.py). Yields (name, kernel,
    dtype, constexprs, data_pointers, num_warps, num_stages, launch values at the headline sizes;
    the padded D 24 / chunk 50 variants at S 3200)."""
    for dtype_name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        dot_fp32 = dtype == torch.float32
        mask_value, self_mask_value = (-1e4, -1e3) if dtype == torch.float16 else (-1e9, -1e5)
        # dropout (training) for the 16-bit dtypes at chunk 64; ptxas sm_90: bf16 D 64 forward 154
        # registers, dq 196, dk/dv 198; D 128: 226 / 232 / 245; no spills
        dropouts = ((False, 64), (False, 128), (True, 64)) if dtype != torch.float32 else ((False, 64), (False, 128))
        for head_dim in (64, 128):
            for dropout, chunk in dropouts:
                block_m, block_n, block_d, block_dv, warps = block_sizes("fwd", chunk, head_dim, head_dim, dtype)
                label = "-dropout" if dropout else ""
                yield (f"fwd-{dtype_name}-d{head_dim}-c{chunk}{label}", lsh_fwd_kernel, dtype_name,
                       dict(MASK_VALUE=mask_value, SELF_MASK_VALUE=self_mask_value, HAS_KEY_MASK=True, CAUSAL=True,
                            SELF_MASK=True, DROPOUT=dropout, DOT_FP32=dot_fp32, DOT_PRECISION="ieee", D=head_dim,
                            DV=head_dim, EVEN=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                            BLOCK_DV=block_dv),
                       DATA_POINTERS, warps, 2, launch_values(head_dim, chunk))
                yield from bwd_variants(dtype_name, dtype, head_dim, chunk, mask_value, self_mask_value, dropout,
                                        launch_values(head_dim, chunk))
    # padded head dims (24 -> 32, masked loads) and a chunk the blocks do not divide (50: row masks)
    for dtype_name in ("bfloat16", "float32"):
        dtype = getattr(torch, dtype_name)
        block_m, block_n, block_d, block_dv, warps = block_sizes("fwd", 50, 24, 24, dtype)
        yield (f"fwd-{dtype_name}-d24-c50", lsh_fwd_kernel, dtype_name,
               dict(MASK_VALUE=-1e9, SELF_MASK_VALUE=-1e5, HAS_KEY_MASK=True, CAUSAL=True, SELF_MASK=True,
                    DROPOUT=False, DOT_FP32=dtype == torch.float32, DOT_PRECISION="ieee", D=24, DV=24, EVEN=False,
                    BLOCK_M=block_m,
                    BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv), DATA_POINTERS, warps, 2,
               launch_values(24, 50, seq=3200))
        yield from bwd_variants(dtype_name, dtype, 24, 50, -1e9, -1e5, values=launch_values(24, 50, seq=3200))
    yield from rounds_variants()
