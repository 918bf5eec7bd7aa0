"""Triton tier: the mask-tuning kernels' launchers (forward, grad_input, grad_scores, pack), under
TRITON_INTERPRET=1 on CPU (on a GPU machine the same tests run on the device), against a float64
reference written here: unpack the bits with torch bit ops, select the kept weights, matmul."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pefops.kernels import masked_linear as kernels
from tests.tolerances import TOLERANCE  # relative to max(1, max|expected|)

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------ reference


def unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """bool [N, K]: bit j of byte b is column 8·b + j."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :in_features].bool()


def pack(keep: torch.Tensor) -> torch.Tensor:
    """uint8 [N, ceil(K / 8)] of a bool [N, K], little bit order, tail bits zero."""
    out_features, in_features = keep.shape
    padded = torch.zeros(out_features, (in_features + 7) // 8 * 8, dtype=torch.int32, device=keep.device)
    padded[:, :in_features] = keep.to(torch.int32)
    weights = 1 << torch.arange(8, device=keep.device, dtype=torch.int32)
    return (padded.reshape(out_features, -1, 8) * weights).sum(-1).to(torch.uint8)


def effective_weight(weight, packed):
    """W ⊙ M in float64, selecting (so huge or infinite masked-out weights drop out)."""
    keep = unpack(packed, weight.shape[1])
    return torch.where(keep, weight.double(), torch.zeros((), dtype=torch.float64, device=weight.device))


def reference_forward(x, weight, packed, bias):
    y = x.double() @ effective_weight(weight, packed).T
    return y + bias.double() if bias is not None else y


def reference_grad_input(grad, weight, packed):
    return grad.double() @ effective_weight(weight, packed)


def reference_grad_scores(grad, x, weight):
    return (grad.double().T @ x.double()) * weight.double()


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= TOLERANCE[dtype] * scale, f"{what} {dtype}: max error {error:.3g}, scale {scale:.3g}"


# ------------------------------------------------------------------------------------ inputs


def make_inputs(rows, out_features, in_features, dtype, transposed=False, bias=True, density=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)

    x = randn(rows, in_features)
    # a transposed view (stride (1, N)) is how GPT-2's Conv1D stores its [in, out] weight
    weight = randn(in_features, out_features).t() if transposed else randn(out_features, in_features)
    keep = (torch.rand(out_features, in_features, generator=generator) < density).to(DEVICE)
    grad = randn(rows, out_features)
    return x, weight, pack(keep), randn(out_features) if bias else None, grad


def check_all(rows, out_features, in_features, dtype=torch.float32, transposed=False, bias=True, seed=0):
    x, weight, packed, b, grad = make_inputs(rows, out_features, in_features, dtype, transposed, bias, seed=seed)
    y = kernels.masked_linear_forward(x, weight, packed, b)
    assert y.dtype == dtype
    assert_close(y, reference_forward(x, weight, packed, b), dtype, "forward")
    dx = kernels.masked_linear_grad_input(grad, weight, packed)
    assert dx.dtype == dtype
    assert_close(dx, reference_grad_input(grad, weight, packed), dtype, "grad_input")
    dscores = kernels.masked_linear_grad_scores(grad, x, weight)
    assert dscores.dtype == torch.float32 and dscores.is_contiguous()
    assert_close(dscores, reference_grad_scores(grad, x, weight), dtype, "grad_scores")


# ------------------------------------------------------------------------------------ GEMMs


# every odd size of the brief appears: M in 1, 7, 33, 123; K in 1, 7, 8, 9, 33, 100, 1023; N in 1, 5, 64, 127
SHAPES = [
    (1, 1, 1), (7, 5, 7), (33, 64, 8), (123, 127, 9), (1, 127, 33), (7, 64, 100), (33, 5, 1023), (123, 1, 100),
    (7, 127, 1023),
]


@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
def test_shapes_fp32(rows, out_features, in_features):
    odd = (rows + out_features + in_features) % 2 == 1
    check_all(rows, out_features, in_features, transposed=odd, bias=not odd)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "conv1d"])
@pytest.mark.parametrize("rows,out_features,in_features", [(7, 64, 100), (123, 127, 33)])
def test_dtypes_and_weight_layouts(dtype, transposed, rows, out_features, in_features):
    check_all(rows, out_features, in_features, dtype, transposed=transposed, bias=rows > 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_long_reduction_low_precision(dtype):
    check_all(33, 64, 1023, dtype, transposed=True)


def test_strided_rows():
    # x and grad with a row stride larger than their width (unit column stride)
    x, weight, packed, b, grad = make_inputs(9, 20, 37, torch.float32)
    x_wide = torch.zeros(9, 50, device=DEVICE)
    x_wide[:, 3:40] = x
    grad_wide = torch.zeros(9, 31, device=DEVICE)
    grad_wide[:, 5:25] = grad
    x_view, grad_view = x_wide[:, 3:40], grad_wide[:, 5:25]
    assert x_view.stride() == (50, 1) and grad_view.stride() == (31, 1)
    assert_close(kernels.masked_linear_forward(x_view, weight, packed, b), reference_forward(x, weight, packed, b),
                 torch.float32, "forward")
    assert_close(kernels.masked_linear_grad_input(grad_view, weight, packed),
                 reference_grad_input(grad, weight, packed), torch.float32, "grad_input")
    assert_close(kernels.masked_linear_grad_scores(grad_view, x_view, weight),
                 reference_grad_scores(grad, x, weight), torch.float32, "grad_scores")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_out_weights_have_no_effect(dtype):
    # 1e6 (inf in fp16) wherever the mask drops a weight: the kernels must select, never read them
    transposed = dtype == torch.float16
    x, weight, packed, b, grad = make_inputs(33, 64, 100, dtype, transposed=transposed)
    keep = unpack(packed, 100)
    huge = torch.full((), 1e6).to(dtype)
    poisoned = torch.where(keep.T, weight.T, huge).contiguous().T if transposed else torch.where(keep, weight, huge)
    assert poisoned.stride() == weight.stride()
    if dtype == torch.float16:
        assert torch.isinf(poisoned[~keep]).all()
    assert_close(kernels.masked_linear_forward(x, poisoned, packed, b), reference_forward(x, weight, packed, b),
                 dtype, "forward")
    assert_close(kernels.masked_linear_grad_input(grad, poisoned, packed),
                 reference_grad_input(grad, weight, packed), dtype, "grad_input")


def test_all_kept_and_all_dropped():
    x, weight, _, b, grad = make_inputs(7, 5, 9, torch.float32)
    ones = pack(torch.ones(5, 9, dtype=torch.bool, device=DEVICE))
    zeros = torch.zeros(5, 2, dtype=torch.uint8, device=DEVICE)
    assert ones[:, 1].eq(1).all()  # tail bits of the second byte stay zero
    torch.testing.assert_close(kernels.masked_linear_forward(x, weight, ones, b), x @ weight.T + b,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.masked_linear_forward(x, weight, zeros, b), b.expand(7, 5))
    torch.testing.assert_close(kernels.masked_linear_grad_input(grad, weight, zeros), torch.zeros(7, 9, device=DEVICE))


def test_empty_dimensions():
    x, weight, packed, b, grad = make_inputs(0, 5, 9, torch.float32)
    assert kernels.masked_linear_forward(x, weight, packed, b).shape == (0, 5)
    assert kernels.masked_linear_grad_input(grad, weight, packed).shape == (0, 9)
    assert kernels.masked_linear_grad_scores(grad, x, weight).eq(0).all()
    x, weight, packed, b, grad = make_inputs(3, 5, 0, torch.float32)
    torch.testing.assert_close(kernels.masked_linear_forward(x, weight, packed, b), b.expand(3, 5))
    assert kernels.masked_linear_grad_input(grad, weight, packed).shape == (3, 0)
    assert kernels.masked_linear_grad_scores(grad, x, weight).shape == (5, 0)
    assert kernels.pack_mask_from_scores(torch.randn(5, 0, device=DEVICE), 0.0).shape == (5, 0)


@pytest.mark.gpu
def test_autotuned_path():
    # above kernels._TUNE_MIN_MACS the GPU launches go through triton.autotune (bf16, Conv1D weight)
    rows, out_features, in_features = 300, 192, 320
    assert rows * out_features * in_features >= kernels._TUNE_MIN_MACS
    check_all(rows, out_features, in_features, torch.bfloat16, transposed=True)


@given(
    rows=st.integers(1, 130), out_features=st.integers(1, 130), in_features=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES), transposed=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16),
)
@settings(max_examples=12, deadline=None)
def test_hypothesis_shapes(rows, out_features, in_features, dtype, transposed, bias, seed):
    check_all(rows, out_features, in_features, dtype, transposed=transposed, bias=bias, seed=seed)


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (5, 7), (64, 8), (127, 9), (33, 100), (3, 1023)])
def test_pack_matches_numpy_packbits(dtype, out_features, in_features):
    generator = torch.Generator().manual_seed(out_features * 1000 + in_features)
    scores = torch.randn(out_features, in_features, generator=generator).to(device=DEVICE, dtype=dtype)
    threshold = 0.1
    packed = kernels.pack_mask_from_scores(scores, threshold)
    assert packed.dtype == torch.uint8 and packed.shape == (out_features, (in_features + 7) // 8)
    # torch rounds the threshold to the scores' dtype in `scores > threshold`; so must the kernel
    expected = np.packbits((scores > threshold).cpu().numpy(), axis=1, bitorder="little")
    np.testing.assert_array_equal(packed.cpu().numpy(), expected)
    assert torch.equal(unpack(packed, in_features), scores > threshold)


def test_pack_strided_scores_and_threshold_rounding():
    # a transposed view, and a threshold between two fp16 values that rounds up onto one of them
    scores = torch.randn(40, 27, device=DEVICE).t()
    assert not scores.is_contiguous()
    np.testing.assert_array_equal(kernels.pack_mask_from_scores(scores, -0.25).cpu().numpy(),
                                  np.packbits((scores > -0.25).cpu().numpy(), axis=1, bitorder="little"))
    low = torch.tensor(0.1, dtype=torch.float16)
    high = torch.nextafter(low, torch.tensor(1.0, dtype=torch.float16))
    threshold = 0.3 * low.item() + 0.7 * high.item()
    scores = torch.tensor([[low.item(), high.item(), 1.0]], dtype=torch.float16, device=DEVICE)
    assert (scores > threshold).tolist() == [[False, False, True]]
    assert kernels.pack_mask_from_scores(scores, threshold).tolist() == [[0b100]]


@pytest.mark.parametrize("in_features", [1, 7, 9, 33, 100, 1023])
def test_pack_tail_bits_are_zero(in_features):
    packed = kernels.pack_mask_from_scores(torch.ones(5, in_features, device=DEVICE), 0.0)
    full, tail = divmod(in_features, 8)
    assert packed[:, :full].eq(255).all()
    if tail:
        assert packed[:, -1].eq((1 << tail) - 1).all()


def test_pack_then_forward_round_trip():
    x, weight, _, b, _ = make_inputs(7, 33, 100, torch.float32)
    scores = torch.randn(33, 100, device=DEVICE)
    packed = kernels.pack_mask_from_scores(scores, 0.0)
    expected = x.double() @ torch.where(scores > 0, weight.double(), 0.0).T + b.double()
    assert_close(kernels.masked_linear_forward(x, weight, packed, b), expected, torch.float32, "forward")
