"""The fused middle of AdapterFusion: segment scores → softmax → probability-weighted units, fwd + bwd.

Between the GEMMs of pefops.ops.adapter_fusion, for T rows and N adapters whose R bottleneck units
lie in contiguous segments (adapter i owns units offsets[i] .. offsets[i+1] - 1):

    scores[t, i] = Σ_{r in i} t_[t, r] · a[t, r] + bias[t, i]
    p[t, :]      = softmax(scores[t, :] · mask[t, :] / T)          (mask: dropout, optional)
    w[t, r]      = a[t, r] · p[t, segment(r)]

t_, a, bias in fp32, fp16 or bf16 (one dtype, unit column stride, any row stride); everything is
computed in fp32; w [T, R] and p [T, N] come out contiguous in the input dtype.

Forward (one program per BLOCK_T rows, no atomics): walk R in aligned BLOCK_R-wide column tiles
(loads and stores masked only by the row and R bounds, so they vectorise when the strides and R
allow). Each tile finds its columns' segments from the offsets (the number of segment starts at or
below each column, against the [BLOCK_N] starts read once per program) and, for each segment it
touches (usually one), adds the row sums of t_·a over that segment's columns into column i of a
[BLOCK_T, BLOCK_N] fp32 score tile. Then the bias and the mask, softmax in registers, store p; a
second walk spreads p over the units (column i of p at every unit of segment i) and stores w = a · p.
Backward (same grid): a first walk adds Σ_{r in i} dw·a to dp (dp_total), then
ds = p ⊙ (dp_total − Σ_i p_i dp_total_i) / T (⊙ mask) in registers, stored as d bias; the second walk
spreads ds and p over the units and writes d t_ = ds[seg] · a and d a = ds[seg] · t_ + dw · p[seg].
Every sum has a fixed order (the tile shapes depend on the shape only): results are bit-identical
run to run. Segments of any size work (1 and 0 included); a tile costs one masked row reduction
(forward/first walk) or one select (second walk) per segment it touches.

Memory floor (one [T, R] pass = T·R·element size; the [T, N] tensors are R/N times smaller):
forward reads t_ and a and writes w, 3 passes (+ bias and p, [T, N] each, and the fp32 mask);
backward reads dw, t_, a and writes d t_, d a, 5 passes (+ dp, p, d bias, mask). The kernels read
a (forward) and dw, a (backward) a second time, in the second walk over the same rows a moment
later (from L2 on a GPU: a program's rows are BLOCK_T·R elements): 4 and 7 passes from the SMs' side.
Example, T = 16384, N = 8 adapters of rank 64 (R = 512), bf16: one pass is 16.8 MB, so the floor is
forward ≥ 12 µs, backward ≥ 20 µs at 4.3 TB/s (H200); the [T, H] GEMMs around it are far larger.

References: Triton tutorial 02 (fused softmax: a row block's softmax in registers); Liger-Kernel's
row-blocked kernels; Pfeiffer et al., EACL 2021 (AdapterFusion).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting

# Elements per [BLOCK_T, BLOCK_R] column tile, and its widest and narrowest column block.
TILE_ELEMENTS = 2048
MAX_BLOCK_R = 64
MIN_BLOCK_R = 32
# At most this many adapters (the [BLOCK_T, BLOCK_N] score tile lives in registers).
MAX_ADAPTERS = 64
# Row blocks shrink (down to MIN_BLOCK_T rows) until about this many programs fill the GPU.
TARGET_PROGRAMS = 1024
MIN_BLOCK_T = 4


@triton.jit
def _segment_bounds(offsets_ptr, heads, N):
    """[BLOCK_N] int32: the first unit of segments 1 .. N - 1 (int32 max elsewhere), read once per
    program. offsets_ptr is cast to int32 (a no-op for the launchers' int32 tensor;
    kernels/compile_check.py types every non-data pointer as fp32)."""
    offsets_ptr = offsets_ptr.to(tl.pointer_type(tl.int32))
    return tl.load(offsets_ptr + 1 + heads, mask=heads < N - 1, other=2147483647)


@triton.jit
def _segment_span(bounds, cols, col_mask):
    """(segment of each column [BLOCK_R], first and last segment of the tile's columns below R):
    the number of segment starts at or below the column (columns past R are masked everywhere)."""
    segments = tl.sum((bounds[None, :] <= cols[:, None]).to(tl.int32), axis=1)
    first = tl.min(tl.where(col_mask, segments, 2147483647), axis=0)
    last = tl.max(tl.where(col_mask, segments, -1), axis=0)
    return segments, first, last


@triton.jit
def _column(tile, heads, i):
    """Column i of a [BLOCK_T, BLOCK_N] tile as a [BLOCK_T] vector."""
    return tl.sum(tl.where(heads[None, :] == i, tile, 0.0), axis=1)


@triton.jit
def _add_segment_sums(acc, product, segments, heads, first, last):
    """acc[:, i] += Σ over the tile's columns of segment i of product, for i in first .. last."""
    for i in range(first, last + 1):
        part = tl.sum(tl.where(segments[None, :] == i, product, 0.0), axis=1)
        acc = tl.where(heads[None, :] == i, acc + part[:, None], acc)
    return acc


@triton.jit
def _spread(tile, segments, heads, first, last, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """[BLOCK_T, BLOCK_R]: column segment(r) of the [BLOCK_T, BLOCK_N] tile at every unit r."""
    out = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for i in range(first, last + 1):
        out = tl.where(segments[None, :] == i, _column(tile, heads, i)[:, None], out)
    return out


@triton.jit
def fusion_mix_fwd_kernel(
    t_ptr,  # [T, R], unit column stride
    a_ptr,  # [T, R], unit column stride, t's dtype
    bias_ptr,  # [T, N], unit column stride, t's dtype
    offsets_ptr,  # [N + 1] int32: segment i is units offsets[i] .. offsets[i + 1] - 1
    mask_ptr,  # [T, N] float32, unit column stride (read only with HAS_MASK): dropout, already scaled
    w_ptr,  # [T, R] out, unit column stride, t's dtype
    p_ptr,  # [T, N] out, unit column stride, t's dtype
    T, R, N,
    stride_t, stride_a, stride_bias, stride_mask, stride_w, stride_p,
    scale_value,  # 1 / temperature
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    heads = tl.arange(0, BLOCK_N)
    head_mask = heads < N
    bounds = _segment_bounds(offsets_ptr, heads, N)

    scores = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        cols = start + tl.arange(0, BLOCK_R)
        col_mask = cols < R
        segments, first, last = _segment_span(bounds, cols, col_mask)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        t = tl.load(t_ptr + rows64[:, None] * stride_t + cols[None, :], mask=tile_mask, other=0.0)
        a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=tile_mask, other=0.0)
        scores = _add_segment_sums(scores, t.to(tl.float32) * a.to(tl.float32), segments, heads, first, last)

    small_mask = row_mask[:, None] & head_mask[None, :]
    bias = tl.load(bias_ptr + rows64[:, None] * stride_bias + heads[None, :], mask=small_mask, other=0.0)
    scores += bias.to(tl.float32)
    if HAS_MASK:
        scores *= tl.load(mask_ptr + rows64[:, None] * stride_mask + heads[None, :], mask=small_mask, other=0.0)
    logits = tl.where(head_mask[None, :], scores * scale_value, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(p_ptr + rows64[:, None] * stride_p + heads[None, :], p.to(p_ptr.dtype.element_ty), mask=small_mask)

    for start in range(0, R, BLOCK_R):
        cols = start + tl.arange(0, BLOCK_R)
        col_mask = cols < R
        segments, first, last = _segment_span(bounds, cols, col_mask)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=tile_mask, other=0.0)
        w = a.to(tl.float32) * _spread(p, segments, heads, first, last, BLOCK_T, BLOCK_R)
        tl.store(w_ptr + rows64[:, None] * stride_w + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def fusion_mix_bwd_kernel(
    dw_ptr,  # [T, R], unit column stride: gradient of w
    dp_ptr,  # [T, N], unit column stride, dw's dtype: gradient of p
    t_ptr,  # [T, R], unit column stride, dw's dtype
    a_ptr,  # [T, R], unit column stride, dw's dtype
    p_ptr,  # [T, N], unit column stride, dw's dtype: the forward's p
    offsets_ptr,  # [N + 1] int32: segment i is units offsets[i] .. offsets[i + 1] - 1
    mask_ptr,  # [T, N] float32, unit column stride (read only with HAS_MASK)
    dt_ptr,  # [T, R] out, unit column stride, dw's dtype (written only with NEED_T)
    da_ptr,  # [T, R] out, unit column stride, dw's dtype (written only with NEED_A)
    dbias_ptr,  # [T, N] out, unit column stride, dw's dtype
    T, R, N,
    stride_dw, stride_dp, stride_t, stride_a, stride_p, stride_mask, stride_dt, stride_da, stride_dbias,
    scale_value,  # 1 / temperature
    HAS_MASK: tl.constexpr, NEED_T: tl.constexpr, NEED_A: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    heads = tl.arange(0, BLOCK_N)
    head_mask = heads < N
    bounds = _segment_bounds(offsets_ptr, heads, N)
    small_mask = row_mask[:, None] & head_mask[None, :]

    p = tl.load(p_ptr + rows64[:, None] * stride_p + heads[None, :], mask=small_mask, other=0.0).to(tl.float32)
    dp_total = tl.load(dp_ptr + rows64[:, None] * stride_dp + heads[None, :], mask=small_mask, other=0.0)
    dp_total = dp_total.to(tl.float32)
    for start in range(0, R, BLOCK_R):
        cols = start + tl.arange(0, BLOCK_R)
        col_mask = cols < R
        segments, first, last = _segment_span(bounds, cols, col_mask)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        dw = tl.load(dw_ptr + rows64[:, None] * stride_dw + cols[None, :], mask=tile_mask, other=0.0)
        a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=tile_mask, other=0.0)
        dp_total = _add_segment_sums(dp_total, dw.to(tl.float32) * a.to(tl.float32), segments, heads, first, last)

    ds = p * (dp_total - tl.sum(p * dp_total, axis=1)[:, None]) * scale_value
    if HAS_MASK:
        ds *= tl.load(mask_ptr + rows64[:, None] * stride_mask + heads[None, :], mask=small_mask, other=0.0)
    tl.store(dbias_ptr + rows64[:, None] * stride_dbias + heads[None, :], ds.to(dbias_ptr.dtype.element_ty),
             mask=small_mask)

    if NEED_T or NEED_A:
        for start in range(0, R, BLOCK_R):
            cols = start + tl.arange(0, BLOCK_R)
            col_mask = cols < R
            segments, first, last = _segment_span(bounds, cols, col_mask)
            tile_mask = row_mask[:, None] & col_mask[None, :]
            ds_units = _spread(ds, segments, heads, first, last, BLOCK_T, BLOCK_R)
            a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=tile_mask, other=0.0)
            if NEED_T:
                tl.store(dt_ptr + rows64[:, None] * stride_dt + cols[None, :],
                         (ds_units * a.to(tl.float32)).to(dt_ptr.dtype.element_ty), mask=tile_mask)
            if NEED_A:
                p_units = _spread(p, segments, heads, first, last, BLOCK_T, BLOCK_R)
                t = tl.load(t_ptr + rows64[:, None] * stride_t + cols[None, :], mask=tile_mask, other=0.0)
                dw = tl.load(dw_ptr + rows64[:, None] * stride_dw + cols[None, :], mask=tile_mask, other=0.0)
                da = ds_units * t.to(tl.float32) + dw.to(tl.float32) * p_units
                tl.store(da_ptr + rows64[:, None] * stride_da + cols[None, :], da.to(da_ptr.dtype.element_ty),
                         mask=tile_mask)


# ----------------------------------------------------------------------------------- launchers


def _target_programs() -> int:
    return 1 if interpreting() else TARGET_PROGRAMS


def _block_sizes(rows: int, units: int, adapters: int, target_programs: int = TARGET_PROGRAMS,
                 ) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_N, num_warps) from the shape only (the segment sizes live on the
    device): column tiles as wide as an average segment rounded up to a power of two, 32 to 64
    (a tile costs a masked row reduction per segment it touches), at most R rounded up;
    as many rows as make a 2K-element tile, halved (down to 4) while that leaves fewer than
    target_programs programs, and never taller than the tensor rounded up to a power of two.
    (The launchers pass target_programs=1 under the interpreter, which runs programs one by one.)
    ptxas for sm_90, [16, 64] tiles, N = 8: 58-64 registers forward and 64-72 backward with
    16-byte aligned pointers, strides and R (what a launch specializes to: v4 loads and stores of
    the [T, R] tensors), 96 / 166-168 unaligned (kernels/compile_check.py compiles that worst case);
    N = 64 ([16, 32] tiles): 64 / 80 aligned, 96 / 127 unaligned; no spills anywhere."""
    block_n = max(2, triton.next_power_of_2(max(adapters, 1)))
    average = triton.cdiv(max(units, 1), max(adapters, 1))
    block_r = min(MAX_BLOCK_R, max(MIN_BLOCK_R, triton.next_power_of_2(average)))
    block_r = max(2, min(block_r, triton.next_power_of_2(max(units, 1))))
    block_t = TILE_ELEMENTS // block_r
    while block_t > MIN_BLOCK_T and triton.cdiv(rows, block_t) < target_programs:
        block_t //= 2
    block_t = max(1, min(block_t, triton.next_power_of_2(max(rows, 1))))
    return block_t, block_r, block_n, 4


def _check_inputs(t: torch.Tensor, a: torch.Tensor, bias: torch.Tensor, offsets: torch.Tensor, temperature: float,
                  mask: torch.Tensor | None, name_t: str = "t"):
    if t.dim() != 2 or a.shape != t.shape:
        raise ValueError(f"fusion_mix: {name_t} and a must be [T, R] of one shape, got {tuple(t.shape)} and "
                         f"{tuple(a.shape)}")
    if bias.dim() != 2 or bias.shape[0] != t.shape[0]:
        raise ValueError(f"fusion_mix: the [T, N] tensor must have T = {t.shape[0]} rows, got {tuple(bias.shape)}")
    adapters = bias.shape[1]
    if not 1 <= adapters <= MAX_ADAPTERS:
        raise ValueError(f"fusion_mix: 1 to {MAX_ADAPTERS} adapters supported, got N = {adapters}")
    if offsets.dim() != 1 or offsets.numel() != adapters + 1 or offsets.is_floating_point():
        raise ValueError(f"fusion_mix: segment offsets must be an int tensor [N + 1 = {adapters + 1}], got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    dtypes = {t.dtype, a.dtype, bias.dtype}
    if len(dtypes) != 1 or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fusion_mix: {name_t}, a and the [T, N] tensor must share one of float32/float16/bfloat16, "
                         f"got {t.dtype}, {a.dtype} and {bias.dtype}")
    for name, tensor in ((name_t, t), ("a", a), ("the [T, N] tensor", bias)):
        if tensor.shape[1] > 1 and tensor.stride(1) != 1:
            raise ValueError(f"fusion_mix: {name} needs a unit column stride, got strides {tensor.stride()}")
    if mask is not None and mask.shape != bias.shape:
        raise ValueError(f"fusion_mix: the dropout mask must be [T, N] = {tuple(bias.shape)}, got {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"fusion_mix: temperature must be > 0, got {temperature}")


def _small_arguments(offsets: torch.Tensor, mask: torch.Tensor | None, device):
    """(offsets as contiguous int32, mask as fp32 with unit column stride or a dummy, its row stride)."""
    offsets = offsets.to(device=device, dtype=torch.int32).contiguous()
    if mask is None:
        return offsets, torch.empty(1, dtype=torch.float32, device=device), 0
    mask = mask.to(device=device, dtype=torch.float32)
    if mask.shape[1] > 1 and mask.stride(1) != 1:
        mask = mask.contiguous()
    return offsets, mask, mask.stride(0)


def fusion_mix_forward(t: torch.Tensor, a: torch.Tensor, bias: torch.Tensor, offsets: torch.Tensor,
                       temperature: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, p): p = softmax((segment sums of t·a + bias) · mask / temperature) [T, N], w = a · p of
    each unit's segment [T, R], new contiguous tensors in the input dtype. t, a: [T, R]; bias [T, N];
    offsets: int [N + 1], 0 = offsets[0] ≤ … ≤ offsets[N] = R (not checked: that needs the values);
    mask: None or [T, N] (any float dtype, used as fp32)."""
    _check_inputs(t, a, bias, offsets, temperature, mask)
    rows, units = t.shape
    adapters = bias.shape[1]
    w = torch.empty((rows, units), dtype=t.dtype, device=t.device)
    p = torch.empty((rows, adapters), dtype=t.dtype, device=t.device)
    if rows == 0:
        return w, p
    offsets, mask_argument, stride_mask = _small_arguments(offsets, mask, t.device)
    block_t, block_r, block_n, num_warps = _block_sizes(rows, units, adapters, _target_programs())
    fusion_mix_fwd_kernel[(triton.cdiv(rows, block_t),)](
        t, a, bias, offsets, mask_argument, w, p, rows, units, adapters,
        t.stride(0), a.stride(0), bias.stride(0), stride_mask, w.stride(0), p.stride(0), 1.0 / float(temperature),
        HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    return w, p


def fusion_mix_backward(
    dw: torch.Tensor, dp: torch.Tensor, t: torch.Tensor, a: torch.Tensor, p: torch.Tensor, offsets: torch.Tensor,
    temperature: float, mask: torch.Tensor | None = None, need_t: bool = True, need_a: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(d t, d a, d bias) of fusion_mix_forward given dw [T, R] and dp [T, N] (either may be all
    zeros, neither None), the inputs t, a and the forward's p; d t / d a are None when not asked
    for. New contiguous tensors in dw's dtype; deterministic."""
    _check_inputs(dw, t, p, offsets, temperature, mask, name_t="dw")
    _check_inputs(t, a, dp, offsets, temperature, mask)
    rows, units = t.shape
    adapters = p.shape[1]
    device = t.device
    dt = torch.empty((rows, units), dtype=dw.dtype, device=device) if need_t else None
    da = torch.empty((rows, units), dtype=dw.dtype, device=device) if need_a else None
    dbias = torch.empty((rows, adapters), dtype=dw.dtype, device=device)
    if rows == 0:
        return dt, da, dbias
    offsets, mask_argument, stride_mask = _small_arguments(offsets, mask, device)
    block_t, block_r, block_n, num_warps = _block_sizes(rows, units, adapters, _target_programs())
    dummy = dbias  # any pointer for the outputs a constexpr switch leaves untouched
    fusion_mix_bwd_kernel[(triton.cdiv(rows, block_t),)](
        dw, dp, t, a, p, offsets, mask_argument, dt if need_t else dummy, da if need_a else dummy, dbias,
        rows, units, adapters,
        dw.stride(0), dp.stride(0), t.stride(0), a.stride(0), p.stride(0), stride_mask,
        dt.stride(0) if need_t else 0, da.stride(0) if need_a else 0, dbias.stride(0), 1.0 / float(temperature),
        HAS_MASK=mask is not None, NEED_T=need_t, NEED_A=need_a,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dt, da, dbias


# ------------------------------------------------------------------------ ahead-of-time compile list

DATA_POINTERS = frozenset({"t_ptr", "a_ptr", "bias_ptr", "w_ptr", "p_ptr", "dw_ptr", "dp_ptr", "dt_ptr", "da_ptr",
                           "dbias_ptr"})


def compile_variants(rows: int = 16384):
    """The launch configurations kernels/compile_check.py compiles for a GPU target: forward and
    backward (all gradients, with the dropout mask) in every dtype for N = 8 adapters of rank 64
    (R = 512), and bf16 for N = 64 adapters of rank 8 (the widest score tile) and N = 2 of rank 256.
    Yields (name, kernel, dtype, constexprs, data_pointers, num_warps, num_stages, launch values): the
    integer arguments of a launch on contiguous [T, R] and [T, N] tensors (T left out: any token count)."""
    shapes = [(8, 512, ("bfloat16", "float16", "float32")), (64, 512, ("bfloat16",)), (2, 512, ("bfloat16",))]
    for adapters, units, dtypes in shapes:
        block_t, block_r, block_n, warps = _block_sizes(rows, units, adapters)
        tile = f"n{adapters}-{block_t}x{block_r}x{block_n}"
        wide = dict.fromkeys(("stride_t", "stride_a", "stride_w", "stride_dw", "stride_dt", "stride_da"), units)
        narrow = dict.fromkeys(("stride_bias", "stride_mask", "stride_p", "stride_dp", "stride_dbias"), adapters)
        values = dict(R=units, N=adapters, **wide, **narrow)  # compile_check takes the names each kernel has
        for dtype in dtypes:
            yield (f"fwd-{dtype}-{tile}", fusion_mix_fwd_kernel, dtype,
                   dict(HAS_MASK=True, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n), DATA_POINTERS, warps, 1,
                   values)
            yield (f"bwd-{dtype}-{tile}", fusion_mix_bwd_kernel, dtype,
                   dict(HAS_MASK=True, NEED_T=True, NEED_A=True, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n),
                   DATA_POINTERS, warps, 1, values)
