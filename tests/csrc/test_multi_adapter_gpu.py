"""gpu tier: csrc multi_adapter_decode_forward (mixed-task batches at decode shapes) against a naive
float64 per-row loop, plus the public op on CUDA (auto selection: the decode kernel forward, the
Triton backward). Skipped without a CUDA device; the reference is local on purpose.

The CPU tests at the end (no GPU, no build) replay the kernel's index math: which rows and columns
each lane of down_kernel / up_kernel touches, for the host's choice of S / KS / G / VEC, must cover
every weight element exactly once and never read past a row. Keep their constants in step with
csrc/multi_adapter_decode.cu.
"""

import math

import pytest

torch = pytest.importorskip("torch")

from pefops import csrc  # noqa: E402
from tests.tolerances import TOLERANCE  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL_F32_RESULTS = 1e-4
EPS = 1e-5
SLOPE = 0.07


@pytest.fixture(scope="module")
def ext():
    reasons = csrc.unavailable_reasons("cuda")
    if reasons:
        pytest.skip("; ".join(reasons))
    return csrc.load()


def act_ref(z, code, slope):
    F = torch.nn.functional
    return [lambda v: v, torch.relu, F.gelu, lambda v: F.gelu(v, approximate="tanh"), F.silu, torch.tanh,
            lambda v: F.leaky_relu(v, slope)][code](z)


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
    if ln:
        ln_w = (1.0 + 0.1 * torch.randn(H, **kw)).to(dtype)
        ln_b = randn(H, scale=0.1)
    else:
        ln_w = ln_b = torch.empty(0, device="cuda", dtype=dtype)
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


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,H,r,N", SHAPES)
def test_matches_reference(ext, T, H, r, N, dtype, ln):
    code = (SHAPES.index((T, H, r, N)) + 3 * ln) % 7  # every activation over the grid
    check(ext, make_inputs(T, H, r, N, dtype, ln), code, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,H,r,N", [(2, 1, 1, 3), (5, 7, 3, 2), (7, 33, 7, 9), (9, 123, 33, 4), (12, 256, 1000, 3),
                                     (16, 5120, 8, 16), (4, 12288, 256, 2), (1, 100, 1024, 1)])
def test_odd_shapes(ext, T, H, r, N, dtype):
    check(ext, make_inputs(T, H, r, N, dtype, ln=True, seed=2), 2, dtype)
    check(ext, make_inputs(T, H, r, N, dtype, ln=False, seed=3), 4, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_out_of_range_rows_are_nan(ext, dtype):
    index = torch.tensor([0, -1, 3, 2, 7, 1], device="cuda")
    for ln in (False, True):
        check(ext, make_inputs(6, 1024, 64, 3, dtype, ln, seed=4, index=index), 2, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_residual_is_x_and_no_biases(ext, dtype):
    x, index, wd, bd, wu, bu, scaling, _, ln_w, ln_b = make_inputs(4, 1024, 64, 3, dtype, ln=True, seed=5)
    check(ext, (x, index, wd, bd, wu, bu, scaling, x, ln_w, ln_b), 1, dtype)
    none = torch.empty(0, device="cuda", dtype=dtype)
    check(ext, (x, index, wd, none, wu, none, scaling, x, ln_w, none), 5, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_misaligned_pointers_use_the_scalar_path(ext, dtype):
    args = list(make_inputs(3, 1024, 64, 3, dtype, ln=False, seed=6))

    def shifted(t):
        buf = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    for i in (0, 2, 4):  # x, down_weight, up_weight
        args[i] = shifted(args[i])
    check(ext, tuple(args), 3, dtype)


@pytest.mark.gpu
@gpu
def test_cuda_graph_capture_and_determinism(ext):
    args = make_inputs(8, 4096, 64, 4, torch.float16, ln=True, seed=7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        first = ext.multi_adapter_decode_forward(*args, EPS, 4, SLOPE)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, *_ = ext.multi_adapter_decode_forward(*args, EPS, 4, SLOPE)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first[0])
    torch.testing.assert_close(out.double(), reference(*args, EPS, 4, SLOPE)[0], rtol=4e-3, atol=4e-3)


@pytest.mark.gpu
@gpu
def test_errors(ext):
    args = list(make_inputs(2, 256, 8, 3, torch.float16, ln=False))
    with pytest.raises(RuntimeError, match=r"T = x.size\(0\) = 17 rows, expected at most 16"):
        ext.multi_adapter_decode_forward(*make_inputs(17, 256, 8, 3, torch.float16, ln=False), EPS, 0, SLOPE)
    bad = list(args)
    bad[1] = bad[1].int()
    with pytest.raises(RuntimeError, match="adapter_index has dtype Int, expected int64"):
        ext.multi_adapter_decode_forward(*bad, EPS, 0, SLOPE)
    bad = list(args)
    bad[6] = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="scaling must be a contiguous \\[N, H\\]"):
        ext.multi_adapter_decode_forward(*bad, EPS, 0, SLOPE)
    bad = list(args)
    bad[4] = torch.zeros(3, 256, 9, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="up_weight has shape"):
        ext.multi_adapter_decode_forward(*bad, EPS, 0, SLOPE)
    bad = list(args)
    bad[3] = torch.zeros(2, 8, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="down_bias has shape"):
        ext.multi_adapter_decode_forward(*bad, EPS, 0, SLOPE)


# ------------------------------------------------------------------------------------ public op


def _naive_op(x, index, wd, bd, wu, bu, scaling, layer_norm, activation):
    from pefops.ops import bottleneck_adapter_ref

    d = torch.float64
    rows = [bottleneck_adapter_ref(x[t:t + 1].to(d), wd[i].to(d), bd[i].to(d), wu[i].to(d), bu[i].to(d),
                                   activation=activation, scaling=scaling[i].to(d),
                                   layer_norm=tuple(p.to(d) if isinstance(p, torch.Tensor) else p for p in layer_norm))
            for t, i in enumerate(index.tolist())]
    return torch.cat(rows)


@pytest.mark.gpu
@gpu
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


# ------------------------------------------------------------------------------------ index emulation (CPU)

WARPS, DOWN_ROWS_PER_WARP, SLICE_QUANTUM, UP_ROWS_PER_GROUP, UP_MIN_GROUP = 8, 4, 256, 4, 4
DOWN_ROWS_PER_BLOCK = WARPS * DOWN_ROWS_PER_WARP


def host_down_plan(T, H, r, sms=132):
    row_blocks = -(-r // DOWN_ROWS_PER_BLOCK)
    s_want = max(1, -(-2 * sms // (row_blocks * T)))
    ks = -(-H // s_want)
    ks = max(SLICE_QUANTUM, -(-ks // SLICE_QUANTUM) * SLICE_QUANTUM)
    return row_blocks, ks, -(-H // ks)


def up_group(r, vec):
    g = 1
    while g < -(-r // vec):
        g *= 2
    return min(32, max(UP_MIN_GROUP, g))


@pytest.mark.parametrize("T,H,r,vec", [(1, 4096, 64, 8), (16, 4096, 1024, 8), (3, 1023, 7, 1), (5, 7, 3, 1),
                                       (2, 12288, 256, 8), (1, 100, 1024, 4), (9, 256, 33, 1)])
def test_down_kernel_covers_every_weight_once(T, H, r, vec):
    row_blocks, ks, slices = host_down_plan(T, H, r)
    count = {}
    for bx in range(row_blocks):
        for s in range(slices):
            k0 = s * ks
            klen = min(ks, H - k0)
            assert klen > 0
            for warp in range(WARPS):
                j0 = bx * DOWN_ROWS_PER_BLOCK + warp * DOWN_ROWS_PER_WARP
                if j0 >= r:
                    continue
                for lane in range(32):
                    for c in range(lane * vec, klen, 32 * vec):
                        assert c + vec <= klen, "a vector load would straddle the slice end"
                        for k in range(DOWN_ROWS_PER_WARP):
                            if j0 + k < r:
                                for v in range(vec):
                                    key = (j0 + k, k0 + c + v)
                                    count[key] = count.get(key, 0) + 1
    assert len(count) == r * H and set(count.values()) == {1}


@pytest.mark.parametrize("H,r,vec", [(4096, 64, 8), (4096, 1024, 8), (1023, 7, 1), (7, 3, 1), (100, 1024, 4),
                                     (256, 33, 1), (768, 16, 8), (64, 1, 1)])
def test_up_kernel_covers_every_weight_once(H, r, vec):
    g = up_group(r, vec)
    gpw = 32 // g
    rows_per_block = WARPS * gpw * UP_ROWS_PER_GROUP
    count = {}
    for bx in range(-(-H // rows_per_block)):
        h0 = bx * rows_per_block
        for warp in range(WARPS):
            for lane in range(32):
                gi, gl = lane // g, lane % g
                for k in range(UP_ROWS_PER_GROUP):
                    h = h0 + (warp * UP_ROWS_PER_GROUP + k) * gpw + gi
                    if h >= H:
                        continue
                    for j in range(gl * vec, r, g * vec):
                        assert j + vec <= r, "a vector load would straddle the row end"
                        for v in range(vec):
                            count[(h, j + v)] = count.get((h, j + v), 0) + 1
    assert len(count) == H * r and set(count.values()) == {1}
    # the xor butterfly over offsets g/2 .. 1 stays inside each aligned group of g lanes
    for lane in range(32):
        partners = {lane}
        o = g // 2
        while o:
            partners |= {p ^ o for p in partners}
            o //= 2
        assert partners == set(range(lane - lane % g, lane - lane % g + g))
