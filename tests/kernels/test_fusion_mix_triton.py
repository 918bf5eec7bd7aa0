"""Triton tier: the fusion_mix kernels (kernels/fusion_mix.py) under TRITON_INTERPRET=1 on CPU (on a
GPU machine the same tests run on the device), against a float64 loop over adapters of

    scores = Σ_segment t·a + bias;  p = softmax(scores · mask / T);  w = a · p[segment]

the outputs and every gradient (d t, d a, d bias, with nonzero gradients for both w and p), odd
row counts, unequal segments (size 1 and empty included), tiles that span several segments, row
strides, gradient masks, determinism, and the public op with backend="triton"."""

import pytest
import torch

from pefops.kernels import fusion_mix as kernels
from pefops.ops.fusion_mix import fusion_mix
from tests.tolerances import assert_close

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def offsets_of(sizes):
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return torch.tensor(offsets, device=DEVICE)


def naive(t, a, bias, offsets, temperature, mask=None):
    """float64, one adapter at a time: (w, p)."""
    t, a, bias = t.double(), a.double(), bias.double()
    bounds = offsets.tolist()
    scores = torch.stack([(t[:, bounds[i]:bounds[i + 1]] * a[:, bounds[i]:bounds[i + 1]]).sum(-1) + bias[:, i]
                          for i in range(len(bounds) - 1)], dim=-1)
    if mask is not None:
        scores = scores * mask.double()
    p = torch.softmax(scores / temperature, dim=-1)
    w = torch.cat([a[:, bounds[i]:bounds[i + 1]] * p[:, i:i + 1] for i in range(len(bounds) - 1)], dim=-1)
    return w, p


def make(rows, sizes, dtype=torch.float32, mask=True, seed=0, pad=0):
    """t, a, bias (views with row stride width + pad), dropout mask, dw, dp; all on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    units, adapters = sum(sizes), len(sizes)

    def tensor(width, scale=1.0):
        full = torch.randn(rows, width + pad, generator=generator) * scale
        return full[:, :width].to(dtype).to(DEVICE)

    t, a, bias = tensor(units, 0.5), tensor(units), tensor(adapters)
    dropout = None
    if mask:
        dropout = ((torch.rand(rows, adapters, generator=generator) > 0.25).float() / 0.75).to(DEVICE)
    dw, dp = tensor(units), tensor(adapters)
    return t, a, bias, dropout, dw, dp


def expected(t, a, bias, offsets, temperature, dropout, dw, dp):
    """(w, p, d t, d a, d bias) in float64, from the inputs as rounded to their dtype."""
    leaves = [x.double().cpu().requires_grad_() for x in (t, a, bias)]
    w, p = naive(*leaves, offsets.cpu(), temperature, None if dropout is None else dropout.cpu())
    grads = torch.autograd.grad((w, p), leaves, (dw.double().cpu(), dp.double().cpu()))
    return (w.detach(), p.detach(), *grads)


def check(rows, sizes, dtype=torch.float32, mask=True, temperature=0.7, seed=0, pad=0):
    t, a, bias, dropout, dw, dp = make(rows, sizes, dtype, mask, seed, pad)
    offsets = offsets_of(sizes)
    w_ref, p_ref, dt_ref, da_ref, db_ref = expected(t, a, bias, offsets, temperature, dropout, dw, dp)
    w, p = kernels.fusion_mix_forward(t, a, bias, offsets, temperature, dropout)
    assert w.dtype == p.dtype == dtype and w.is_contiguous() and p.is_contiguous()
    assert_close(w.cpu(), w_ref, dtype, "w")
    assert_close(p.cpu(), p_ref, dtype, "p")
    dt, da, dbias = kernels.fusion_mix_backward(dw, dp, t, a, p, offsets, temperature, dropout)
    assert dt.dtype == da.dtype == dbias.dtype == dtype
    assert_close(dt.cpu(), dt_ref, dtype, "dt")
    assert_close(da.cpu(), da_ref, dtype, "da")
    assert_close(dbias.cpu(), db_ref, dtype, "dbias")


SIZES = {
    "n1": [5], "n1-unit": [1],
    "n2": [1, 16], "n2-wide": [33, 70],
    "n3": [3, 1, 5], "n3-empty": [0, 4, 2],
    "n8": [1, 7, 16, 3, 40, 1, 9, 30],
}


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("rows", [1, 7, 33, 123])
def test_shapes_fp32(rows, sizes):
    check(rows, sizes, mask=rows % 2 == 1, seed=rows + len(sizes))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", [[3, 1, 5], [1, 7, 16, 3, 40, 1, 9, 30]], ids=["n3", "n8"])
def test_dtypes(dtype, sizes):
    check(33, sizes, dtype, temperature=0.5, seed=len(sizes))


def test_many_segments_per_tile_and_many_tiles_per_segment():
    # 24 adapters of rank 1-3 (a 32-unit tile holds a dozen segments) and 2 adapters of 150 and 97
    # units (several tiles each, neither starting on a tile boundary)
    check(9, [1, 2, 3] * 8, seed=1)
    check(9, [150, 97], seed=2)


def test_gpu_row_blocks(monkeypatch):
    # the launch a GPU makes for these shapes: 4-row programs (the interpreter otherwise runs tall ones)
    monkeypatch.setattr(kernels, "_target_programs", lambda: kernels.TARGET_PROGRAMS)
    check(123, [1, 7, 16, 3, 40, 1, 9, 30], seed=8)
    check(7, [3, 1, 5], torch.bfloat16, seed=9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_strides(dtype):
    check(17, [3, 1, 12], dtype, pad=5, seed=3)


@pytest.mark.parametrize("need_t", [False, True])
@pytest.mark.parametrize("need_a", [False, True])
def test_gradient_masks(need_t, need_a):
    t, a, bias, dropout, dw, dp = make(13, [2, 5, 1], seed=4)
    offsets = offsets_of([2, 5, 1])
    _, _, dt_ref, da_ref, db_ref = expected(t, a, bias, offsets, 1.0, dropout, dw, dp)
    _, p = kernels.fusion_mix_forward(t, a, bias, offsets, 1.0, dropout)
    dt, da, dbias = kernels.fusion_mix_backward(dw, dp, t, a, p, offsets, 1.0, dropout, need_t, need_a)
    assert (dt is None) != need_t and (da is None) != need_a
    if need_t:
        assert_close(dt.cpu(), dt_ref, torch.float32, "dt")
    if need_a:
        assert_close(da.cpu(), da_ref, torch.float32, "da")
    assert_close(dbias.cpu(), db_ref, torch.float32, "dbias")


def test_determinism():
    t, a, bias, dropout, dw, dp = make(40, [7, 3, 9], torch.bfloat16, seed=5)
    offsets = offsets_of([7, 3, 9])
    first = kernels.fusion_mix_forward(t, a, bias, offsets, 0.7, dropout)
    second = kernels.fusion_mix_forward(t, a, bias, offsets, 0.7, dropout)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    grads = [kernels.fusion_mix_backward(dw, dp, t, a, first[1], offsets, 0.7, dropout) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_empty_rows_and_block_sizes():
    t, a, bias, _, dw, dp = make(0, [2, 3], mask=False)
    w, p = kernels.fusion_mix_forward(t, a, bias, offsets_of([2, 3]), 1.0)
    assert w.shape == (0, 5) and p.shape == (0, 2)
    dt, da, dbias = kernels.fusion_mix_backward(dw, dp, t, a, p, offsets_of([2, 3]), 1.0)
    assert dt.shape == da.shape == (0, 5) and dbias.shape == (0, 2)
    # shape-only heuristics: 16-row tiles at 16K rows (1024 programs), at least 4 rows, power-of-two
    # tiles no taller or wider than the tensor; one tall tile per program under the interpreter
    assert kernels._block_sizes(16384, 512, 8) == (16, 64, 8, 4)
    assert kernels._block_sizes(16384, 512, 64) == (16, 32, 64, 4)
    assert kernels._block_sizes(123, 512, 8) == (4, 64, 8, 4)
    assert kernels._block_sizes(5, 3, 1) == (4, 4, 2, 4)
    assert kernels._block_sizes(123, 512, 8, target_programs=1) == (32, 64, 8, 4)


def test_invalid_inputs():
    t = torch.randn(4, 6, device=DEVICE)
    bias = torch.randn(4, 2, device=DEVICE)
    offsets = offsets_of([2, 4])
    with pytest.raises(ValueError, match="one shape"):
        kernels.fusion_mix_forward(t, torch.randn(4, 5, device=DEVICE), bias, offsets, 1.0)
    with pytest.raises(ValueError, match="T = 4 rows"):
        kernels.fusion_mix_forward(t, t, torch.randn(3, 2, device=DEVICE), offsets, 1.0)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        kernels.fusion_mix_forward(t, t.half(), bias, offsets, 1.0)
    with pytest.raises(ValueError, match=r"N \+ 1 = 3"):
        kernels.fusion_mix_forward(t, t, bias, offsets_of([6]), 1.0)
    with pytest.raises(ValueError, match="at most|1 to 64"):
        kernels.fusion_mix_forward(torch.randn(4, 65, device=DEVICE), torch.randn(4, 65, device=DEVICE),
                                   torch.randn(4, 65, device=DEVICE), offsets_of([1] * 65), 1.0)
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.fusion_mix_forward(torch.randn(6, 4, device=DEVICE).t(), t, bias, offsets, 1.0)
    with pytest.raises(ValueError, match="dropout mask"):
        kernels.fusion_mix_forward(t, t, bias, offsets, 1.0, torch.ones(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        kernels.fusion_mix_forward(t, t, bias, offsets, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_op_through_triton(dtype):
    # pefops.ops.fusion_mix with backend="triton": custom ops, autograd, launchers, leading dims
    sizes = [4, 1, 11]
    generator = torch.Generator().manual_seed(7)
    shape = (2, 9)

    def leaf(*last, scale=1.0):
        return (torch.randn(*shape, *last, generator=generator) * scale).to(dtype).to(DEVICE).requires_grad_()

    t, a, bias = leaf(16, scale=0.5), leaf(16), leaf(3)
    mask = ((torch.rand(*shape, 3, generator=generator) > 0.3).float() / 0.7).to(DEVICE)
    offsets = offsets_of(sizes).cpu()
    w, p = fusion_mix(t, a, bias, offsets, 0.7, mask, backend="triton")
    assert w.shape == a.shape and p.shape == bias.shape and w.dtype == p.dtype == dtype
    dw, dp = torch.randn_like(w), torch.randn_like(p)
    got = torch.autograd.grad((w, p), (t, a, bias), (dw, dp))
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    w_ref, p_ref, *want = expected(flat(t.detach()), flat(a.detach()), flat(bias.detach()), offsets, 0.7, flat(mask),
                                   flat(dw), flat(dp))
    assert_close(flat(w).cpu(), w_ref, dtype, "w")
    assert_close(flat(p).cpu(), p_ref, dtype, "p")
    for name, g, r in zip(("dt", "da", "dbias"), got, want):
        assert g.dtype == dtype
        assert_close(flat(g).cpu(), r, dtype, name)
