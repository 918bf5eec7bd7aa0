"""Triton tier: the gated-blend kernels (kernels/gated_blend.py) under TRITON_INTERPRET=1 on CPU (on
a GPU machine the same tests run on the device), against a float64 reference of
out = g * a + (1 - g) * b, g = sigmoid(alpha / T): the output and every gradient, scalar and
per-channel gate, T = 1 (side-tuning) and 0.1 (ladder side-tuning), odd shapes, row strides,
gradient masks, determinism of the dalpha reduction."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pefops.kernels import gated_blend as kernels
from tests.tolerances import TOLERANCE, assert_close

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(rows, cols, dtype=torch.float32, per_channel=True, temperature=1.0, row_pad=(0, 0, 0), seed=0):
    """a, b, grad as [rows, cols] views with row stride cols + pad (pad 0: contiguous), alpha of
    C elements or one, scaled by T so that alpha / T spreads the gates over (0, 1)."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(pad):
        full = torch.randn(rows, cols + pad, generator=generator).to(dtype)
        return full[:, :cols].to(DEVICE)

    a, b, grad = (tensor(pad) for pad in row_pad)
    alpha = (torch.randn(cols if per_channel else 1, generator=generator) * 1.5 * temperature).to(DEVICE)
    return a, b, alpha, grad


def reference(a, b, alpha, temperature, grad):
    """float64: (out, da, db, dalpha, sum of |dalpha terms| over the same dims)."""
    a, b, grad = a.double(), b.double(), grad.double()
    flat = alpha.double().reshape(-1)
    g = torch.sigmoid(flat / temperature)
    out = g * a + (1 - g) * b
    terms = grad * (a - b) * (g * (1 - g) / temperature)
    if flat.numel() == a.shape[1] and a.shape[1] != 1:
        dalpha, magnitude = terms.sum(0), terms.abs().sum(0)
    else:
        dalpha, magnitude = terms.sum(), terms.abs().sum()
    return out, g * grad, (1 - g) * grad, dalpha.reshape(alpha.shape), magnitude.reshape(alpha.shape)


def assert_dalpha_close(actual, expected, magnitude, dtype, name="dalpha"):
    """A sum of R * C terms: the error is measured against the sum of their magnitudes (the
    products are formed in fp32 from the same rounded inputs, whatever the input dtype)."""
    assert actual.dtype == torch.float32, f"{name}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected).abs()
    bound = TOLERANCE[dtype] * magnitude + 1e-12
    assert bool((error <= bound).all()), f"{name}: max error {error.max().item():.3e}, bound {bound.min().item():.3e}"


def check(rows, cols, dtype=torch.float32, per_channel=True, temperature=1.0, row_pad=(0, 0, 0), seed=0):
    a, b, alpha, grad = make_inputs(rows, cols, dtype, per_channel, temperature, row_pad, seed)
    out_ref, da_ref, db_ref, dalpha_ref, magnitude = reference(a, b, alpha, temperature, grad)
    out = kernels.gated_blend_forward(a, b, alpha, temperature)
    assert out.dtype == dtype and out.shape == (rows, cols) and out.is_contiguous()
    assert_close(out, out_ref, dtype, "out")
    da, db, dalpha = kernels.gated_blend_backward(grad, a, b, alpha, temperature, True, True, True)
    assert da.dtype == dtype and db.dtype == dtype
    assert_close(da, da_ref, dtype, "da")
    assert_close(db, db_ref, dtype, "db")
    assert_dalpha_close(dalpha, dalpha_ref, magnitude, dtype)


SHAPES = [(1, 1), (1, 1023), (7, 7), (7, 100), (33, 33), (33, 1023), (123, 7), (123, 100), (123, 1023),
          (1025, 1), (1025, 7), (1025, 33), (1025, 100)]


@pytest.mark.parametrize("rows,cols", SHAPES, ids=lambda v: str(v))
def test_shapes_fp32(rows, cols):
    for per_channel, temperature in ((False, 1.0), (True, 0.1)):
        check(rows, cols, per_channel=per_channel, temperature=temperature, seed=rows * cols)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_dtypes_gates_temperatures(dtype, per_channel, temperature):
    check(123, 100, dtype, per_channel, temperature, row_pad=(3, 0, 28))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_strides(dtype):
    # every input its own row stride (a view of a wider tensor); then a view with row stride 100 whose
    # base is 5 elements into its storage (not 16-byte aligned)
    check(33, 100, dtype, per_channel=True, temperature=0.1, row_pad=(1, 17, 64))
    a, b, alpha, grad = make_inputs(40, 36, dtype, per_channel=False)
    a_wide = torch.zeros(80, 50, dtype=dtype, device=DEVICE)
    a_wide[::2, 5:41] = a
    a_view = a_wide[::2, 5:41]  # row stride 100, offset 5 elements: unaligned base
    out_ref, da_ref, db_ref, dalpha_ref, magnitude = reference(a, b, alpha, 1.0, grad)
    assert_close(kernels.gated_blend_forward(a_view, b, alpha, 1.0), out_ref, dtype, "out")
    da, db, dalpha = kernels.gated_blend_backward(grad, a_view, b, alpha, 1.0, True, True, True)
    assert_close(da, da_ref, dtype, "da")
    assert_close(db, db_ref, dtype, "db")
    assert_dalpha_close(dalpha, dalpha_ref, magnitude, dtype)


@pytest.mark.parametrize("need_a", [False, True])
@pytest.mark.parametrize("need_b", [False, True])
@pytest.mark.parametrize("need_alpha", [False, True])
def test_gradient_masks(need_a, need_b, need_alpha):
    a, b, alpha, grad = make_inputs(37, 70, torch.float32, per_channel=True, temperature=0.1, seed=5)
    _, da_ref, db_ref, dalpha_ref, magnitude = reference(a, b, alpha, 0.1, grad)
    da, db, dalpha = kernels.gated_blend_backward(grad, a, b, alpha, 0.1, need_a, need_b, need_alpha)
    for result, needed, expected, name in ((da, need_a, da_ref, "da"), (db, need_b, db_ref, "db")):
        if needed:
            assert_close(result, expected, torch.float32, name)
        else:
            assert result is None, name
    if need_alpha:
        assert_dalpha_close(dalpha, dalpha_ref, magnitude, torch.float32)
    else:
        assert dalpha is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_side_tuning_and_ladder_calls(dtype):
    # side-tuning: alpha_blend(base, side, alpha), T = 1, the frozen base gets no gradient
    base, side, alpha, grad = make_inputs(50, 96, dtype, per_channel=False, seed=11)
    _, _, db_ref, dalpha_ref, magnitude = reference(base, side, alpha, 1.0, grad)
    da, db, dalpha = kernels.gated_blend_backward(grad, base, side, alpha, 1.0, need_a=False, need_b=True,
                                                  need_alpha=True)
    assert da is None
    assert_close(db, db_ref, dtype, "d side")
    assert_dalpha_close(dalpha, dalpha_ref, magnitude, dtype)
    # ladder side-tuning: per-channel gate, T = 0.1, gradients for both inputs
    check(50, 96, dtype, per_channel=True, temperature=0.1, seed=12)


def test_alpha_shapes():
    # dalpha takes alpha's shape: 0-d, [1], [C], [1, C]; C = 1 with one alpha is both modes at once
    a, b, _, grad = make_inputs(9, 20)
    for alpha in (torch.tensor(0.3), torch.tensor([0.3]), torch.randn(20), torch.randn(1, 20)):
        alpha = alpha.to(DEVICE)
        out_ref, _, _, dalpha_ref, magnitude = reference(a, b, alpha, 0.5, grad)
        assert_close(kernels.gated_blend_forward(a, b, alpha, 0.5), out_ref, torch.float32, "out")
        _, _, dalpha = kernels.gated_blend_backward(grad, a, b, alpha, 0.5, False, False, True)
        assert_dalpha_close(dalpha, dalpha_ref, magnitude, torch.float32)
    check(9, 1, per_channel=True)


def test_multi_tile_programs_and_determinism(monkeypatch):
    # Few programs, so each walks several BLOCK_R tiles (on a GPU that happens from ~2048 programs'
    # worth of rows up); dalpha must be bit-identical run to run.
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 3)
    for per_channel in (False, True):
        a, b, alpha, grad = make_inputs(301, 300, torch.float32, per_channel, temperature=0.1, seed=3)
        block_r, block_c, _ = kernels._block_sizes(301, 300)
        row_programs, _, rows_per_program = kernels._backward_grid(301, 300, block_r, block_c)
        assert rows_per_program > block_r and row_programs > 1
        _, da_ref, db_ref, dalpha_ref, magnitude = reference(a, b, alpha, 0.1, grad)
        first = kernels.gated_blend_backward(grad, a, b, alpha, 0.1, True, True, True)
        second = kernels.gated_blend_backward(grad, a, b, alpha, 0.1, True, True, True)
        assert_close(first[0], da_ref, torch.float32, "da")
        assert_close(first[1], db_ref, torch.float32, "db")
        assert_dalpha_close(first[2], dalpha_ref, magnitude, torch.float32)
        assert torch.equal(first[2], second[2])


def test_determinism_default_grid():
    for per_channel in (False, True):
        a, b, alpha, grad = make_inputs(257, 300, torch.bfloat16, per_channel, seed=4)
        results = [kernels.gated_blend_backward(grad, a, b, alpha, 1.0, False, True, True) for _ in range(2)]
        assert torch.equal(results[0][2], results[1][2])
        assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("rows,cols", [(0, 16), (0, 1), (5, 0), (0, 0)])
def test_empty(rows, cols):
    a = torch.empty(rows, cols, device=DEVICE)
    for alpha in (torch.zeros(1, device=DEVICE), torch.zeros(max(cols, 1), device=DEVICE)[:cols or 1]):
        out = kernels.gated_blend_forward(a, a, alpha, 1.0)
        assert out.shape == (rows, cols)
        da, db, dalpha = kernels.gated_blend_backward(a, a, a, alpha, 0.1, True, True, True)
        assert da.shape == db.shape == (rows, cols)
        assert dalpha.shape == alpha.shape and dalpha.dtype == torch.float32 and not dalpha.any()


def test_invalid_inputs():
    a = torch.randn(4, 6, device=DEVICE)
    alpha = torch.zeros(1, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        kernels.gated_blend_forward(a, torch.randn(4, 5, device=DEVICE), alpha, 1.0)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        kernels.gated_blend_forward(a, a.half(), alpha, 1.0)
    with pytest.raises(ValueError, match="1 or C"):
        kernels.gated_blend_forward(a, a, torch.zeros(3, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        kernels.gated_blend_forward(a, a, alpha, 0.0)
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.gated_blend_forward(a.t(), torch.randn(6, 4, device=DEVICE), alpha, 1.0)


@given(
    rows=st.integers(1, 150), cols=st.integers(1, 300), dtype=st.sampled_from(DTYPES), per_channel=st.booleans(),
    temperature=st.sampled_from([1.0, 0.1, 2.5]), pads=st.tuples(*[st.sampled_from([0, 1, 8])] * 3),
)
@settings(max_examples=12, deadline=None)
def test_hypothesis_shapes(rows, cols, dtype, per_channel, temperature, pads):
    check(rows, cols, dtype, per_channel, temperature, row_pad=pads, seed=rows + 1000 * cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_ops_through_triton(dtype):
    # pefops.ops.alpha_blend / ladder_gate with backend="triton": custom ops, autograd, launchers
    from pefops.ops import alpha_blend, ladder_gate
    from tests.tolerances import assert_close as close

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(9, 40, generator=generator).to(dtype).to(device).requires_grad_()
    b = torch.randn(9, 40, generator=generator).to(dtype).to(device).requires_grad_()
    alpha = torch.randn(40, generator=generator).to(device).requires_grad_()
    for op, temperature in ((alpha_blend, 1.0), (ladder_gate, 0.1)):
        out = op(a, b, alpha, backend="triton") if op is alpha_blend else op(a, b, alpha, temperature, backend="triton")
        gate = torch.sigmoid(alpha.double() / temperature)
        expected = gate * a.double() + (1 - gate) * b.double()
        close(out, expected, dtype, f"{op.__name__} out")
        grad = torch.randn_like(out)
        wanted = [t for t in (a, b, alpha) if not (op is alpha_blend and t is a)]
        got = torch.autograd.grad(out, wanted, grad)
        reference = torch.autograd.grad(expected, wanted, grad.double())
        for g, r in zip(got, reference):
            close(g, r, dtype, f"{op.__name__} grad", tolerance=(2e-2 if dtype == torch.bfloat16 else 1e-4))
