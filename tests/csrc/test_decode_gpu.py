"""gpu tier: csrc bottleneck_adapter_decode_forward against a float64 torch reference.

Skipped without a CUDA device. The reference is local on purpose (independent of pefops.ops).
The `gpu` marker is registered by the project's pytest configuration (owned by the lead):
    markers = ["gpu: needs a CUDA device", ...]
"""

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from pefops.ops.activations import activation_code  # noqa: E402
from tests.csrc.helpers import (DTYPES, EPS, GPU_TIER, SLOPE, TOL_F32_RESULTS, act_ref,  # noqa: E402
                                eager_then_graph, layer_norm_params, misaligned_copy)
from tests.tolerances import TOLERANCE  # noqa: E402

pytestmark = GPU_TIER

# Tolerance of `out` (rounded to the input dtype): TOLERANCE[dtype]; z / mean / rstd at TOL_F32_RESULTS.
ACTIVATIONS = {activation_code(name): name
               for name in ("identity", "relu", "gelu", "gelu_tanh", "silu", "tanh", "leaky_relu")}


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
    ln_w, ln_b = layer_norm_params(H, dtype, g, ln)
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
    T, H, r = 3, 1024, 64
    args = list(make_inputs(T, H, r, dtype, ln=False, seed=5))
    for i in (0, 1, 3):  # x, down_weight, up_weight
        args[i] = misaligned_copy(args[i])
    check(ext, tuple(args), 3, dtype)


# Edge cases of the index math on the real kernels (H100 / H200: 132 SMs). Each shape with the 16-bit
# dtypes (VEC 8) or float32 (VEC 4); "misaligned" forces VEC 1. What each case reaches:
INDEX_CASES = [
    # (T, H, r, bits, misaligned)
    (1, 768, 1, 16, False),      # r = 1: one row of Wd, 31 idle warps' worth of rows; up group G = 4
    (3, 1023, 16, 16, False),    # H % 8 != 0: scalar down projection; token bucket 4 with a pad row
    (16, 1536, 64, 16, False),   # bucket 16 (64 accumulators), G = 8
    (5, 300, 33, 32, False),     # fp32, H % 4 == 0 but r odd: vector down, scalar up (G = 32)
    (2, 1024, 1024, 16, False),  # rank limit: up staging 8 KB, G = 32 with 4 vectors per lane
    (8, 520, 40, 32, False),     # fp32 bucket 8, r = 40: G = 16, a slice tail of 8 columns
    (16, 7, 3, 16, False),       # tiny: H < one vector, r < one row group
    (4, 1, 1, 32, False),        # H = 1
    (9, 264, 24, 16, True),      # misaligned: scalar paths, bucket 16 with 7 pad rows
    (16, 1100, 96, 32, False),   # fp32 bucket 16: the x slice is capped by shared memory -> S > 1
    (3, 200, 1024, 16, False),   # r = 1024 with H below one slice quantum
    (6, 8200, 8, 16, False),     # one row block: H split into many slices (S > 1) with a ragged tail
    (1, 2304, 1024, 16, False),  # 32 row blocks, several slices, the finalize kernel
]


@pytest.mark.parametrize("T,H,r,bits,misaligned", INDEX_CASES)
def test_index_edge_cases(ext, T, H, r, bits, misaligned):
    for dtype in ((torch.float16, torch.bfloat16) if bits == 16 else (torch.float32,)):
        for ln, code in ((False, 5), (True, 2)):
            args = list(make_inputs(T, H, r, dtype, ln, seed=9))
            if misaligned:
                for i in (0, 1, 3):  # x, down_weight, up_weight
                    args[i] = misaligned_copy(args[i])
            check(ext, tuple(args), code, dtype)


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
    _, (out, *_) = eager_then_graph(lambda: ext.bottleneck_adapter_decode_forward(*args, EPS, 4, SLOPE))
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
# Errors that need a CUDA tensor (the others run on CPU tensors in test_host_checks.py).


def test_error_devices(ext):
    args = list(make_inputs(2, 64, 8, torch.float16, ln=True))
    for i, name in ((1, "down_weight"), (3, "up_weight"), (2, "down_bias"), (5, "scaling"), (8, "ln_bias")):
        moved = list(args)
        moved[i] = moved[i].cpu()
        with pytest.raises(RuntimeError, match=f"{name} is on cpu but x is on cuda"):
            ext.bottleneck_adapter_decode_forward(*moved, EPS, 0, SLOPE)
