"""Reference tier for the gated blend (side-tuning's alpha blend, ladder side-tuning's gate)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pefops.ops import alpha_blend, gated_blend, ladder_gate
from tests.tolerances import assert_close


def naive(a, b, alpha, temperature):
    g = torch.sigmoid(alpha.double().reshape(-1) / temperature)
    g = g.reshape(()) if g.numel() == 1 else g
    return g * a.double() + (1 - g) * b.double()


def inputs(shape, per_channel, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    alpha = torch.randn(shape[-1] if per_channel else 1, generator=generator).requires_grad_()
    return a, b, alpha


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (2, 5, 100)])
def test_matches_formula_with_all_gradients(backend, per_channel, temperature, shape):
    a, b, alpha = inputs(shape, per_channel)
    out = gated_blend(a, b, alpha, temperature, backend=backend)
    expected = naive(a, b, alpha, temperature)
    assert_close(out, expected, torch.float32, "out")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (a, b, alpha), grad)
    want = torch.autograd.grad(expected, (a, b, alpha), grad.double())
    for name, g, w in zip(("da", "db", "dalpha"), got, want):
        assert_close(g, w, torch.float32, name)


@given(rows=st.integers(1, 40), columns=st.integers(1, 70), per_channel=st.booleans())
@settings(max_examples=25, deadline=None)
def test_hypothesis_shapes(rows, columns, per_channel):
    a, b, alpha = inputs((rows, columns), per_channel)
    assert_close(gated_blend(a, b, alpha, 0.1, backend="torch"), naive(a, b, alpha, 0.1), torch.float32, "out")


@pytest.mark.parametrize("per_channel", [False, True])
def test_gradcheck_float64(per_channel):
    a, b, alpha = inputs((5, 6), per_channel, dtype=torch.float64)
    alpha = alpha.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, alpha: gated_blend(a, b, alpha, 0.1, backend="torch"), (a, b, alpha))


def test_alpha_blend_gives_the_base_no_gradient_and_ladder_gate_both():
    a, b, alpha = inputs((4, 8), False)
    out = alpha_blend(a, b, alpha)
    torch.testing.assert_close(out, naive(a, b, alpha, 1.0).float())
    out.sum().backward()
    assert a.grad is None and b.grad is not None and alpha.grad is not None
    a2, b2, alpha2 = inputs((4, 8), True)
    ladder_gate(a2, b2, alpha2).sum().backward()
    assert a2.grad is not None and b2.grad is not None and alpha2.grad.shape == (8,)


def test_low_precision():
    for dtype in (torch.float16, torch.bfloat16):
        a, b, alpha = inputs((9, 40), True, dtype=dtype)
        out = gated_blend(a, b, alpha, 0.1)
        assert out.dtype == dtype
        assert_close(out, naive(a, b, alpha, 0.1), dtype, "out")


def test_opcheck_and_compile():
    a, b, alpha = inputs((6, 10), True)
    torch.library.opcheck(torch.ops.pefops.gated_blend_fwd.default, (a, b, alpha, 0.1, ""))
    torch.library.opcheck(torch.ops.pefops.gated_blend_bwd.default,
                          (torch.randn(6, 10), a.detach(), b.detach(), alpha.detach(), 0.1, [True, True, True], ""))

    def loss(a, b, alpha):
        return ladder_gate(a, b, alpha).square().sum()

    eager = torch.autograd.grad(loss(a, b, alpha), (a, b, alpha))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(a, b, alpha), (a, b, alpha))
    for e, c in zip(eager, compiled):
        assert_close(c, e, torch.float32, "compiled grad")


@pytest.mark.parametrize("call, message", [
    (lambda: gated_blend(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(1)), "one shape"),
    (lambda: gated_blend(torch.randn(3, 4), torch.randn(3, 4).double(), torch.zeros(1)), "share one float dtype"),
    (lambda: gated_blend(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3)), "1 or channels=4"),
    (lambda: gated_blend(torch.randn(3, 4), torch.randn(3, 4), 0.5), "alpha must be a float tensor"),
    (lambda: gated_blend(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(1), 0.0), "temperature must be a positive"),
])
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
