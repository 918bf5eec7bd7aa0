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

from tests.csrc.helpers import DTYPES, GPU_TIER, eager_then_graph, misaligned_copy  # noqa: E402
from tests.tolerances import TOLERANCE  # noqa: E402

pytestmark = GPU_TIER

# |y - ref| <= TOLERANCE[dtype] * max(1, max|ref|) (DESIGN.md "Numerics and tolerances")
MASKED_VALUE = 1e4
TOKENS = (1, 3, 8, 16)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (127, 1023), (5, 9), (64, 1)]  # (N, K)


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
    names = ["x", "weight", "packed_mask", "bias"]
    for i, name in enumerate(names):
        if which in (name, "all"):
            args[i] = misaligned_copy(args[i])
    check(ext, tuple(args), dtype)


# Edge cases of the index math on the real kernel: the vector width (16-bit VEC 8 reads one mask
# byte, fp32 VEC 4 a nibble of one; VEC 1 for K % VEC != 0 or misaligned), the K-slices the wave
# model picks (S > 1 when the row blocks alone leave the GPU idle, or shared memory caps the slice),
# slice and row tails, every token bucket. Masked weights are NaN and the unused tail bits of each
# row's last mask byte are set: a masked weight that is multiplied by 0 instead of dropped, or a bit
# read from the wrong place, gives NaN or a wrong sum.
INDEX_CASES = [
    # (T, N, K, bits, misaligned)
    (1, 40, 512, 16, False),    # VEC 8, few row blocks: K split into slices
    (3, 37, 1000, 16, False),   # VEC 8, K tail inside the last slice, a 5-row tail block
    (16, 33, 264, 16, False),   # bucket 16, a slice tail of 8 columns
    (5, 70, 300, 32, False),    # fp32 VEC 4 (nibbles of a mask byte), bucket 8
    (2, 9, 1023, 16, False),    # K % 8 != 0: scalar path, tail bits
    (4, 5, 9, 32, False),       # tiny, scalar
    (1, 64, 1, 16, False),      # K = 1
    (8, 31, 520, 32, True),     # misaligned: scalar, split
    (16, 12, 777, 32, False),   # fp32 bucket 16: the slice is capped by shared memory (768) -> S >= 2
    (2, 100, 2048, 16, False),  # bucket 2
]


@pytest.mark.parametrize("T,N,K,bits,misaligned", INDEX_CASES)
def test_index_edge_cases(ext, T, N, K, bits, misaligned):
    for dtype in ((torch.float16, torch.bfloat16) if bits == 16 else (torch.float32,)):
        x, w, packed, b = make_inputs(T, N, K, dtype, bias=T % 2 == 1, seed=11)
        m = unpack_bits(packed, K)
        poisoned = torch.where(m, w, torch.full_like(w, float("nan")))
        dirty = packed.clone()
        if K % 8:
            dirty[:, -1] |= (0xFF << (K % 8)) & 0xFF
        args = [x, poisoned, dirty, b]
        if misaligned:
            args[0], args[1] = misaligned_copy(x), misaligned_copy(poisoned)
        y = ext.masked_linear_decode_forward(*args)
        assert torch.isfinite(y).all()
        assert_close(y, reference(x, w, packed, b), dtype)


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
    _, y = eager_then_graph(lambda: ext.masked_linear_decode_forward(*args))
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
# Errors that need a CUDA tensor (the others run on CPU tensors in test_host_checks.py).


def test_error_devices(ext):
    x, w, packed, b = make_inputs(2, 64, 256, torch.float16)
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda:0"):
        ext.masked_linear_decode_forward(x, w.cpu(), packed, b)
    with pytest.raises(RuntimeError, match="packed_mask is on cpu but x is on cuda:0"):
        ext.masked_linear_decode_forward(x, w, packed.cpu(), b)
    with pytest.raises(RuntimeError, match="bias is on cpu but x is on cuda:0"):
        ext.masked_linear_decode_forward(x, w, packed, b.cpu())


def test_pack_bits_matches_numpy():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    for K in (1, 7, 8, 9, 1023):
        m = torch.rand(5, K, generator=g) < 0.5
        ours = pack_bits(m.cuda()).cpu().numpy()
        want = np.packbits(m.numpy().astype(np.uint8), axis=1, bitorder="little")
        assert (ours == want).all()
        assert torch.equal(unpack_bits(torch.from_numpy(want).cuda(), K).cpu(), m)

