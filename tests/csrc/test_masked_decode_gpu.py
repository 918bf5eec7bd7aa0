"""gpu tier: csrc masked_linear_decode_forward against a float64 torch reference.

Skipped without a CUDA device. The reference is local on purpose (independent of pefops.ops): it
unpacks the bits with torch ops and computes x @ (W ⊙ M)^T + b in float64. Masked weights are set to
1e4 so a masked weight that is not dropped shows.
The `gpu` marker is registered by the project's pytest configuration (owned by the lead):
    markers = ["gpu: needs a CUDA device", ...]
"""

import functools
import math

import pytest

torch = pytest.importorskip("torch")

from pefops import csrc  # noqa: E402
from tests.tolerances import TOLERANCE  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# |y - ref| <= TOLERANCE[dtype] * max(1, max|ref|) (DESIGN.md "Numerics and tolerances")
MASKED_VALUE = 1e4
TOKENS = (1, 3, 8, 16)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (127, 1023), (5, 9), (64, 1)]  # (N, K)


@pytest.fixture(scope="module")
def ext():
    reasons = csrc.unavailable_reasons("cuda")
    if reasons:
        pytest.skip("; ".join(reasons))
    return csrc.load()


def pack_bits(mask):
    """[N, K] bool -> [N, ceil(K / 8)] uint8 with bit j of byte b = column 8 b + j
    (numpy.packbits(axis=1, bitorder="little")), tail bits zero."""
    N, K = mask.shape
    KB = (K + 7) // 8
    padded = torch.zeros(N, KB * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :K] = mask.to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(N, KB, 8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed, K):
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [N, KB, 8]
    return bits.reshape(packed.shape[0], -1)[:, :K].bool()


def reference(x, weight, packed, bias):
    """float64 x @ (W ⊙ M)^T + b."""
    K = x.shape[1]
    m = unpack_bits(packed, K)
    w = torch.where(m, weight.double(), torch.zeros((), dtype=torch.float64, device=weight.device))
    y = x.double() @ w.T
    if bias.numel():
        y = y + bias.double()
    return y


@functools.lru_cache(maxsize=8)
def _weights(N, K, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed * 7919 + N * 17 + K)
    w = torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)
    m = torch.rand(N, K, device="cuda", generator=g) < 0.5
    w = torch.where(m, w, torch.full_like(w, MASKED_VALUE)).to(dtype)
    b = (torch.randn(N, device="cuda", generator=g) * 0.1).to(dtype)
    return w, pack_bits(m), b


def make_inputs(T, N, K, dtype, bias=True, seed=0):
    w, packed, b = _weights(N, K, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed * 31 + T)
    x = torch.randn(T, K, device="cuda", generator=g).to(dtype)
    if not bias:
        b = torch.empty(0, device="cuda", dtype=dtype)
    return x, w, packed, b


def assert_close(y, ref, dtype):
    tol = TOLERANCE[dtype]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (y.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} * {scale:.3g} ({dtype})"


def check(ext, args, dtype):
    x, w, packed, b = args
    y = ext.masked_linear_decode_forward(x, w, packed, b)
    torch.cuda.synchronize()
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[0]) and y.is_contiguous()
    assert y.device == x.device
    assert_close(y, reference(x, w, packed, b), dtype)
    return y


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("T", TOKENS)
def test_matches_reference(ext, T, N, K, dtype, bias):
    check(ext, make_inputs(T, N, K, dtype, bias), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "T,N,K",
    [(2, 1, 1), (5, 7, 3), (7, 33, 7), (9, 123, 33), (12, 256, 1000), (16, 5120, 8),
     (4, 300, 12288), (1, 1000, 100), (2, 32000, 256), (6, 3, 20000), (16, 96, 264)],
)
def test_odd_shapes(ext, T, N, K, dtype):
    check(ext, make_inputs(T, N, K, dtype, bias=T % 2 == 0, seed=1), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_mask_extremes(ext, dtype):
    T, N, K = 3, 70, 777
    x, w, _, b = make_inputs(T, N, K, dtype, seed=2)
    ones = pack_bits(torch.ones(N, K, dtype=torch.bool, device="cuda"))
    zeros = pack_bits(torch.zeros(N, K, dtype=torch.bool, device="cuda"))
    check(ext, (x, w, ones, b), dtype)
    y = check(ext, (x, w, zeros, b), dtype)
    torch.testing.assert_close(y, b.expand(T, N), rtol=0, atol=0)  # only the bias is left


def test_masked_inf_and_nan_are_dropped(ext):
    T, N, K = 2, 64, 512
    x, w, packed, b = make_inputs(T, N, K, torch.float16, seed=3)
    m = unpack_bits(packed, K)
    poisoned = w.clone()
    poisoned[~m] = float("nan")
    poisoned[~m & (torch.arange(K, device="cuda") % 3 == 0)] = float("inf")
    y = ext.masked_linear_decode_forward(x, poisoned, packed, b)
    assert torch.isfinite(y).all()
    assert_close(y, reference(x, w, packed, b), torch.float16)


def test_tail_bits_are_ignored(ext):
    T, N, K = 4, 40, 1021  # K % 8 == 5: three tail bits per row
    x, w, packed, b = make_inputs(T, N, K, torch.bfloat16, seed=4)
    dirty = packed.clone()
    dirty[:, -1] |= 0xE0
    y_clean = ext.masked_linear_decode_forward(x, w, packed, b)
    y_dirty = ext.masked_linear_decode_forward(x, w, dirty, b)
    assert torch.equal(y_clean, y_dirty)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("which", ["x", "weight", "packed_mask", "bias", "all"])
def test_misaligned_pointers(ext, dtype, which):
    # Contiguous views starting one element into their storage: not 16-byte aligned, so x / weight
    # take the scalar path; a shifted mask or bias has no alignment requirement at all.
    T, N, K = 3, 300, 1024
    args = list(make_inputs(T, N, K, dtype, seed=5))

    def shifted(t):
        buf = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v

    names = ["x", "weight", "packed_mask", "bias"]
    for i, name in enumerate(names):
        if which in (name, "all"):
            args[i] = shifted(args[i])
    check(ext, tuple(args), dtype)


def test_empty_and_degenerate(ext):
    dt = torch.bfloat16
    x, w, packed, b = make_inputs(0, 64, 128, dt, seed=6)
    y = ext.masked_linear_decode_forward(x, w, packed, b)
    assert y.shape == (0, 64) and y.dtype == dt
    # K = 0: empty dot products, y = bias (or zeros)
    x = torch.empty(3, 0, device="cuda", dtype=dt)
    w = torch.empty(5, 0, device="cuda", dtype=dt)
    packed = torch.empty(5, 0, device="cuda", dtype=torch.uint8)
    bias = torch.arange(5, device="cuda").to(dt)
    torch.testing.assert_close(ext.masked_linear_decode_forward(x, w, packed, bias),
                               bias.expand(3, 5), rtol=0, atol=0)
    none = torch.empty(0, device="cuda", dtype=dt)
    assert (ext.masked_linear_decode_forward(x, w, packed, none) == 0).all()
    # N = 0
    x = torch.randn(2, 16, device="cuda", dtype=dt)
    w = torch.empty(0, 16, device="cuda", dtype=dt)
    packed = torch.empty(0, 2, device="cuda", dtype=torch.uint8)
    assert ext.masked_linear_decode_forward(x, w, packed, none).shape == (2, 0)


def test_runs_on_the_current_stream(ext):
    args = make_inputs(2, 4096, 4096, torch.bfloat16, seed=7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = ext.masked_linear_decode_forward(*args)
    torch.cuda.current_stream().wait_stream(stream)
    assert_close(y, reference(*args), torch.bfloat16)


def test_cuda_graph_capture(ext):
    args = make_inputs(1, 4096, 4096, torch.float16, seed=8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside capture
        ext.masked_linear_decode_forward(*args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ext.masked_linear_decode_forward(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, reference(*args), torch.float16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(ext):
    dev = torch.device("cuda", 1)
    x, w, packed, b = (t.to(dev) for t in make_inputs(3, 256, 512, torch.bfloat16, seed=9))
    y = ext.masked_linear_decode_forward(x, w, packed, b)  # current device is cuda:0
    assert y.device == dev
    assert_close(y, reference(x, w, packed, b), torch.bfloat16)


@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (300, 20000)])
def test_deterministic(ext, N, K):
    args = make_inputs(16, N, K, torch.float32, seed=10)
    first = ext.masked_linear_decode_forward(*args)
    for _ in range(3):
        assert torch.equal(first, ext.masked_linear_decode_forward(*args))


# ------------------------------------------------------------------------------------------------
# Errors: RuntimeError with a message naming what was wrong and what was expected.


def _call(ext, args):
    return ext.masked_linear_decode_forward(*args)


def test_error_too_many_tokens(ext):
    args = make_inputs(17, 64, 256, torch.float16)
    with pytest.raises(RuntimeError, match=r"T = x.size\(0\) = 17 tokens, expected at most 16"):
        _call(ext, args)


def test_error_dtypes(ext):
    x, w, packed, b = make_inputs(2, 64, 256, torch.float16)
    with pytest.raises(RuntimeError, match="x has dtype Double, expected float32, float16 or"):
        _call(ext, (x.double(), w.double(), packed, b.double()))
    with pytest.raises(RuntimeError, match="weight has dtype Float but x has dtype Half"):
        _call(ext, (x, w.float(), packed, b))
    with pytest.raises(RuntimeError, match="bias has dtype BFloat16 but x has dtype Half"):
        _call(ext, (x, w, packed, b.bfloat16()))
    with pytest.raises(RuntimeError, match="packed_mask has dtype Bool, expected uint8"):
        _call(ext, (x, w, packed.bool(), b))


def test_error_shapes(ext):
    N, K = 64, 250  # KB = 32
    x, w, packed, b = make_inputs(2, N, K, torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        _call(ext, (x[None], w, packed, b))
    msg = r"weight has shape \[64, 251\], expected \[N, K\] with K = x.size\(1\) = 250"
    with pytest.raises(RuntimeError, match=msg):
        _call(ext, (x, torch.zeros(N, K + 1, device="cuda", dtype=x.dtype), packed, b))
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        _call(ext, (x, w[0], packed, b))
    msg = r"packed_mask has shape \[64, 33\], expected \[N, ceil\(K / 8\)\] = \[64, 32\]"
    with pytest.raises(RuntimeError, match=msg):
        _call(ext, (x, w, torch.zeros(N, 33, device="cuda", dtype=torch.uint8), b))
    with pytest.raises(RuntimeError, match=r"packed_mask has shape \[64, 250\]"):  # unpacked
        _call(ext, (x, w, torch.zeros(N, K, device="cuda", dtype=torch.uint8), b))
    with pytest.raises(RuntimeError, match=r"packed_mask has shape \[63, 32\]"):
        _call(ext, (x, w, packed[:63], b))
    with pytest.raises(RuntimeError, match=r"bias has shape \[65\], expected \[N\] = \[64\]"):
        _call(ext, (x, w, packed, torch.zeros(N + 1, device="cuda", dtype=x.dtype)))


def test_error_layout(ext):
    x, w, packed, b = make_inputs(2, 64, 256, torch.float16)
    with pytest.raises(RuntimeError, match=r"x must be contiguous"):
        _call(ext, (torch.zeros(256, 2, device="cuda", dtype=x.dtype).T, w, packed, b))
    with pytest.raises(RuntimeError, match=r"weight must be contiguous"):
        _call(ext, (x, torch.zeros(256, 64, device="cuda", dtype=x.dtype).T, packed, b))
    with pytest.raises(RuntimeError, match=r"packed_mask must be contiguous"):
        _call(ext, (x, w, torch.zeros(32, 64, device="cuda", dtype=torch.uint8).T, b))
    with pytest.raises(RuntimeError, match=r"bias must be contiguous"):
        _call(ext, (x, w, packed, torch.zeros(64, 2, device="cuda", dtype=x.dtype)[:, 0]))


def test_error_devices(ext):
    x, w, packed, b = make_inputs(2, 64, 256, torch.float16)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor, got a tensor on cpu"):
        _call(ext, (x.cpu(), w.cpu(), packed.cpu(), b.cpu()))
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda:0"):
        _call(ext, (x, w.cpu(), packed, b))
    with pytest.raises(RuntimeError, match="packed_mask is on cpu but x is on cuda:0"):
        _call(ext, (x, w, packed.cpu(), b))
    with pytest.raises(RuntimeError, match="bias is on cpu but x is on cuda:0"):
        _call(ext, (x, w, packed, b.cpu()))


def test_pack_bits_matches_numpy():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    for K in (1, 7, 8, 9, 1023):
        m = torch.rand(5, K, generator=g) < 0.5
        ours = pack_bits(m.cuda()).cpu().numpy()
        want = np.packbits(m.numpy().astype(np.uint8), axis=1, bitorder="little")
        assert (ours == want).all()
        assert torch.equal(unpack_bits(torch.from_numpy(want).cuda(), K).cpu(), m)

