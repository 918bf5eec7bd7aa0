"""Fused gated blend: out = g * a + (1 - g) * b with g = sigmoid(alpha / T), forward and backward.

Side-tuning's learnable alpha blend of a frozen base and a side network (T = 1, no gradient for
the base) and ladder side-tuning's gate (T = 0.1, gradients for both inputs). alpha is one
float32 value (scalar gate) or one per column (per-channel gate); a and b are [R, C] in fp32,
fp16 or bf16 with unit column stride and any row stride. Everything is computed in fp32.

Both kernels tile [R, C] as [BLOCK_R, BLOCK_C] programs on a 2-D grid (row blocks x column
blocks), so a per-channel alpha is loaded and put through the sigmoid once per program. The
backward reads dy (and a, b only when dalpha is asked for), writes da = g * dy and db = (1 - g) * dy
when asked, and reduces dalpha = sum dy * (a - b) * g * (1 - g) / T without atomics: each program
walks ROWS_PER_PROGRAM rows, keeps an fp32 [BLOCK_R, BLOCK_C] accumulator of dy * (a - b), and
writes its column sums (per-channel: a [row_programs, C] buffer) or its total (scalar: a
[row_programs, col_blocks] buffer), scaled by g(1 - g)/T; the launcher sums the buffer with
torch. The buffer's size depends only on the shape, so results are bit-identical run to run.

Memory floor (the op is memory-bound; one pass = R * C * element size): the forward reads a, b
and writes out, 3 passes; the backward reads dy, a, b and writes da, db, up to 5 passes (4 for
side-tuning, which has no da; 3 without dalpha, which needs neither a nor b). For [16384, 4096]
bf16 one pass is 134 MB: forward >= 94 us, backward >= 156 us (side-tuning 125 us) at 4.3 TB/s
(H200). The partial-sum buffer adds at most 2048 * BLOCK_C fp32 values (<= 2 MB), written and
read once.

References: Triton tutorials 02 (fused softmax: row-blocked elementwise kernels) and 05 (layer
norm: per-program partial sums of the weight gradient reduced in a second step); Liger-Kernel's
elementwise kernels; Zhang et al., ECCV 2019 (side-tuning); Sung et al., NeurIPS 2022 (LST).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autotuning, limit_configs

# Elements per [BLOCK_R, BLOCK_C] tile of the heuristic config, and its widest column block.
TILE_ELEMENTS = 2048
MAX_BLOCK_C = 256
# The backward launches about this many programs at most (row programs x column blocks): enough
# to fill an H200 several times over, few enough that the dalpha partial buffer stays small.
TARGET_PROGRAMS = 2048


@triton.jit
def _gate(alpha_ptr, cols, col_mask, scale_value, PER_CHANNEL: tl.constexpr):
    """g = sigmoid(alpha * scale_value) in fp32: [BLOCK_C] per channel, a scalar otherwise."""
    if PER_CHANNEL:
        alpha = tl.load(alpha_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        alpha = tl.load(alpha_ptr).to(tl.float32)
    return tl.sigmoid(alpha * scale_value)


@triton.jit
def gated_blend_fwd_kernel(
    a_ptr,  # [R, C], unit column stride
    b_ptr,  # [R, C], unit column stride, a's dtype
    alpha_ptr,  # [C] (per channel) or [1], float32
    out_ptr,  # [R, C], unit column stride, a's dtype
    R, C,
    stride_a, stride_b, stride_out,
    scale_value,  # 1 / temperature
    PER_CHANNEL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < R
    col_mask = cols < C
    rows64 = rows.to(tl.int64)
    tile_mask = row_mask[:, None] & col_mask[None, :]

    g = _gate(alpha_ptr, cols, col_mask, scale_value, PER_CHANNEL)
    if PER_CHANNEL:
        g = g[None, :]
    a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows64[:, None] * stride_b + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    out = g * a + (1.0 - g) * b
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def gated_blend_bwd_kernel(
    grad_ptr,  # [R, C], unit column stride: upstream gradient dy
    a_ptr,  # [R, C], unit column stride, grad's dtype; read only for dalpha
    b_ptr,  # [R, C], unit column stride, grad's dtype; read only for dalpha
    alpha_ptr,  # [C] (per channel) or [1], float32
    da_ptr,  # [R, C] out, unit column stride, grad's dtype: g * dy
    db_ptr,  # [R, C] out, unit column stride, grad's dtype: (1 - g) * dy
    dalpha_part_ptr,  # out float32: [row_programs, C] per channel, [row_programs, col_blocks] scalar
    R, C, ROWS_PER_PROGRAM,
    stride_grad, stride_a, stride_b, stride_da, stride_db,
    scale_value,  # 1 / temperature
    PER_CHANNEL: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, NEED_ALPHA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    row_start = pid_r * ROWS_PER_PROGRAM

    g = _gate(alpha_ptr, cols, col_mask, scale_value, PER_CHANNEL)
    if PER_CHANNEL:
        g_tile = g[None, :]
    else:
        g_tile = g
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)  # dy * (a - b), summed over this program's rows
    for r in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        rows = row_start + r + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)
        tile_mask = (rows < R)[:, None] & col_mask[None, :]
        dy = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :], mask=tile_mask, other=0.0)
        dy = dy.to(tl.float32)
        if NEED_A:
            tl.store(da_ptr + rows64[:, None] * stride_da + cols[None, :],
                     (g_tile * dy).to(da_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_B:
            tl.store(db_ptr + rows64[:, None] * stride_db + cols[None, :],
                     ((1.0 - g_tile) * dy).to(db_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_ALPHA:
            a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=tile_mask, other=0.0)
            b = tl.load(b_ptr + rows64[:, None] * stride_b + cols[None, :], mask=tile_mask, other=0.0)
            acc += dy * (a.to(tl.float32) - b.to(tl.float32))

    if NEED_ALPHA:
        dgate = g * (1.0 - g) * scale_value  # d sigmoid(alpha / T) / d alpha
        if PER_CHANNEL:
            partial = tl.sum(acc, axis=0) * dgate
            tl.store(dalpha_part_ptr + pid_r.to(tl.int64) * C + cols, partial, mask=col_mask)
        else:
            partial = tl.sum(tl.sum(acc, axis=1), axis=0) * dgate
            tl.store(dalpha_part_ptr + pid_r.to(tl.int64) * tl.num_programs(1) + pid_c, partial)


# ----------------------------------------------------------------------------------- autotuning
# On a GPU the forward tunes its tile (the grid follows the config) and the backward its warps
# only: its tile fixes the partial-sum buffer, so it stays the heuristic one. Under the
# interpreter the heuristic config runs alone. Keys: C, the gate mode and the gradient switches;
# the autotuner adds the tensors' dtypes itself.

_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_R": tile // block_c, "BLOCK_C": block_c}, num_warps=warps)
    for block_c in (128, 256, 512)
    for tile, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))
]


def _prune_forward_configs(configs, named_args, **kwargs):
    width = triton.next_power_of_2(named_args["C"])
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= width]
    block_r, block_c, num_warps = _block_sizes(named_args["R"], named_args["C"])
    if kept:
        return limit_configs(kept, {"BLOCK_R": block_r, "BLOCK_C": block_c}, num_warps)
    return [triton.Config({"BLOCK_R": block_r, "BLOCK_C": block_c}, num_warps=num_warps)]


gated_blend_fwd_tuned = triton.autotune(
    configs=_FORWARD_CONFIGS, key=["C", "PER_CHANNEL"],
    prune_configs_by={"early_config_prune": _prune_forward_configs},
)(gated_blend_fwd_kernel)

# num_stages changes nothing here (no loads are pipelined: ptxas output is identical for 1-3)
_BACKWARD_CONFIGS = [triton.Config({}, num_warps=warps, num_stages=1) for warps in (4, 8)]
gated_blend_bwd_tuned = triton.autotune(
    configs=_BACKWARD_CONFIGS, key=["C", "PER_CHANNEL", "NEED_A", "NEED_B", "NEED_ALPHA"],
)(gated_blend_bwd_kernel)


# ----------------------------------------------------------------------------------- launchers


def _block_sizes(rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) heuristics: up to 256 columns wide, as many rows as make a
    2K-element tile (16 elements a thread and tensor at 4 warps), neither wider nor taller than the
    tensor rounded to a power of two. ptxas for sm_90, [8, 256] tiles: 32-44 registers forward and
    64-88 backward with 16-byte aligned pointers and strides (what a launch on a GPU specializes
    to; v4 loads), 56-66 / 89-101 unaligned (kernels/compile_check.py compiles that worst case).
    4K-element tiles at 4 warps need 104-112 / 192-254 unaligned (fp16 per-channel forward spilled
    56 bytes), 38-70 / 104-144 aligned: fewer resident programs for a memory-bound kernel."""
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(max(cols, 1)))
    block_r = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c, 4


def _backward_grid(rows: int, cols: int, block_r: int, block_c: int) -> tuple[int, int, int]:
    """(row_programs, col_blocks, ROWS_PER_PROGRAM): each program walks whole BLOCK_R tiles, the
    number of programs stays near TARGET_PROGRAMS. Depends on the shape only (determinism)."""
    row_tiles = triton.cdiv(rows, block_r)
    col_blocks = triton.cdiv(cols, block_c)
    row_programs = min(row_tiles, max(1, triton.cdiv(TARGET_PROGRAMS, col_blocks)))
    tiles_per_program = triton.cdiv(row_tiles, row_programs)
    return triton.cdiv(row_tiles, tiles_per_program), col_blocks, tiles_per_program * block_r


def _check_inputs(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, temperature: float, name_a="a"):
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"gated_blend: {name_a} and b must be [R, C] of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"gated_blend: {name_a} and b must share one of float32/float16/bfloat16, got "
                         f"{a.dtype} and {b.dtype}")
    cols = a.shape[1]
    for name, tensor in ((name_a, a), ("b", b)):
        if cols > 1 and tensor.stride(1) != 1:
            raise ValueError(f"gated_blend: {name} needs a unit column stride, got strides {tensor.stride()}")
    if alpha.numel() not in (1, cols):
        raise ValueError(f"gated_blend: alpha must have 1 or C = {cols} elements, got {alpha.numel()}")
    if not temperature > 0:
        raise ValueError(f"gated_blend: temperature must be > 0, got {temperature}")


def _alpha_argument(alpha: torch.Tensor, cols: int) -> tuple[bool, torch.Tensor]:
    """(per channel, alpha as a contiguous float32 vector). With C = 1 both modes are one value."""
    flat = alpha.detach().to(torch.float32).contiguous().reshape(-1)
    return flat.numel() == cols and cols != 1, flat


def gated_blend_forward(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, temperature: float) -> torch.Tensor:
    """out = g * a + (1 - g) * b, g = sigmoid(alpha / temperature) broadcast over rows (per column
    when alpha has C elements). a, b: [R, C], same dtype, unit column stride, any row stride;
    alpha: float32 with 1 or C elements. Returns a new contiguous [R, C] tensor in a's dtype."""
    _check_inputs(a, b, alpha, temperature)
    rows, cols = a.shape
    out = torch.empty((rows, cols), dtype=a.dtype, device=a.device)
    if rows == 0 or cols == 0:
        return out
    per_channel, alpha = _alpha_argument(alpha, cols)
    arguments = (a, b, alpha, out, rows, cols, a.stride(0), b.stride(0), out.stride(0), 1.0 / float(temperature))
    if not autotuning():
        block_r, block_c, num_warps = _block_sizes(rows, cols)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        gated_blend_fwd_kernel[grid](*arguments, PER_CHANNEL=per_channel, BLOCK_R=block_r, BLOCK_C=block_c,
                                     num_warps=num_warps)
    else:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))  # noqa: E731
        gated_blend_fwd_tuned[grid](*arguments, PER_CHANNEL=per_channel)
    return out


def gated_blend_backward(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, temperature: float,
    need_a: bool = True, need_b: bool = True, need_alpha: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over grad (and a, b when need_alpha) giving (da, db, dalpha), each None when not
    asked for: da = g * grad and db = (1 - g) * grad as new contiguous [R, C] tensors in grad's
    dtype; dalpha = sum of grad * (a - b) * g * (1 - g) / temperature over the broadcast dims, fp32,
    alpha's shape, deterministic (per-program partial sums, then one torch sum). grad, a, b: [R, C],
    one dtype, unit column stride, any row stride."""
    _check_inputs(grad, b, alpha, temperature, name_a="grad")
    _check_inputs(a, b, alpha, temperature)
    rows, cols = grad.shape
    device = grad.device
    da = torch.empty((rows, cols), dtype=grad.dtype, device=device) if need_a else None
    db = torch.empty((rows, cols), dtype=grad.dtype, device=device) if need_b else None
    if rows == 0 or cols == 0:
        dalpha = torch.zeros(alpha.shape, dtype=torch.float32, device=device) if need_alpha else None
        return da, db, dalpha
    if not (need_a or need_b or need_alpha):
        return None, None, None
    per_channel, alpha_flat = _alpha_argument(alpha, cols)
    block_r, block_c, num_warps = _block_sizes(rows, cols)
    row_programs, col_blocks, rows_per_program = _backward_grid(rows, cols, block_r, block_c)
    partials = None
    if need_alpha:
        partials = torch.empty((row_programs, cols if per_channel else col_blocks), dtype=torch.float32,
                               device=device)
    dummy = alpha_flat  # any pointer for arguments a constexpr switch leaves untouched
    arguments = (
        grad, a, b, alpha_flat,
        da if need_a else dummy, db if need_b else dummy, partials if need_alpha else dummy,
        rows, cols, rows_per_program,
        grad.stride(0), a.stride(0), b.stride(0), da.stride(0) if need_a else 0, db.stride(0) if need_b else 0,
        1.0 / float(temperature),
    )
    options = dict(PER_CHANNEL=per_channel, NEED_A=need_a, NEED_B=need_b, NEED_ALPHA=need_alpha,
                   BLOCK_R=block_r, BLOCK_C=block_c)
    grid = (row_programs, col_blocks)
    if not autotuning():
        gated_blend_bwd_kernel[grid](*arguments, **options, num_warps=num_warps)
    else:
        gated_blend_bwd_tuned[grid](*arguments, **options)
    dalpha = partials.sum().reshape(alpha.shape) if need_alpha and not per_channel else None
    if need_alpha and per_channel:
        dalpha = partials.sum(0).reshape(alpha.shape)
    return da, db, dalpha


# ------------------------------------------------------------------------ ahead-of-time compile list

DATA_POINTERS = frozenset({"a_ptr", "b_ptr", "out_ptr", "grad_ptr", "da_ptr", "db_ptr"})


def compile_variants(rows: int = 16384, cols: int = 4096):
    """The launch configurations kernels/compile_check.py compiles for a GPU target: forward and
    backward (every gradient asked for, and side-tuning's set without da) in every dtype, scalar
    and per-channel gate, at the heuristic tile for [rows, cols]; and the narrower tile of a
    100-column tensor in bf16. Yields (name, kernel, dtype, constexprs, data_pointers, num_warps,
    num_stages, launch values): the integer arguments of a launch on contiguous [rows, cols] tensors
    (R left out: any row count; ROWS_PER_PROGRAM as the heuristic grid sets it)."""
    shapes = [(rows, cols, ("bfloat16", "float16", "float32")), (4096, 100, ("bfloat16",))]
    for shape_rows, shape_cols, dtypes in shapes:
        block_r, block_c, warps = _block_sizes(shape_rows, shape_cols)
        tile = f"{block_r}x{block_c}"
        forward_values = dict(C=shape_cols, stride_a=shape_cols, stride_b=shape_cols, stride_out=shape_cols)
        rows_per_program = _backward_grid(shape_rows, shape_cols, block_r, block_c)[2]
        for dtype in dtypes:
            for per_channel in (False, True):
                gate = "channel" if per_channel else "scalar"
                yield (f"fwd-{dtype}-{gate}-{tile}", gated_blend_fwd_kernel, dtype,
                       dict(PER_CHANNEL=per_channel, BLOCK_R=block_r, BLOCK_C=block_c), DATA_POINTERS, warps, 1,
                       forward_values)
                for need_a, grads in ((True, "all"), (False, "side")):
                    yield (f"bwd-{dtype}-{gate}-{grads}-{tile}", gated_blend_bwd_kernel, dtype,
                           dict(PER_CHANNEL=per_channel, NEED_A=need_a, NEED_B=True, NEED_ALPHA=True,
                                BLOCK_R=block_r, BLOCK_C=block_c), DATA_POINTERS, warps, 1,
                           dict(C=shape_cols, ROWS_PER_PROGRAM=rows_per_program, stride_grad=shape_cols,
                                stride_a=shape_cols, stride_b=shape_cols, stride_da=shape_cols if need_a else 0,
                                stride_db=shape_cols))
