"""gpu tier: csrc multi_adapter_decode_forward (mixed-task batches at decode shapes) against a naive
float64 per-row loop, plus the public op on CUDA (auto selection: the decode kernel forward, the
Triton backward). Skipped without a CUDA device; the reference is local on purpose.
"""

import math

import pytest

torch = pytest.importorskip("torch")

from tests.csrc.helpers import (DTYPES, EPS, GPU_TIER, SLOPE, TOL_F32_RESULTS, act_ref,  # noqa: E402
                                eager_then_graph, layer_norm_params, misaligned_copy)
from tests.tolerances import TOLERANCE  # noqa: E402

pytestmark = GPU_TIER


def reference(x, index, wd, bd, wu, bu, scaling, residual, ln_w, ln_b, eps, code, slope):
    """A loop over rows in float64; rows with an out-of-range index are NaN. (out, z, mean, rstd)."""
    d = torch.float64
    n = wd.shape[0]
    outs, zs, ys = [], [], []
    for t, i in enumerate(index.tolist()):
        if not 0 <= i < n:
            nan = torch.full((x.shape[1],), float("nan"), dtype=d, device=x.device)
            outs.append(nan), zs.append(torch.full((wd.shape[1],), float("nan"), dtype=d, device=x.device)), ys.append(nan)
            continue
        z = wd[i].to(d) @ x[t].to(d) + (bd[i].to(d) if bd.numel() else 0)
        u = wu[i].to(d) @ act_ref(z, code, slope) + (bu[i].to(d) if bu.numel() else 0)
        y = residual[t].to(d) + scaling[i].to(d) * u
        zs.append(z), ys.append(y)
        if ln_w.numel():
            y = torch.nn.functional.layer_norm(y, y.shape, ln_w.to(d), ln_b.to(d) if ln_b.numel() else None, eps)
        outs.append(y)
    y = torch.stack(ys)
    mean = y.mean(-1)
    rstd = 1.0 / torch.sqrt(y.var(-1, unbiased=False) + eps)
    return torch.stack(outs), torch.stack(zs), mean, rstd


def make_inputs(T, H, r, N, dtype, ln, seed=0, separate_residual=True, index=None):
    g = torch.Generator(device="cuda").manual_seed(seed * 7919 + T * 131 + H * 17 + r * 3 + N)
    kw = dict(device="cuda", generator=g)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, **kw) * scale).to(dtype)

    x = randn(T, H)
    if index is None:
        index = torch.randint(0, N, (T,), **kw)
    wd = randn(N, r, H, scale=1.0 / math.sqrt(H))
    bd = randn(N, r, scale=0.1)
    wu = randn(N, H, r, scale=1.0 / math.sqrt(r))
    bu = randn(N, H, scale=0.1)
    scaling = torch.rand(N, H, **kw) + 0.5  # float32 [N, H]
    residual = randn(T, H) if separate_residual else x
    ln_w, ln_b = layer_norm_params(H, dtype, g, ln)
    return x, index, wd, bd, wu, bu, scaling, residual, ln_w, ln_b


def check(ext, args, code, dtype):
    x, index, wd, bd, wu, bu, scaling, residual, ln_w, ln_b = args
    out, z, mean, rstd = ext.multi_adapter_decode_forward(*args, EPS, code, SLOPE)
    torch.cuda.synchronize()
    T, H = x.shape
    ref_out, ref_z, ref_mean, ref_rstd = reference(*args, EPS, code, SLOPE)
    assert out.dtype == dtype and out.shape == (T, H) and out.is_contiguous()
    assert z.dtype == torch.float32 and z.shape == (T, wd.shape[1])
    torch.testing.assert_close(z.double(), ref_z, rtol=TOL_F32_RESULTS, atol=TOL_F32_RESULTS, equal_nan=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], equal_nan=True)
    if ln_w.numel():
        assert mean.shape == (T,) and rstd.shape == (T,)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=TOL_F32_RESULTS, atol=TOL_F32_RESULTS, equal_nan=True)
        torch.testing.assert_close(rstd.double(), ref_rstd, rtol=TOL_F32_RESULTS, atol=TOL_F32_RESULTS, equal_nan=True)
    else:
        assert mean.numel() == 0 and rstd.numel() == 0


SHAPES = [(T, H, r, N) for T in (1, 3, 16) for H in (768, 1023, 4096) for r in (1, 16, 64, 1024) for N in (1, 5)]


@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,H,r,N", SHAPES)
def test_matches_reference(ext, T, H, r, N, dtype, ln):
    code = (SHAPES.index((T, H, r, N)) + 3 * ln) % 7  # every activation over the grid
    check(ext, make_inputs(T, H, r, N, dtype, ln), code, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,H,r,N", [(2, 1, 1, 3), (5, 7, 3, 2), (7, 33, 7, 9), (9, 123, 33, 4), (12, 256, 1000, 3),
                                     (16, 5120, 8, 16), (4, 12288, 256, 2), (1, 100, 1024, 1)])
def test_odd_shapes(ext, T, H, r, N, dtype):
    check(ext, make_inputs(T, H, r, N, dtype, ln=True, seed=2), 2, dtype)
    check(ext, make_inputs(T, H, r, N, dtype, ln=False, seed=3), 4, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_out_of_range_rows_are_nan(ext, dtype):
    index = torch.tensor([0, -1, 3, 2, 7, 1], device="cuda")
    for ln in (False, True):
        check(ext, make_inputs(6, 1024, 64, 3, dtype, ln, seed=4, index=index), 2, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_residual_is_x_and_no_biases(ext, dtype):
    x, index, wd, bd, wu, bu, scaling, _, ln_w, ln_b = make_inputs(4, 1024, 64, 3, dtype, ln=True, seed=5)
    check(ext, (x, index, wd, bd, wu, bu, scaling, x, ln_w, ln_b), 1, dtype)
    none = torch.empty(0, device="cuda", dtype=dtype)
    check(ext, (x, index, wd, none, wu, none, scaling, x, ln_w, none), 5, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_misaligned_pointers_use_the_scalar_path(ext, dtype):
    args = list(make_inputs(3, 1024, 64, 3, dtype, ln=False, seed=6))
    for i in (0, 2, 4):  # x, down_weight, up_weight
        args[i] = misaligned_copy(args[i])
    check(ext, tuple(args), 3, dtype)


# Edge cases of the index math on the real kernels (H100 / H200: 132 SMs): the down kernel's slices
# (S, KS from the host's plan) and the up kernel's lane groups (G = 4 .. 32) must cover every weight
# element exactly once and never read past a row, in the vector (16-bit: VEC 8, fp32: VEC 4) and
# scalar (VEC 1: odd sizes or misaligned) paths.
INDEX_CASES = [
    # (T, H, r, N, dtype, misaligned)
    (1, 4096, 64, 3, torch.bfloat16, False),    # one row: H split into slices, G = 8
    (16, 4096, 1024, 2, torch.float16, False),  # rank limit, 16 rows, G = 32
    (3, 1023, 7, 4, torch.bfloat16, False),     # odd H and r: scalar both ways
    (5, 7, 3, 2, torch.float16, False),         # H below one vector
    (2, 12288, 256, 2, torch.bfloat16, False),  # wide H: many slices, finalize kernel
    (1, 100, 1024, 1, torch.float32, False),    # fp32 VEC 4, H below one slice quantum, r = 1024
    (9, 256, 33, 3, torch.float32, False),      # fp32 odd r: scalar up, G = 32
    (4, 768, 16, 5, torch.bfloat16, False),     # G = 4 (r / VEC = 2)
    (2, 64, 1, 2, torch.float32, False),        # r = 1
    (7, 4096, 64, 3, torch.bfloat16, True),     # misaligned: scalar paths at a real size
]


@pytest.mark.parametrize("T,H,r,N,dtype,misaligned", INDEX_CASES)
def test_index_edge_cases(ext, T, H, r, N, dtype, misaligned):
    for ln, code in ((False, 5), (True, 2)):
        args = list(make_inputs(T, H, r, N, dtype, ln, seed=8))
        if misaligned:
            for i in (0, 2, 4):  # x, down_weight, up_weight
                args[i] = misaligned_copy(args[i])
        check(ext, tuple(args), code, dtype)


def test_cuda_graph_capture_and_determinism(ext):
    args = make_inputs(8, 4096, 64, 4, torch.float16, ln=True, seed=7)
    first, (out, *_) = eager_then_graph(lambda: ext.multi_adapter_decode_forward(*args, EPS, 4, SLOPE))
    assert torch.equal(out, first[0])
    torch.testing.assert_close(out.double(), reference(*args, EPS, 4, SLOPE)[0], rtol=4e-3, atol=4e-3)


def test_errors_on_cuda(ext):
    # adapter_index and device mismatches are checked after the devices, so they need CUDA tensors
    # (the other messages run on CPU tensors in test_host_checks.py)
    args = list(make_inputs(2, 256, 8, 3, torch.float16, ln=False))
    bad = list(args)
    bad[1] = bad[1].int()
    with pytest.raises(RuntimeError, match="adapter_index has dtype Int, expected int64"):
        ext.multi_adapter_decode_forward(*bad, EPS, 0, SLOPE)
    bad = list(args)
    bad[1] = bad[1][:1]
    with pytest.raises(RuntimeError, match=r"adapter_index has shape \[1\], expected \[2\]"):
        ext.multi_adapter_decode_forward(*bad, EPS, 0, SLOPE)
    for i, name in ((1, "adapter_index"), (2, "down_weight"), (6, "scaling"), (3, "down_bias")):
        moved = list(args)
        moved[i] = moved[i].cpu()
        with pytest.raises(RuntimeError, match=f"{name} is on cpu but x is on cuda"):
            ext.multi_adapter_decode_forward(*moved, EPS, 0, SLOPE)


# ------------------------------------------------------------------------------------ public op


def _naive_op(x, index, wd, bd, wu, bu, scaling, layer_norm, activation):
    from pefops.ops import bottleneck_adapter_ref

    d = torch.float64
    rows = [bottleneck_adapter_ref(x[t:t + 1].to(d), wd[i].to(d), bd[i].to(d), wu[i].to(d), bu[i].to(d),
                                   activation=activation, scaling=scaling[i].to(d),
                                   layer_norm=tuple(p.to(d) if isinstance(p, torch.Tensor) else p for p in layer_norm))
            for t, i in enumerate(index.tolist())]
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("rows", [4, 16, 300])
def test_public_op_on_cuda(dtype, rows):
    # auto: the decode kernel serves <= 16 rows forward, Triton the rest and every backward
    from pefops.ops import multi_adapter

    torch.manual_seed(0)
    n, r, h = 5, 32, 768
    index = torch.randint(0, n, (rows,), device="cuda")
    leaves = [torch.randn(rows, h, device="cuda", dtype=dtype), torch.randn(n, r, h, device="cuda", dtype=dtype) * h ** -0.5,
              torch.randn(n, r, device="cuda", dtype=dtype) * 0.1,
              torch.randn(n, h, r, device="cuda", dtype=dtype) * r ** -0.5, torch.randn(n, h, device="cuda", dtype=dtype) * 0.1,
              torch.rand(n, device="cuda") + 0.5, torch.ones(h, device="cuda", dtype=dtype), torch.zeros(h, device="cuda", dtype=dtype)]
    leaves = [t.requires_grad_() for t in leaves]
    x, wd, bd, wu, bu, s, lw, lb = leaves
    out = multi_adapter(x, index, wd, bd, wu, bu, activation="gelu", scaling=s, layer_norm=(lw, lb, 1e-5))
    grad = torch.randn_like(out)
    out.backward(grad)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    expected = _naive_op(copies[0], index, *copies[1:6], (copies[6], copies[7], 1e-5), "gelu")
    expected.backward(grad.to(torch.float64))
    tol = TOLERANCE[dtype] * 4
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    assert (out.double() - expected).abs().max().item() <= tol * scale(expected)
    for name, leaf, copy in zip(("x", "wd", "bd", "wu", "bu", "s", "lw", "lb"), leaves, copies):
        assert (leaf.grad.double() - copy.grad).abs().max().item() <= tol * scale(copy.grad), name
