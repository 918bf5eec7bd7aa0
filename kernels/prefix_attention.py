"""Attention over a learned prefix and the sequence (prefix-tuning) without concatenating them.

    out[b, h] = softmax(scale * q[b, h] @ [pk[b?, g] ; k[b, g]]^T + mask) @ [pv[b?, g] ; v[b, g]]

q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv], the prefix pk [Bp, Hkv, P, D], pv [Bp, Hkv, P, Dv]
with Bp = 1 (shared by the batch, read with batch stride 0) or B; query head h reads kv head
g = h // GROUP (grouped-query attention). The prefix is visible; the sequence keys go through the
masks: causal bottom-right aligned (query i sees key j <= i + Sk - Sq) and one 4-D mask read through
its strides (stride 0 on broadcast dimensions: a [B, Sk] key-padding mask is [B, 1, 1, Sk]), bool
(True = attend) or additive (0 / -inf / finfo.min). With PREFIX_MASK the mask's columns cover
[prefix ; sequence] (P + Sk: rows of a mixed-task batch hide the slots that are not theirs) and the
prefix blocks read their columns too (never causal). A constexpr, not a per-row prefix length: the
mask may hide any slot per row, head and query (the torch backend's semantics), the prefix columns
cost one more mask load per prefix block, and kernels without such a mask compile as before.
Additive values are clamped at -2e38 before scaling to base 2, so finfo.min stays finite (a row masked
by finfo.min everywhere averages its keys, as SDPA's does) while -inf hides a key; a row with no
visible key at all gives zeros.

Forward: one program per (query block, query head, batch row) streams the prefix blocks, then the
sequence blocks, with the online softmax in base 2 (running max, rescaled fp32 accumulator) and
writes the output and the row log-sum-exp (fp32, natural log; +inf for a row without visible keys,
so the backward's probabilities there are 0). Under causal, key blocks the whole query block sees
run without the per-element test, blocks on the diagonal with it, blocks past it not at all, and
the query blocks with the most keys are scheduled first.
Backward: kernels/prefix_attention_bwd.py (recompute from the lse; dK/dV per key block, the
prefix's summed over the batch deterministically; dQ per query block).

Dropout (DROPOUT constexpr, dropout_p in [0, 1), an integer seed): the normalised probabilities are
multiplied by keep / (1 - dropout_p) with keep = tl.rand(seed, counter) >= dropout_p, one Philox
draw per (batch, query head, query row, key of [prefix ; sequence]) from the single helper
dropout_keep, so the backward redraws the forward's mask instead of storing it; the running sum
l and the lse stay those of the un-dropped softmax. prefix_dropout_keep_mask materialises the mask.

Dot products accumulate in fp32; 16-bit inputs feed the tensor cores in their dtype, fp32 inputs use
TF32 when torch allows it. The interpreter's bf16 dot is wrong (triton 3.8): it upcasts there.
D and Dv up to 256 (tiles padded to powers of two, masked).

References: Dao et al., FlashAttention-2 (2023) and the Triton fused-attention tutorial (06) for the
online softmax and the recompute backward; Li & Liang, Prefix-Tuning (ACL 2021) for the operation;
Salmon et al., Parallel Random Numbers: As Easy as 1, 2, 3 (SC 2011) for Philox (tl.rand).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_settings
from .prefix_attention_bwd import (
    prefix_attention_bwd_delta_kernel,
    prefix_attention_bwd_dkdv_kernel,
    prefix_attention_bwd_dq_kernel,
)
from .prefix_common import (ADDITIVE_MASK, BOOL_MASK, DELTA_WARPS, NO_MASK, block_dim, causal_key_range, dropout_keep,
                            mask_arguments, query_block, sequence_columns, sequence_scores, strides3, tile_sizes)
from .shared import unit_stride_rows

__all__ = ["MAX_HEAD_DIM", "prefix_attention_forward", "prefix_dropout_keep_mask", "compile_variants"]

MAX_HEAD_DIM = 256


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, n_limit, offs_m, m_valid,
                         offs_d, d_valid, offs_dv, dv_valid, qk_scale, mask_ptr, stride_mm, stride_mn, causal_shift,
                         seed, dropout_p, rows, key_shift, key_count,
                         IS_SEQUENCE: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                         MASK_ROWS: tl.constexpr, PREFIX_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the forward: scores, masks, running max / sum update, acc += p @ v (with
    DROPOUT: the sum l keeps every probability, the accumulator gets p * keep / (1 - dropout_p))."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < n_limit
    k_t = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],  # [BLOCK_D, BLOCK_N]
                  mask=n_valid[None, :] & d_valid[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :],  # [BLOCK_N, BLOCK_DV]
                mask=n_valid[:, None] & dv_valid[None, :], other=0.0)
    if DOT_FP32:
        k_t = k_t.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if IS_SEQUENCE or PREFIX_MASK:  # a prefix block under PREFIX_MASK: its mask columns, never causal
        s = sequence_scores(s, offs_m, offs_n, m_valid, n_valid, mask_ptr, stride_mm, stride_mn, causal_shift,
                            CAUSAL and IS_SEQUENCE, MASK_KIND, MASK_ROWS)
    else:
        s = tl.where(n_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no visible key keeps max -inf: subtract 0 there, not -inf (no NaN)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = dropout_keep(seed, dropout_p, rows, offs_n, key_shift, key_count)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def prefix_attention_fwd_kernel(
    q_ptr,  # [B, Hq, Sq, D]
    k_ptr,  # [B, Hkv, Sk, D]
    v_ptr,  # [B, Hkv, Sk, Dv]
    pk_ptr,  # [Bp, Hkv, P, D], Bp = 1 (stride_pkb = 0) or B
    pv_ptr,  # [Bp, Hkv, P, Dv]
    mask_ptr,  # [Bm, Hm, Sqm, Sk] bool or additive, broadcast dimensions with stride 0 (unused without a mask);
    #            [Bm, Hm, Sqm, P + Sk] with PREFIX_MASK: columns [prefix ; sequence]
    out_ptr,  # [B, Hq, Sq, Dv]
    lse_ptr,  # [B, Hq, Sq] float32, natural log
    Sq, Sk, P, D, Dv, GROUP,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    scale_value, dropout_p, seed,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, PREFIX_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, h, b, g, offs_m, m_valid, offs_d, d_valid, offs_dv, dv_valid = query_block(
        Sq, GROUP, D, Dv, CAUSAL, BLOCK_M, BLOCK_D, BLOCK_DV)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    qk_scale = scale_value * 1.4426950408889634  # base-2 softmax
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    mask_ptr += b * stride_mb + h * stride_mh
    seq_mask_ptr = sequence_columns(mask_ptr, P, stride_mn, PREFIX_MASK)
    causal_shift = Sk - Sq
    rows = (b * tl.num_programs(1) + h) * Sq + offs_m  # [BLOCK_M] int64: the dropout counter's row

    # the prefix: every slot visible (PREFIX_MASK: those the mask's prefix columns keep)
    pk_base = pk_ptr + b * stride_pkb + g * stride_pkh
    pv_base = pv_ptr + b * stride_pvb + g * stride_pvh
    for start_n in range(0, P, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, pk_base, pv_base, stride_pkn, stride_pvn, start_n, P, offs_m, m_valid, offs_d, d_valid,
            offs_dv, dv_valid, qk_scale, mask_ptr, stride_mm, stride_mn, causal_shift, seed, dropout_p, rows, 0, P + Sk,
            False, CAUSAL, MASK_KIND, MASK_ROWS, PREFIX_MASK, DOT_FP32, DOT_PRECISION, DROPOUT, BLOCK_N)

    # the sequence: key blocks every row of this query block sees whole, then (causal) the blocks on
    # the diagonal with the per-element causal test; blocks past the diagonal are skipped
    full_end, end_n = causal_key_range(pid_m, Sk, causal_shift, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, Sk, offs_m, m_valid, offs_d, d_valid,
            offs_dv, dv_valid, qk_scale, seq_mask_ptr, stride_mm, stride_mn, causal_shift, seed, dropout_p, rows, P,
            P + Sk, True, False, MASK_KIND, MASK_ROWS, PREFIX_MASK, DOT_FP32, DOT_PRECISION, DROPOUT, BLOCK_N)
    for start_n in range(full_end, end_n, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, Sk, offs_m, m_valid, offs_d, d_valid,
            offs_dv, dv_valid, qk_scale, seq_mask_ptr, stride_mm, stride_mn, causal_shift, seed, dropout_p, rows, P,
            P + Sk, True, True, MASK_KIND, MASK_ROWS, PREFIX_MASK, DOT_FP32, DOT_PRECISION, DROPOUT, BLOCK_N)

    empty = l_i == 0.0  # no visible key: output 0, lse +inf (backward probabilities 0)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & dv_valid[None, :])
    tl.store(lse_ptr + (b * tl.num_programs(1) + h) * Sq + offs_m, lse, mask=m_valid)


# ------------------------------------------------------------------------------------ launchers



def prefix_attention_forward(q, k, v, prefix_k, prefix_v, mask, causal: bool, scale: float, dropout_p: float = 0.0,
                             seed: int = 0):
    """q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv], prefix_k / prefix_v [1 or B, Hkv, P, D / Dv],
    mask None or 4-D broadcastable to [B, Hq, Sq, Sk] (bool or additive). dropout_p > 0: attention
    probabilities dropped with the keep mask of (seed, dropout_p) (see prefix_dropout_keep_mask), the
    kept ones scaled by 1 / (1 - dropout_p); lse stays that of the un-dropped softmax. Returns (out
    [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] float32)."""
    q, k, v, prefix_k, prefix_v = (unit_stride_rows(t) for t in (q, k, v, prefix_k, prefix_v))
    batch, q_heads, sq, dim = q.shape
    kv_heads, sk, value_dim = k.shape[1], k.shape[2], v.shape[3]
    prefix_len = prefix_k.shape[2]
    out = q.new_empty((batch, q_heads, sq, value_dim))
    lse = q.new_empty((batch, q_heads, sq), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    dot_fp32, precision = dot_settings(q.dtype)
    mask_tensor, mask_kind, mask_rows, prefix_mask, mask_strides = mask_arguments(mask, q, sk)
    block_m, block_n, warps, stages = tile_sizes(dim, value_dim, q.dtype == torch.float32, "forward",
                                             causal or mask is not None, mask_rows, dropout_p > 0.0)
    grid = (triton.cdiv(sq, block_m), q_heads, batch)
    prefix_attention_fwd_kernel[grid](
        q, k if sk else q, v if sk else q, prefix_k if prefix_len else q, prefix_v if prefix_len else q,
        mask_tensor, out, lse,
        sq, sk, prefix_len, dim, value_dim, q_heads // kv_heads,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *strides3(prefix_k), *strides3(prefix_v),
        *mask_strides, *out.stride()[:3],
        float(scale), float(dropout_p), int(seed),
        CAUSAL=bool(causal), MASK_KIND=mask_kind, MASK_ROWS=mask_rows, PREFIX_MASK=prefix_mask, DOT_FP32=dot_fp32,
        DOT_PRECISION=precision, DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_dim(dim),
        BLOCK_DV=block_dim(value_dim),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


@triton.jit
def prefix_dropout_keep_mask_kernel(
    keep_ptr,  # [B, Hq, Sq, P + Sk] int8 contiguous
    Sq, Sk, P, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The dropout keep mask the attention kernels draw, materialised (tests and debugging): the
    same helper and counters, key index over [prefix ; sequence]. One program per (query block,
    head, batch row).

    References: Salmon et al., Parallel Random Numbers: As Easy as 1, 2, 3 (SC 2011), Philox."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Sq
    rows = (b * tl.num_programs(1) + h) * Sq + offs_m
    for start_n in range(0, P + Sk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, dropout_p, rows, offs_n, 0, P + Sk)
        tl.store(keep_ptr + rows[:, None] * (P + Sk) + offs_n[None, :], keep.to(tl.int8),
                 mask=m_valid[:, None] & (offs_n[None, :] < P + Sk))


def prefix_dropout_keep_mask(batch: int, q_heads: int, sq: int, prefix_len: int, sk: int, dropout_p: float, seed: int,
                             device="cpu") -> torch.Tensor:
    """The keep mask [B, Hq, Sq, P + Sk] (bool, True = kept) that prefix_attention_forward and the
    backward apply for (dropout_p, seed): column j < P is prefix slot j, column P + j sequence key j."""
    keep = torch.zeros((batch, q_heads, sq, prefix_len + sk), dtype=torch.int8, device=device)
    if keep.numel():
        prefix_dropout_keep_mask_kernel[(triton.cdiv(sq, 16), q_heads, batch)](
            keep, sq, sk, prefix_len, float(dropout_p), int(seed), BLOCK_M=16, BLOCK_N=32)
    return keep.bool()


# ------------------------------------------------------------------------ ahead-of-time compile list

# (label, CAUSAL, MASK_KIND, MASK_ROWS, DROPOUT, PREFIX_MASK): no mask; causal with key padding; a 4-D bool
# mask; causal with a 4-D additive mask; with dropout (training): causal with key padding (GPT-2) and key
# padding alone (BERT); a mask over [prefix ; keys] as pefops.hf's mixed-task prefix rows pass it (issue 15):
# slots and key padding [B, 1, 1, P + S] (BERT; causal decoders, also training with dropout), and a 4-D
# additive one under causal (a decoder's eager attention)
MASK_VARIANTS = (("nomask", False, NO_MASK, False, False, False),
                 ("causal-padding", True, BOOL_MASK, False, False, False),
                 ("bool4d", False, BOOL_MASK, True, False, False),
                 ("causal-additive4d", True, ADDITIVE_MASK, True, False, False),
                 ("causal-padding-dropout", True, BOOL_MASK, False, True, False),
                 ("padding-dropout", False, BOOL_MASK, False, True, False),
                 ("prefixmask-padding", False, BOOL_MASK, False, False, True),
                 ("causal-prefixmask-padding", True, BOOL_MASK, False, False, True),
                 ("causal-prefixmask-padding-dropout", True, BOOL_MASK, False, True, True),
                 ("causal-prefixmask-additive4d", True, ADDITIVE_MASK, True, False, True))
DATA_POINTERS = ("q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "out_ptr", "dout_ptr", "dq_ptr")


def _launch_values(kind: str, head_dim: int, mask_kind: int, mask_rows: bool, prefix_mask: bool = False,
                   batch: int = 4, heads: int = 16, seq: int = 2048, prefix: int = 200) -> dict:
    """The integer arguments of a launch at the headline sizes (bench/headline.py: B 4, H 16, S 2048,
    P 200, one KV head per query head) for compile_check's hints: contiguous [B, H, S, D] q/k/v/out,
    a [H, P, D] prefix shared by the batch (batch stride 0), and the mask as transformers passes it:
    padding [B, 1, 1, S] or per-query-row [B, 1, S, S] (P + S columns with prefix_mask), unit key stride
    (Triton specialises the 1s: GROUP, stride_mn). kind: fwd | dq | dkdv (sequence keys) | dkdv-prefix |
    delta."""
    row = dict(D=head_dim, b=heads * seq * head_dim, h=seq * head_dim, m=head_dim)
    prefix_strides = (0, prefix * head_dim, head_dim)
    width = prefix + seq if prefix_mask else seq
    if mask_kind == NO_MASK:
        mask = (0, 0, 0, 0)
    elif mask_rows:
        mask = (seq * width, 0, width, 1)
    else:
        mask = (width, 0, 0, 1)
    if kind == "delta":
        return dict(Sq=seq, Dv=head_dim, stride_ob=row["b"], stride_oh=row["h"], stride_om=row["m"])
    values = dict(Sq=seq, Sk=seq, P=prefix, D=head_dim, Dv=head_dim, GROUP=1,
                  **dict(zip(("stride_qb", "stride_qh", "stride_qm"), (row["b"], row["h"], row["m"]))),
                  **dict(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), mask)))
    keys = prefix_strides if kind == "dkdv-prefix" else (row["b"], row["h"], row["m"])
    for name in ("k", "v"):
        values.update(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}n"), keys))
    if kind.startswith("dkdv"):
        values["N"] = prefix if kind == "dkdv-prefix" else seq
        return values
    for name in ("pk", "pv"):
        values.update(zip((f"stride_{name}b", f"stride_{name}h", f"stride_{name}n"), prefix_strides))
    if kind == "fwd":
        values.update(stride_ob=row["b"], stride_oh=row["h"], stride_om=row["m"])
    return values


def compile_variants():
    """The launch configurations kernels/compile_check.py compiles for a GPU target: every dtype,
    head sizes 64/128/256, the no-mask / causal / bool-mask / additive-mask variants at the heuristic
    tiles; dK/dV of the sequence write in the input dtype, the prefix's partials in fp32 (one variant
    without masks, and one per mask over [prefix ; keys], which the prefix's pass reads). Yields
    (name, kernel, dtype, constexprs, data_pointers, num_warps, num_stages, launch values at the
    headline sizes)."""
    for dtype in ("bfloat16", "float16", "float32"):
        fp32 = dtype == "float32"
        for head_dim in (64, 128, 256):
            for label, causal, mask_kind, mask_rows, dropout, prefix_mask in MASK_VARIANTS:
                common = dict(CAUSAL=causal, MASK_KIND=mask_kind, MASK_ROWS=mask_rows, PREFIX_MASK=prefix_mask,
                              DOT_FP32=fp32, DOT_PRECISION="ieee", DROPOUT=dropout, BLOCK_D=head_dim, BLOCK_DV=head_dim)
                values = {kind: _launch_values(kind, head_dim, mask_kind, mask_rows, prefix_mask)
                          for kind in ("fwd", "dkdv", "dq", "dkdv-prefix")}
                block_m, block_n, warps, stages = tile_sizes(head_dim, head_dim, fp32, "forward",
                                                         causal or mask_kind != NO_MASK, mask_rows, dropout)
                yield (f"fwd-{dtype}-d{head_dim}-{label}", prefix_attention_fwd_kernel, dtype,
                       dict(common, BLOCK_M=block_m, BLOCK_N=block_n), DATA_POINTERS, warps, stages,
                       values["fwd"])
                block_m, block_n, warps, stages = tile_sizes(head_dim, head_dim, fp32, "dkdv")
                yield (f"bwd-dkdv-{dtype}-d{head_dim}-{label}", prefix_attention_bwd_dkdv_kernel, dtype,
                       dict(common, IS_SEQUENCE=True, BLOCK_M=block_m, BLOCK_N=block_n),
                       DATA_POINTERS + ("dk_ptr", "dv_ptr"), warps, stages, values["dkdv"])
                if prefix_mask:
                    yield (f"bwd-dkdv-prefix-{dtype}-d{head_dim}-{label}", prefix_attention_bwd_dkdv_kernel, dtype,
                           dict(common, IS_SEQUENCE=False, BLOCK_M=block_m, BLOCK_N=block_n), DATA_POINTERS, warps,
                           stages, values["dkdv-prefix"])
                block_m, block_n, warps, stages = tile_sizes(head_dim, head_dim, fp32, "dq", dropout=dropout,
                                                         prefix_rows=prefix_mask and mask_rows)
                yield (f"bwd-dq-{dtype}-d{head_dim}-{label}", prefix_attention_bwd_dq_kernel, dtype,
                       dict(common, BLOCK_M=block_m, BLOCK_N=block_n), DATA_POINTERS, warps, stages,
                       values["dq"])
            # dK/dV over the prefix: no masks, fp32 partial outputs
            block_m, block_n, warps, stages = tile_sizes(head_dim, head_dim, fp32, "dkdv")
            yield (f"bwd-dkdv-prefix-{dtype}-d{head_dim}", prefix_attention_bwd_dkdv_kernel, dtype,
                   dict(CAUSAL=True, MASK_KIND=BOOL_MASK, MASK_ROWS=False, PREFIX_MASK=False, DOT_FP32=fp32,
                        DOT_PRECISION="ieee", DROPOUT=False, BLOCK_D=head_dim, BLOCK_DV=head_dim, IS_SEQUENCE=False,
                        BLOCK_M=block_m, BLOCK_N=block_n),
                   DATA_POINTERS, warps, stages, _launch_values("dkdv-prefix", head_dim, BOOL_MASK, False))
        yield (f"bwd-delta-{dtype}", prefix_attention_bwd_delta_kernel, dtype,
               dict(BLOCK_M=64, BLOCK_DV=64), ("out_ptr", "dout_ptr"), DELTA_WARPS, 1,
               _launch_values("delta", 64, NO_MASK, False))
