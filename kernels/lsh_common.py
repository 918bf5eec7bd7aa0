"""Shared pieces of the LSH chunked-attention kernels (kernels/lsh_attention.py forward,
kernels/lsh_attention_bwd.py backward): the @triton.jit row helpers both directions call (sorted-row
gathers, masks, the window walk, the dropout bits) and the host helpers that size and prepare a
launch. Both kernel files import from here and never from each other's internals.

References: Triton tutorial 06 (fused attention); transformers' modeling_reformer.py (LSHSelfAttention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["index_pointer", "sorted_rows", "gather_rows", "load_key_keep", "mask_scores", "window_offset",
           "dropout_keep", "program_block", "head_slices", "TILES", "block_sizes", "even_blocks", "unit_last",
           "index_arguments"]


@triton.jit
def index_pointer(idx_ptr):
    """The sorted index arrays are int64 (a no-op cast for the launchers' tensors;
    kernels/compile_check.py types every non-data pointer as fp32)."""
    return idx_ptr.to(tl.pointer_type(tl.int64))


@triton.jit
def sorted_rows(idx_ptr, start, valid, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """(original positions [BLOCK] int32, in-chunk flags [BLOCK]) of the sorted entries start ..
    start + BLOCK - 1, of which the first `valid` lie in the chunk (all of them when EVEN: the block
    divides the chunk length). Rows past the chunk read position 0 and are flagged."""
    offs = tl.arange(0, BLOCK)
    if EVEN:
        in_chunk = offs < BLOCK
        pos = tl.load(idx_ptr + start + offs)
    else:
        in_chunk = offs < valid
        pos = tl.load(idx_ptr + start + offs, mask=in_chunk, other=0)
    return pos.to(tl.int32), in_chunk


@triton.jit
def gather_rows(base_ptr, pos, in_chunk, stride, offs, width_mask, EVEN: tl.constexpr, DOT_FP32: tl.constexpr):
    """[BLOCK, BLOCK_D] rows pos of a (batch, head) slice (zeros past the chunk and the width)."""
    if EVEN:
        rows = tl.load(base_ptr + pos[:, None] * stride + offs[None, :], mask=width_mask[None, :], other=0.0)
    else:
        rows = tl.load(base_ptr + pos[:, None] * stride + offs[None, :],
                       mask=in_chunk[:, None] & width_mask[None, :], other=0.0)
    if DOT_FP32:
        rows = rows.to(tl.float32)
    return rows


@triton.jit
def load_key_keep(key_mask_ptr, k_pos, HAS_KEY_MASK: tl.constexpr):
    """The keys' padding-mask values (1 = keep) as int32, or the positions as a placeholder. The
    mask is int8 (a no-op cast for the launchers' tensor; compile_check types it fp32)."""
    keep = k_pos
    if HAS_KEY_MASK:
        keep = tl.load(key_mask_ptr.to(tl.pointer_type(tl.int8)) + k_pos).to(tl.int32)
    return keep


@triton.jit
def mask_scores(s, q_pos, k_pos, key_keep, HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                 SELF_MASK: tl.constexpr, MASK_VALUE: tl.constexpr, SELF_MASK_VALUE: tl.constexpr):
    """(masked scores, live): q_pos / k_pos / key_keep are broadcastable 2-D views (a [M, 1]
    column and a [1, N] row, or transposed); live is True where the score is still q . k (the
    only places with a gradient)."""
    live = (q_pos >= 0) & (k_pos >= 0)  # all True, at the full tile shape
    if HAS_KEY_MASK:
        live = live & (key_keep != 0)
    if CAUSAL:
        live = live & (q_pos >= k_pos)
    s = tl.where(live, s, MASK_VALUE)
    if SELF_MASK:
        is_self = q_pos == k_pos
        s = tl.where(is_self, SELF_MASK_VALUE, s)
        live = live & (q_pos != k_pos)
    return s, live


@triton.jit
def window_offset(w, BEFORE, NUM_CHUNKS):
    """Chunk offset of window step w (0 .. before + after), as transformers' _look_adjacent builds
    the window: step w is the chunk `w - before` chunks away, modulo NUM_CHUNKS, except that an
    offset of NUM_CHUNKS or more either way is no shift at all (torch.cat([x[:, :, i:], x[:, :, :i]])
    with |i| >= NUM_CHUNKS is x itself): a window longer than the sequence repeats the query's own
    chunk there, not the chunks around it. Returned in (-NUM_CHUNKS, NUM_CHUNKS)."""
    offset = w - BEFORE
    return tl.where((offset < NUM_CHUNKS) & (offset > -NUM_CHUNKS), offset, 0)


@triton.jit
def dropout_keep(seed, dropout_p, rows, slots, SLOTS):
    """The dropout keep mask of one tile, shared by the forward, both backward kernels and the debug
    launcher so all draw the same bits: keep = rand(seed, rows * SLOTS + slots) >= dropout_p, rows
    (b * H + h) * nh * S + sorted query index as int64, slots the window slot w * L + key offset in
    the chunk (SLOTS = W * L), both broadcastable 2-D views ([M, 1] and [1, N], or transposed). The
    counter is int64 (tl.rand feeds both words to Philox): unique up to B * H * nh * S * W * L < 2**63."""
    return tl.rand(seed, rows * SLOTS + slots) >= dropout_p


@triton.jit
def program_block(H, first_chunk, CHUNK, BLOCK: tl.constexpr):
    """(bh, b, h, chunk, first row in the chunk) of this program: axis 1 is b * H + h (int64), axis 0
    a block of BLOCK sorted rows of chunk first_chunk + pid // (blocks per chunk)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    blocks_per_chunk = tl.cdiv(CHUNK, BLOCK)
    return bh, bh // H, bh % H, first_chunk + pid // blocks_per_chunk, (pid % blocks_per_chunk) * BLOCK


@triton.jit
def head_slices(q_ptr, k_ptr, v_ptr, q_idx_ptr, k_idx_ptr, key_mask_ptr, bh, b, h, NUM_CHUNKS, CHUNK,
                stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb):
    """(q, k, v, q_idx, k_idx, key_mask) pointers moved to this (batch, head): int64 bases per
    (b, h), so offsets inside one (b, h) stay int32 (the launchers check they fit; [BLOCK, D]
    tiles of 64-bit offsets would take twice the registers of the gathers)."""
    return (q_ptr + (b * stride_qb + h * stride_qh), k_ptr + (b * stride_kb + h * stride_kh),
            v_ptr + (b * stride_vb + h * stride_vh), index_pointer(q_idx_ptr) + bh * NUM_CHUNKS * CHUNK,
            index_pointer(k_idx_ptr) + bh * NUM_CHUNKS * CHUNK, key_mask_ptr + b * stride_mb)


# (BLOCK_M, BLOCK_N, num_warps) per kernel, for 16-bit operands with both head dims <= 64 / up to
# 128, and for fp32 (its "ieee" dots run on FMA units and hold 4-byte operands: smaller tiles, 8
# warps). ptxas for sm_90 (kernels/compile_check.py, every mask on, 16-byte aligned pointers):
# bf16 D 64: forward 161 registers, dq 172, dk/dv 168; D 128: 169 / 191 / 193; no spills. fp32:
# 68-112 registers, D 128 forward and dq spill 16 bytes. Larger tiles spilled (forward D 128 at 4
# warps, dk/dv 64 x 64 at D 128); 64-bit offset tiles and masked head-dim loads cost 60-100 more.
TILES = {
    "fwd": ((64, 64, 4), (64, 64, 8), (32, 32, 8)),
    "dq": ((64, 64, 8), (64, 64, 8), (32, 32, 8)),
    "dkdv": ((32, 64, 4), (32, 64, 8), (32, 32, 8)),  # BLOCK_M: the query step, BLOCK_N: the key block
}


def block_sizes(kind: str, chunk_length: int, head_dim: int, value_dim: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_warps) for kernel `kind` (fwd, dq, dkdv): the row
    blocks no larger than the chunk rounded up to a power of two, and at least 16 (tl.dot); the
    head-dim blocks the dims rounded up to a power of two (>= 16)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(value_dim))
    narrow, wide, fp32 = TILES[kind]
    block_m, block_n, num_warps = fp32 if dtype == torch.float32 else (narrow if max(block_d, block_dv) <= 64 else wide)
    chunk_block = max(16, triton.next_power_of_2(chunk_length))
    return min(block_m, chunk_block), min(block_n, chunk_block), block_d, block_dv, num_warps


def even_blocks(chunk_length: int, block_m: int, block_n: int) -> bool:
    """Both row blocks divide the chunk: the kernels then skip every row mask."""
    return chunk_length % block_m == 0 and chunk_length % block_n == 0



def unit_last(tensor):
    """A unit last stride, and every offset inside one (batch, head) below 2**31 (the kernels add
    int32 offsets to an int64 base per (batch, head)): else a contiguous copy."""
    seq, width = tensor.shape[2], tensor.shape[3]
    if seq * max(width, 1) >= 2 ** 31:
        raise ValueError(f"lsh_chunked: S * D = {seq} * {width} must stay below 2**31")
    if tensor.stride(-1) == 1 and (seq - 1) * tensor.stride(2) + width < 2 ** 31:
        return tensor
    return tensor.contiguous()


def index_arguments(q_idx, k_idx, key_mask, device):
    """int64 contiguous indices and the key mask as int8 [B, S] with unit stride (or a dummy)."""
    q_idx = q_idx.to(device=device, dtype=torch.int64).contiguous()
    k_idx = q_idx if k_idx is q_idx else k_idx.to(device=device, dtype=torch.int64).contiguous()
    if key_mask is None:
        return q_idx, k_idx, torch.ones(1, dtype=torch.int8, device=device), 0
    key_mask = key_mask.to(device=device, dtype=torch.bool).to(torch.int8).contiguous()
    return q_idx, k_idx, key_mask, key_mask.stride(0)

