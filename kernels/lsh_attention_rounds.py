"""LSH attention, the per-round elementwise kernels: bucket ids from the rotated vectors, and the
combine of the hash rounds by their log-sum-exp (forward and backward).

Bucket ids (transformers' LSHSelfAttention._hash_vectors after its einsum): per factor f of
num_buckets the argmax over cat([xR_f, -xR_f]) with torch.argmax's first-index rule on ties,
combined mixed-radix (bucket += prod(previous factors) * arg_f); tokens whose mask is False go to
the extra bucket num_buckets_total; round r adds r * (num_buckets_total + extra_bucket). One
program per block of rows of [B * H * nh * S]; the row is read once (R/2 values), int64 written.

Round combine: lse = logsumexp_r lse_r, w_r = exp(lse_r - lse), out = sum_r w_r out_r; backward
d out_r = w_r g and d lse_r = w_r (g . out_r - g . out + d lse), with w_r recomputed from the
rounds' lse (max and sum), not from the combined lse: when every round's lse is a mask constant
(-1e5 + log c) the fp32 rounding of the combined lse would shift the weights by ~0.4 %. One program
per block of rows of one (batch, head); rounds are a loop, everything in fp32; no atomics.

Memory floor (B=8, H=8, S=16k, Dv=64, nh=4, bf16): buckets read 4.2 M rows of R/2 values and write
8 B each (R = 64, fp32 einsum output: 134 MB + 34 MB, ~40 us at 4.3 TB/s); combine forward reads
out_rounds (537 MB) and lse_rounds and writes out (134 MB): >= 0.16 ms; backward reads g, out,
out_rounds, lse_rounds and writes grad_out_rounds (537 MB): >= 0.31 ms.

References: Triton tutorial 02 (fused softmax: row-blocked reductions in registers); Kitaev et
al., ICLR 2020 (Reformer); transformers' modeling_reformer.py (_hash_vectors, the num_hashes combine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def lsh_bucket_kernel(
    rot_ptr,  # [B, H, nh, S, R2] contiguous: the rotated vectors (einsum output), R2 = sum(factors) / 2
    factor_ptr,  # [num_factors] int32: the bucket factors (each even)
    key_mask_ptr,  # [B, S] int8 (1 = keep), unit stride on S; read only with HAS_KEY_MASK
    out_ptr,  # [B, H, nh * S] out, int64: offset buckets
    extra_ptr,  # [1] int64: 1 if the padding bucket exists, else 0; read only with EXTRA_FROM_PTR
    ROWS, H, NH, S, R2, NUM_FACTORS, PAD_BUCKET, ROUND_STRIDE,
    stride_mb,
    HAS_KEY_MASK: tl.constexpr, EXTRA_FROM_PTR: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < ROWS
    cols = tl.arange(0, BLOCK_R)
    factor_ptr = factor_ptr.to(tl.pointer_type(tl.int32))
    # upcast: exact for every narrower float, and the comparisons below then match torch's
    x = tl.load(rot_ptr + rows[:, None] * R2 + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < R2),
                other=0.0).to(tl.float32)
    bucket = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
    product = tl.full([], 1, tl.int64)
    start = tl.full([], 0, tl.int32)
    for f in range(NUM_FACTORS):
        half = tl.load(factor_ptr + f) // 2
        in_factor = (cols[None, :] >= start) & (cols[None, :] < start + half)
        pos_max = tl.max(tl.where(in_factor, x, float("-inf")), axis=1)
        neg_max = tl.max(tl.where(in_factor, -x, float("-inf")), axis=1)
        top = tl.maximum(pos_max, neg_max)
        # torch.argmax over cat([x, -x]) takes the first maximum: the positive half comes first
        first_pos = tl.min(tl.where(in_factor & (x == top[:, None]), cols[None, :] - start, 2 * BLOCK_R), axis=1)
        first_neg = tl.min(tl.where(in_factor & (-x == top[:, None]), cols[None, :] - start + half, 2 * BLOCK_R),
                           axis=1)
        bucket += product * tl.minimum(first_pos, first_neg).to(tl.int64)
        product = product * 2 * half
        start = start + half
    s = rows % S
    rnd = (rows // S) % NH
    if HAS_KEY_MASK:
        b = rows // (S * NH * H)
        keep = tl.load(key_mask_ptr + b * stride_mb + s, mask=row_mask, other=1)
        bucket = tl.where(keep != 0, bucket, PAD_BUCKET)
    if EXTRA_FROM_PTR:
        # the round stride num_buckets + any(padding) without reading the flag on the host
        round_stride = ROUND_STRIDE + tl.load(extra_ptr).to(tl.int64)
    else:
        round_stride = ROUND_STRIDE
    tl.store(out_ptr + rows, bucket + rnd * round_stride, mask=row_mask)


@triton.jit
def lsh_combine_fwd_kernel(
    out_rounds_ptr,  # [B * H, nh, S, Dv] contiguous
    lse_rounds_ptr,  # [B * H, nh, S] contiguous, float32
    out_ptr,  # [B * H, S, Dv] out, contiguous, out_rounds' dtype
    lse_ptr,  # [B * H, S] out, contiguous, float32: logsumexp over the rounds
    S, NH,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    cols = tl.arange(0, BLOCK_DV)
    tile_mask = row_mask[:, None] & (cols[None, :] < DV)
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_DV], dtype=tl.float32)
    for r in range(NH):
        round_row = (bh * NH + r) * S
        lse_r = tl.load(lse_rounds_ptr + round_row + rows, mask=row_mask, other=0.0)
        o = tl.load(out_rounds_ptr + (round_row + rows)[:, None] * DV + cols[None, :], mask=tile_mask, other=0.0)
        m_new = tl.maximum(m, lse_r)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_r - m_new)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o.to(tl.float32)
        m = m_new
    # w_r = exp(lse_r - lse) with the fp32-rounded combined lse, as transformers' combine computes it
    lse = m + tl.log(total)
    out = acc * tl.exp(m - lse)[:, None]
    tl.store(out_ptr + (bh * S + rows)[:, None] * DV + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=tile_mask)
    tl.store(lse_ptr + bh * S + rows, lse, mask=row_mask)


@triton.jit
def lsh_combine_bwd_kernel(
    grad_ptr,  # [B * H, S, Dv] contiguous: gradient of the combined out
    grad_lse_ptr,  # [B * H, S] contiguous, float32: gradient of the combined lse (read only with HAS_DLSE)
    out_ptr,  # [B * H, S, Dv] contiguous, grad's dtype: the combined out
    out_rounds_ptr,  # [B * H, nh, S, Dv] contiguous, grad's dtype
    lse_rounds_ptr,  # [B * H, nh, S] contiguous, float32
    grad_out_rounds_ptr,  # [B * H, nh, S, Dv] out, contiguous, grad's dtype
    grad_lse_rounds_ptr,  # [B * H, nh, S] out, contiguous, float32
    S, NH,
    HAS_DLSE: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    cols = tl.arange(0, BLOCK_DV)
    tile_mask = row_mask[:, None] & (cols[None, :] < DV)
    combined_rows = bh * S + rows
    g = tl.load(grad_ptr + combined_rows[:, None] * DV + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + combined_rows[:, None] * DV + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    shift = -tl.sum(g * out, axis=1)  # d lse_r = w_r (g . out_r - g . out + d lse)
    if HAS_DLSE:
        shift += tl.load(grad_lse_ptr + combined_rows, mask=row_mask, other=0.0)
    # w_r = exp(lse_r - lse) with the combined lse recomputed (and rounded) exactly as the forward did
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    for r in range(NH):
        lse_r = tl.load(lse_rounds_ptr + (bh * NH + r) * S + rows, mask=row_mask, other=0.0)
        m_new = tl.maximum(m, lse_r)
        total = total * tl.exp(m - m_new) + tl.exp(lse_r - m_new)
        m = m_new
    lse = m + tl.log(total)
    for r in range(NH):
        round_rows = (bh * NH + r) * S + rows
        w = tl.exp(tl.load(lse_rounds_ptr + round_rows, mask=row_mask, other=0.0) - lse)
        o = tl.load(out_rounds_ptr + round_rows[:, None] * DV + cols[None, :], mask=tile_mask, other=0.0)
        tl.store(grad_out_rounds_ptr + round_rows[:, None] * DV + cols[None, :],
                 (w[:, None] * g).to(grad_out_rounds_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(grad_lse_rounds_ptr + round_rows, w * (tl.sum(g * o.to(tl.float32), axis=1) + shift), mask=row_mask)


# ------------------------------------------------------------------------------- launchers


def _bucket_total(bucket_factors) -> tuple[list[int], int]:
    factors = [int(bucket_factors)] if isinstance(bucket_factors, int) else [int(f) for f in bucket_factors]
    if not factors or any(f < 2 or f % 2 for f in factors):
        raise ValueError(f"lsh_bucket_ids: every bucket factor must be an even number >= 2, got {bucket_factors!r}")
    total = 1
    for factor in factors:
        total *= factor
    return factors, total


def _bucket_blocks(width: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_R): the row as one block of R/2 values, about 4K values a program."""
    block_r = max(2, triton.next_power_of_2(width))
    return max(1, min(4096 // block_r, 256)), block_r


_FACTOR_TENSORS: dict = {}


def _factor_tensor(factors: tuple, device) -> torch.Tensor:
    """int32 [num_factors] on the device, made once per (factors, device) by fills (no copy of
    Python data to the device, no sync), then reused."""
    key = (tuple(factors), torch.device(device))
    tensor = _FACTOR_TENSORS.get(key)
    if tensor is None:
        tensor = torch.empty(len(factors), dtype=torch.int32, device=device)
        for i, factor in enumerate(factors):
            tensor[i] = factor
        _FACTOR_TENSORS[key] = tensor
    return tensor


def lsh_bucket_ids(rotated, bucket_factors, key_mask=None, extra_bucket=False):
    """Offset buckets int64 [B, H, nh * S] from rotated [B, H, nh, S, sum(factors) / 2] (the
    torch.einsum output of transformers' _hash_vectors; any layout, copied when not contiguous):
    per factor f the argmax over cat([x_f, -x_f]) with the first index on ties, combined
    bucket += prod(previous factors) * arg_f; with extra_bucket, tokens whose key_mask is False go
    to bucket num_buckets_total and every round spans num_buckets_total + 1; round r adds
    r * (num_buckets_total + extra_bucket). bucket_factors: an int or a list of even ints.
    extra_bucket: a bool, or a one-element integer/bool tensor on the device (e.g. (~keep).any()),
    read by the kernel, so that the host never waits for it."""
    factors, total = _bucket_total(bucket_factors)
    if rotated.dim() != 5 or rotated.shape[4] != sum(factors) // 2:
        raise ValueError(f"lsh_bucket_ids: rotated must be [B, H, nh, S, sum(factors) / 2 = {sum(factors) // 2}], "
                         f"got {tuple(rotated.shape)}")
    if rotated.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"lsh_bucket_ids: rotated must be float32/float16/bfloat16, got {rotated.dtype}")
    batch, heads, rounds, seq, width = rotated.shape
    if key_mask is not None and tuple(key_mask.shape) != (batch, seq):
        raise ValueError(f"lsh_bucket_ids: key_mask must be [B, S] = [{batch}, {seq}], got {tuple(key_mask.shape)}")
    out = torch.empty((batch, heads, rounds * seq), dtype=torch.int64, device=rotated.device)
    rows = batch * heads * rounds * seq
    if rows == 0:
        return out
    rotated = rotated.contiguous()
    extra_from_ptr = isinstance(extra_bucket, torch.Tensor)
    use_mask = key_mask is not None and (extra_from_ptr or bool(extra_bucket))
    mask_argument = (key_mask.to(device=rotated.device, dtype=torch.bool).to(torch.int8).contiguous() if use_mask
                     else torch.ones(1, dtype=torch.int8, device=rotated.device))
    factor_tensor = _factor_tensor(factors, rotated.device)
    extra_argument = (extra_bucket.reshape(1).to(device=rotated.device, dtype=torch.int64) if extra_from_ptr
                      else factor_tensor)
    block_rows, block_r = _bucket_blocks(width)
    block_rows = min(block_rows, triton.next_power_of_2(rows))
    lsh_bucket_kernel[(triton.cdiv(rows, block_rows),)](
        rotated, factor_tensor, mask_argument, out, extra_argument,
        rows, heads, rounds, seq, width, len(factors), total,
        total if extra_from_ptr else total + int(bool(extra_bucket)),
        mask_argument.stride(0) if use_mask else 0,
        HAS_KEY_MASK=use_mask, EXTRA_FROM_PTR=extra_from_ptr, BLOCK_ROWS=block_rows, BLOCK_R=block_r, num_warps=4,
    )
    return out


def _combine_blocks(seq: int, value_dim: int) -> tuple[int, int]:
    block_dv = max(16, triton.next_power_of_2(value_dim))
    return max(1, min(4096 // block_dv, triton.next_power_of_2(seq))), block_dv


def _check_rounds(out_rounds, lse_rounds, name="lsh_combine_rounds"):
    if out_rounds.dim() != 5 or lse_rounds.shape != out_rounds.shape[:4]:
        raise ValueError(f"{name}: out_rounds must be [B, H, nh, S, Dv] and lse_rounds [B, H, nh, S], got "
                         f"{tuple(out_rounds.shape)} and {tuple(lse_rounds.shape)}")
    if out_rounds.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: out_rounds must be float32/float16/bfloat16, got {out_rounds.dtype}")


def lsh_combine_rounds(out_rounds, lse_rounds):
    """(out [B, H, S, Dv] in out_rounds' dtype, lse [B, H, S] float32): lse = logsumexp over the
    rounds, out = sum_r exp(lse_r - lse) out_r (transformers' num_hashes combine)."""
    _check_rounds(out_rounds, lse_rounds)
    batch, heads, rounds, seq, value_dim = out_rounds.shape
    out = torch.empty((batch, heads, seq, value_dim), dtype=out_rounds.dtype, device=out_rounds.device)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=out_rounds.device)
    if out.numel() == 0:
        return out, lse
    block_s, block_dv = _combine_blocks(seq, value_dim)
    lsh_combine_fwd_kernel[(triton.cdiv(seq, block_s), batch * heads)](
        out_rounds.contiguous(), lse_rounds.to(torch.float32).contiguous(), out, lse, seq, rounds,
        DV=value_dim, BLOCK_S=block_s, BLOCK_DV=block_dv, num_warps=4)
    return out, lse


def lsh_combine_rounds_backward(grad_out, grad_lse, out_rounds, lse_rounds, out):
    """(grad_out_rounds [B, H, nh, S, Dv] in out_rounds' dtype, grad_lse_rounds [B, H, nh, S]
    float32) of lsh_combine_rounds, given the gradients of its out and lse (grad_lse may be None),
    its inputs and its out (the weights are recomputed from lse_rounds)."""
    _check_rounds(out_rounds, lse_rounds, "lsh_combine_rounds_backward")
    batch, heads, rounds, seq, value_dim = out_rounds.shape
    for name, tensor, shape in (("grad_out", grad_out, (batch, heads, seq, value_dim)),
                                ("out", out, (batch, heads, seq, value_dim)),
                                ("grad_lse", grad_lse, (batch, heads, seq))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"lsh_combine_rounds_backward: {name} must be {list(shape)}, got {tuple(tensor.shape)}")
    grad_out_rounds = torch.empty_like(out_rounds, memory_format=torch.contiguous_format)
    grad_lse_rounds = torch.empty((batch, heads, rounds, seq), dtype=torch.float32, device=out_rounds.device)
    if grad_out_rounds.numel() == 0:
        return grad_out_rounds, grad_lse_rounds
    lse_rounds = lse_rounds.to(torch.float32).contiguous()
    block_s, block_dv = _combine_blocks(seq, value_dim)
    lsh_combine_bwd_kernel[(triton.cdiv(seq, block_s), batch * heads)](
        grad_out.to(out_rounds.dtype).contiguous(),
        lse_rounds if grad_lse is None else grad_lse.to(torch.float32).contiguous(),
        out.to(out_rounds.dtype).contiguous(), out_rounds.contiguous(), lse_rounds,
        grad_out_rounds, grad_lse_rounds, seq, rounds,
        HAS_DLSE=grad_lse is not None, DV=value_dim, BLOCK_S=block_s, BLOCK_DV=block_dv, num_warps=4)
    return grad_out_rounds, grad_lse_rounds


DATA_POINTERS = frozenset({"rot_ptr", "out_rounds_ptr", "out_ptr", "grad_ptr", "grad_out_rounds_ptr"})


def rounds_variants():
    """compile_variants() entries of the hashing and combine kernels, with the integer arguments of
    their launches: hashing at lsh_attention_padded's sizes (B 2, H 8, 4 rounds, S 4096, 64 buckets:
    R2 32, one factor, the padding bucket read from a pointer), combining at the headline's
    (S 16384, 4 rounds)."""
    for dtype_name in ("bfloat16", "float32"):
        block_rows, block_r = _bucket_blocks(32)
        yield (f"buckets-{dtype_name}-r64", lsh_bucket_kernel, dtype_name,
               dict(HAS_KEY_MASK=True, EXTRA_FROM_PTR=True, BLOCK_ROWS=block_rows, BLOCK_R=block_r), DATA_POINTERS, 4, 1,
               dict(ROWS=2 * 8 * 4 * 4096, H=8, NH=4, S=4096, R2=32, NUM_FACTORS=1, PAD_BUCKET=64, ROUND_STRIDE=64,
                    stride_mb=4096))
    for dtype_name in ("bfloat16", "float16", "float32"):
        for value_dim in (64, 128):
            block_s, block_dv = _combine_blocks(16384, value_dim)
            yield (f"combine-fwd-{dtype_name}-d{value_dim}", lsh_combine_fwd_kernel, dtype_name,
                   dict(DV=value_dim, BLOCK_S=block_s, BLOCK_DV=block_dv), DATA_POINTERS, 4, 1, dict(S=16384, NH=4))
            yield (f"combine-bwd-{dtype_name}-d{value_dim}", lsh_combine_bwd_kernel, dtype_name,
                   dict(HAS_DLSE=True, DV=value_dim, BLOCK_S=block_s, BLOCK_DV=block_dv), DATA_POINTERS, 4, 1,
                   dict(S=16384, NH=4))
