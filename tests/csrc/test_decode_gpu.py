"""gpu tier: csrc bottleneck_adapter_decode_forward against a float64 torch reference.

Skipped without a CUDA device. The reference is local on purpose (independent of pefops.ops).
The `gpu` marker is registered by the project's pytest configuration (owned by the lead):
    markers = ["gpu: needs a CUDA device", ...]
"""

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from pefops import csrc  # noqa: E402
from pefops.ops.activations import activation_code  # noqa: E402
from tests.tolerances import TOLERANCE  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Tolerance of `out` (rounded to the input dtype): TOLERANCE[dtype]; z / mean / rstd are float32 results
# computed from the same (exactly representable) inputs and are checked at TOL_F32_RESULTS.
TOL_F32_RESULTS = 1e-4
ACTIVATIONS = {activation_code(name): name
               for name in ("identity", "relu", "gelu", "gelu_tanh", "silu", "tanh", "leaky_relu")}
EPS = 1e-5
SLOPE = 0.07


@pytest.fixture(scope="module")
def ext():
    reasons = csrc.unavailable_reasons("cuda")
    if reasons:
        pytest.skip("; ".join(reasons))
    return csrc.load()


def act_ref(z, code, slope):
    if code == 0:
        return z
    if code == 1:
        return torch.relu(z)
    if code == 2:
        return torch.nn.functional.gelu(z)
    if code == 3:
        return torch.nn.functional.gelu(z, approximate="tanh")
    if code == 4:
        return torch.nn.functional.silu(z)
    if code == 5:
        return torch.tanh(z)
    if code == 6:
        return torch.nn.functional.leaky_relu(z, slope)
    raise ValueError(code)


def reference(x, wd, bd, wu, bu, scaling, residual, ln_w, ln_b, eps, code, slope):
    """float64 reference of the op; returns (out, z, mean, rstd) in float64."""
    d = torch.float64
    x, wd, wu, residual = x.to(d), wd.to(d), wu.to(d), residual.to(d)
    z = x @ wd.T
    if bd.numel():
        z = z + bd.to(d)
    u = act_ref(z, code, slope) @ wu.T
    if bu.numel():
        u = u + bu.to(d)
    y = residual + scaling.to(d) * u
    if ln_w.numel() == 0:
        return y, z, None, None
    mean = y.mean(-1)
    var = y.var(-1, unbiased=False)
    rstd = 1.0 / torch.sqrt(var + eps)
    out = (y - mean[:, None]) * rstd[:, None] * ln_w.to(d)
    if ln_b.numel():
        out = out + ln_b.to(d)
    return out, z, mean, rstd


def make_inputs(T, H, r, dtype, ln, seed=0, separate_residual=True):
    g = torch.Generator(device="cuda").manual_seed(seed * 7919 + T * 131 + H * 17 + r)
    kw = dict(device="cuda", generator=g)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, **kw) * scale).to(dtype)

    x = randn(T, H)
    wd = randn(r, H, scale=1.0 / math.sqrt(H))
    bd = randn(r, scale=0.1)
    wu = randn(H, r, scale=1.0 / math.sqrt(r))
    bu = randn(H, scale=0.1)
    scaling = torch.rand(H, **kw) + 0.5  # float32 [H]
    residual = randn(T, H) if separate_residual else x
    if ln:
        ln_w = (1.0 + 0.1 * torch.randn(H, **kw)).to(dtype)
        ln_b = randn(H, scale=0.1)
    else:
        ln_w = ln_b = torch.empty(0, device="cuda", dtype=dtype)
    return x, wd, bd, wu, bu, scaling, residual, ln_w, ln_b


def check(ext, args, code, dtype):
    x, wd, bd, wu, bu, scaling, residual, ln_w, ln_b = args
    out, z, mean, rstd = ext.bottleneck_adapter_decode_forward(
        x, wd, bd, wu, bu, scaling, residual, ln_w, ln_b, EPS, code, SLOPE
    )
    torch.cuda.synchronize()
    T, H = x.shape
    r = wd.shape[0]
    ref_out, ref_z, ref_mean, ref_rstd = reference(
        x, wd, bd, wu, bu, scaling, residual, ln_w, ln_b, EPS, code, SLOPE
    )
    assert out.dtype == dtype and out.shape == (T, H) and out.is_contiguous()
    assert z.dtype == torch.float32 and z.shape == (T, r)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(z.double(), ref_z, rtol=TOL_F32_RESULTS, atol=TOL_F32_RESULTS)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    if ln_w.numel():
        assert mean.dtype == torch.float32 and mean.shape == (T,)
        assert rstd.dtype == torch.float32 and rstd.shape == (T,)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=TOL_F32_RESULTS,
                                   atol=TOL_F32_RESULTS)
        torch.testing.assert_close(rstd.double(), ref_rstd, rtol=TOL_F32_RESULTS,
                                   atol=TOL_F32_RESULTS)
    else:
        assert mean.numel() == 0 and rstd.numel() == 0


SHAPES = list(itertools.product((1, 3, 16), (768, 1023, 4096), (1, 16, 64, 1024)))


@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,H,r", SHAPES)
def test_matches_reference(ext, T, H, r, dtype, ln):
    # Every activation over the grid: the code cycles with the shape index and LN on/off.
    code = (SHAPES.index((T, H, r)) + 3 * ln) % len(ACTIVATIONS)
    check(ext, make_inputs(T, H, r, dtype, ln), code, dtype)


@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("code", list(ACTIVATIONS), ids=list(ACTIVATIONS.values()))
@pytest.mark.parametrize("T,H,r", [(3, 1023, 64), (16, 4096, 1024), (1, 768, 16)])
def test_every_activation(ext, T, H, r, code, dtype, ln):
    check(ext, make_inputs(T, H, r, dtype, ln, seed=1), code, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "T,H,r",
    [(2, 1, 1), (5, 7, 3), (7, 33, 7), (9, 123, 33), (12, 256, 1000), (16, 5120, 8),
     (4, 12288, 256), (1, 100, 1024)],
)
def test_odd_shapes(ext, T, H, r, dtype):
    check(ext, make_inputs(T, H, r, dtype, ln=True, seed=2), 2, dtype)
    check(ext, make_inputs(T, H, r, dtype, ln=False, seed=3), 4, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_residual_is_x_and_no_biases(ext, dtype):
    T, H, r = 4, 1024, 64
    x, wd, bd, wu, bu, scaling, _, ln_w, ln_b = make_inputs(T, H, r, dtype, ln=True, seed=4)
    check(ext, (x, wd, bd, wu, bu, scaling, x, ln_w, ln_b), 1, dtype)
    none = torch.empty(0, device="cuda", dtype=dtype)
    check(ext, (x, wd, none, wu, none, scaling, x, ln_w, none), 5, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_misaligned_pointers_use_the_scalar_path(ext, dtype):
    # Contiguous views starting one element into their storage: not 16-byte aligned.
    T, H, r = 3, 1024, 64
    args = list(make_inputs(T, H, r, dtype, ln=False, seed=5))

    def shifted(t):
        buf = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v

    for i in (0, 1, 3):  # x, down_weight, up_weight
        args[i] = shifted(args[i])
    check(ext, tuple(args), 3, dtype)


def test_runs_on_the_current_stream(ext):
    T, H, r = 2, 2048, 32
    args = make_inputs(T, H, r, torch.bfloat16, ln=True, seed=6)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, *_ = ext.bottleneck_adapter_decode_forward(*args, EPS, 2, SLOPE)
    torch.cuda.current_stream().wait_stream(stream)
    ref = reference(*args, EPS, 2, SLOPE)[0]
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_cuda_graph_capture(ext):
    T, H, r = 1, 4096, 64
    args = make_inputs(T, H, r, torch.float16, ln=True, seed=7)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (and set any shared-memory attributes) outside capture
        ext.bottleneck_adapter_decode_forward(*args, EPS, 4, SLOPE)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, *_ = ext.bottleneck_adapter_decode_forward(*args, EPS, 4, SLOPE)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference(*args, EPS, 4, SLOPE)[0]
    torch.testing.assert_close(out.double(), ref, rtol=4e-3, atol=4e-3)


def test_deterministic(ext):
    args = make_inputs(16, 4096, 256, torch.float32, ln=True, seed=8)
    first = ext.bottleneck_adapter_decode_forward(*args, EPS, 2, SLOPE)
    for _ in range(3):
        again = ext.bottleneck_adapter_decode_forward(*args, EPS, 2, SLOPE)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Errors: RuntimeError with a message naming what was wrong and what was expected.


def _call(ext, args, eps=EPS, code=0, slope=SLOPE):
    return ext.bottleneck_adapter_decode_forward(*args, eps, code, slope)


def test_error_too_many_tokens(ext):
    args = make_inputs(17, 256, 8, torch.float16, ln=False)
    with pytest.raises(RuntimeError, match=r"T = x.size\(0\) = 17 tokens, expected at most 16"):
        _call(ext, args)


def test_error_dtype(ext):
    args = list(make_inputs(2, 256, 8, torch.float16, ln=False))
    with pytest.raises(RuntimeError, match="expected float32, float16 or bfloat16"):
        _call(ext, [a.double() if a.numel() else a for a in args])
    args[1] = args[1].float()
    with pytest.raises(RuntimeError, match="down_weight has dtype Float but x has dtype Half"):
        _call(ext, args)
    args = list(make_inputs(2, 256, 8, torch.float16, ln=False))
    args[5] = args[5].half()
    with pytest.raises(RuntimeError, match="scaling has dtype Half, expected float32"):
        _call(ext, args)


def test_error_shapes(ext):
    base = make_inputs(2, 256, 8, torch.bfloat16, ln=True)
    cases = {
        1: (torch.zeros(8, 255, device="cuda", dtype=torch.bfloat16), "down_weight has shape"),
        3: (torch.zeros(256, 9, device="cuda", dtype=torch.bfloat16), "up_weight has shape"),
        2: (torch.zeros(7, device="cuda", dtype=torch.bfloat16), "down_bias has shape"),
        4: (torch.zeros(255, device="cuda", dtype=torch.bfloat16), "up_bias has shape"),
        5: (torch.ones(255, device="cuda"), "scaling must be a contiguous"),
        6: (torch.zeros(3, 256, device="cuda", dtype=torch.bfloat16), "residual has shape"),
        7: (torch.ones(255, device="cuda", dtype=torch.bfloat16), "ln_weight has shape"),
    }
    for i, (bad, msg) in cases.items():
        args = list(base)
        args[i] = bad
        with pytest.raises(RuntimeError, match=msg):
            _call(ext, args)


def test_error_rank_and_layout(ext):
    args = list(make_inputs(2, 64, 8, torch.float16, ln=False))
    big = list(make_inputs(2, 64, 1025, torch.float16, ln=False))
    with pytest.raises(RuntimeError, match="expected 1 <= r <= 1024"):
        _call(ext, big)
    nc = list(args)
    nc[1] = torch.zeros(64, 8, device="cuda", dtype=torch.float16).T  # [8, 64], not contiguous
    with pytest.raises(RuntimeError, match="down_weight must be contiguous"):
        _call(ext, nc)
    cpu = list(args)
    cpu[3] = cpu[3].cpu()
    with pytest.raises(RuntimeError, match="up_weight is on cpu but x is on cuda"):
        _call(ext, cpu)
    with pytest.raises(RuntimeError, match="activation code 7 is unknown"):
        _call(ext, args, code=7)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        _call(ext, [args[0][None]] + args[1:])
