"""Reference tier for fusion_mix, the fused middle of AdapterFusion: the vectorised reference and the
torch backend's custom ops against a naive loop over adapters (outputs and every gradient, with a
nonzero gradient for p), float64 gradcheck, opcheck, torch.compile, the dropout mask, errors."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pefops import backend as backends
from pefops.ops.fusion_mix import fusion_mix, fusion_mix_ref, segment_membership
from tests.tolerances import assert_close


def offsets_of(sizes):
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return torch.tensor(offsets)


def naive(t, a, bias, offsets, temperature, mask=None):
    """float64, one adapter at a time: (w, p)."""
    t, a, bias = t.double(), a.double(), bias.double()
    bounds = offsets.tolist()
    columns = []
    for i in range(len(bounds) - 1):
        units = slice(bounds[i], bounds[i + 1])
        columns.append((t[..., units] * a[..., units]).sum(-1) + bias[..., i])
    scores = torch.stack(columns, dim=-1)
    if mask is not None:
        scores = scores * mask.double()
    p = torch.softmax(scores / temperature, dim=-1)
    w = torch.cat([a[..., bounds[i]:bounds[i + 1]] * p[..., i:i + 1] for i in range(len(bounds) - 1)], dim=-1)
    return w, p


def inputs(rows, sizes, dtype=torch.float32, mask=False, seed=0, leading=()):
    generator = torch.Generator().manual_seed(seed)
    units, adapters = sum(sizes), len(sizes)
    shape = (*leading, rows)

    def tensor(*last, scale=1.0):
        return (torch.randn(*shape, *last, generator=generator, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    t, a = tensor(units, scale=0.5), tensor(units)
    bias = tensor(adapters)
    dropout = None
    if mask:
        keep = torch.rand(*shape, adapters, generator=generator) > 0.3
        dropout = (keep.to(torch.float64) / 0.7).to(dtype)
    return t, a, bias, offsets_of(sizes), dropout


SIZES = [[1], [7], [3, 1, 5], [4, 4], [2, 0, 3], [1, 7, 16, 3, 9, 1, 2, 30]]


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_matches_naive_loop_with_all_gradients(backend, mask, sizes, rows):
    t, a, bias, offsets, dropout = inputs(rows, sizes, mask=mask, seed=rows + len(sizes))
    w, p = fusion_mix(t, a, bias, offsets, 0.7, dropout, backend=backend)
    w_ref, p_ref = naive(t, a, bias, offsets, 0.7, dropout)
    assert w.dtype == p.dtype == torch.float32 and w.shape == a.shape and p.shape == bias.shape
    assert_close(w, w_ref, torch.float32, "w")
    assert_close(p, p_ref, torch.float32, "p")
    dw, dp = torch.randn_like(w), torch.randn_like(p)
    got = torch.autograd.grad((w, p), (t, a, bias), (dw, dp))
    want = torch.autograd.grad((w_ref, p_ref), (t, a, bias), (dw.double(), dp.double()))
    for name, g, r in zip(("dt", "da", "dbias"), got, want):
        assert_close(g, r, torch.float32, name)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_leading_dims_and_partial_gradients(backend):
    t, a, bias, offsets, dropout = inputs(5, [3, 6], mask=True, leading=(2,))
    w, p = fusion_mix(t, a, bias, offsets, 2.0, dropout, backend=backend)
    w_ref, p_ref = naive(t, a, bias, offsets, 2.0, dropout)
    assert w.shape == (2, 5, 9) and p.shape == (2, 5, 2)
    assert_close(w, w_ref, torch.float32, "w")
    assert_close(p, p_ref, torch.float32, "p")
    # only bias_scores needs a gradient (frozen adapters): the others stay None
    t2, a2 = t.detach(), a.detach()
    w, p = fusion_mix(t2, a2, bias, offsets, 2.0, dropout, backend=backend)
    (w.sum() + p[..., 0].sum()).backward()
    w_ref, p_ref = naive(t2, a2, bias, offsets, 2.0, dropout)
    (expected,) = torch.autograd.grad(w_ref.sum() + p_ref[..., 0].sum(), bias)
    assert_close(bias.grad, expected, torch.float32, "dbias")
    # a gradient through w alone (p unused) and through p alone
    for use_w, use_p in ((True, False), (False, True)):
        t3, a3, bias3 = (x.detach().requires_grad_() for x in (t, a, bias))
        w, p = fusion_mix(t3, a3, bias3, offsets, 2.0, backend=backend)
        w_ref, p_ref = naive(t3, a3, bias3, offsets, 2.0)
        loss = (w.square().sum() if use_w else 0) + (p.square().sum() if use_p else 0)
        loss_ref = (w_ref.square().sum() if use_w else 0) + (p_ref.square().sum() if use_p else 0)
        for g, r in zip(torch.autograd.grad(loss, (t3, a3, bias3)), torch.autograd.grad(loss_ref, (t3, a3, bias3))):
            assert_close(g, r, torch.float32, "grad")


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_gradcheck_float64_through_the_custom_ops(mask):
    t, a, bias, offsets, dropout = inputs(4, [2, 1, 3], torch.float64, mask=mask)

    def custom(t, a, bias):
        return fusion_mix(t, a, bias, offsets, 0.5, dropout, backend="torch")

    def reference(t, a, bias):
        return fusion_mix_ref(t, a, bias, offsets, 0.5, dropout)

    assert torch.autograd.gradcheck(custom, (t, a, bias))
    assert torch.autograd.gradgradcheck(reference, (t, a, bias))
    assert torch.autograd.gradcheck(reference, (t, a, bias))


def test_opcheck():
    t, a, bias, offsets, dropout = inputs(6, [3, 1, 4], mask=True)
    for mask in (None, dropout):
        torch.library.opcheck(torch.ops.pefops.fusion_mix_fwd.default, (t, a, bias, offsets, 0.7, mask, ""))
    w, p = fusion_mix(t, a, bias, offsets, 0.7, dropout, backend="torch")
    saved = (t.detach(), a.detach(), p.detach(), offsets, 0.7, dropout)
    for grad_mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.pefops.fusion_mix_bwd.default,
                              (torch.randn(6, 8), torch.randn(6, 3), *saved, grad_mask, ""))


def test_compile_fullgraph_equals_eager():
    t, a, bias, offsets, dropout = inputs(9, [5, 2, 6], mask=True)

    def loss(t, a, bias, mask):
        w, p = fusion_mix(t, a, bias, offsets, 0.7, mask)
        return w.square().sum() + (p * torch.arange(3.0)).sum()

    for mask in (None, dropout):
        eager_loss = loss(t, a, bias, mask)
        eager = torch.autograd.grad(eager_loss, (t, a, bias))
        compiled_loss = torch.compile(loss, fullgraph=True)(t, a, bias, mask)
        compiled = torch.autograd.grad(compiled_loss, (t, a, bias))
        assert_close(compiled_loss, eager_loss, torch.float32, "loss")
        for e, c in zip(eager, compiled):
            assert_close(c, e, torch.float32, "compiled grad")


def test_dropout_mask_semantics():
    t, a, bias, offsets, _ = inputs(5, [2, 3, 1])
    # a mask of ones changes nothing; an all-zero row gives uniform weights; the mask scales the scores
    w, p = fusion_mix(t, a, bias, offsets, 1.0)
    w1, p1 = fusion_mix(t, a, bias, offsets, 1.0, torch.ones(5, 3))
    torch.testing.assert_close(w1, w)
    torch.testing.assert_close(p1, p)
    mask = torch.ones(5, 3)
    mask[2] = 0.0
    mask[3, 1] = 2.5
    _, p2 = fusion_mix(t, a, bias, offsets, 1.0, mask)
    torch.testing.assert_close(p2[2], torch.full((3,), 1 / 3))
    _, p_ref = naive(t, a, bias, offsets, 1.0, mask)
    assert_close(p2, p_ref, torch.float32, "p")
    # drawn as adapter_fusion draws it: F.dropout of ones, i.e. 0 or 1 / (1 - p)
    torch.manual_seed(0)
    drawn = torch.nn.functional.dropout(torch.ones(5, 3), 0.4, True)
    kept = drawn[drawn != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_low_precision(dtype, backend):
    t, a, bias, offsets, dropout = inputs(11, [3, 8, 1], dtype, mask=True)
    w, p = fusion_mix(t, a, bias, offsets, 0.7, dropout, backend=backend)
    assert w.dtype == p.dtype == dtype
    w_ref, p_ref = naive(t, a, bias, offsets, 0.7, dropout)
    assert_close(w, w_ref, dtype, "w")
    assert_close(p, p_ref, dtype, "p")
    dw, dp = torch.randn_like(w), torch.randn_like(p)
    got = torch.autograd.grad((w, p), (t, a, bias), (dw, dp))
    want = torch.autograd.grad((w_ref, p_ref), (t, a, bias), (dw.double(), dp.double()))
    for name, g, r in zip(("dt", "da", "dbias"), got, want):
        assert g.dtype == dtype
        assert_close(g, r, dtype, name)


@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       rows=st.integers(1, 20), temperature=st.sampled_from([0.3, 1.0, 50.0]))
@settings(max_examples=20, deadline=None)
def test_hypothesis_segments(sizes, rows, temperature):
    t, a, bias, offsets, _ = inputs(rows, sizes, seed=rows)
    w, p = fusion_mix(t, a, bias, offsets, temperature, backend="torch")
    w_ref, p_ref = naive(t, a, bias, offsets, temperature)
    assert_close(w, w_ref, torch.float32, "w")
    assert_close(p, p_ref, torch.float32, "p")


def test_membership_and_empty_inputs():
    membership = segment_membership(offsets_of([2, 0, 1]), 3)
    assert membership.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    for backend in (None, "torch"):
        t, a, bias, offsets, _ = inputs(0, [2, 3])
        w, p = fusion_mix(t, a, bias, offsets, 1.0, backend=backend)
        assert w.shape == (0, 5) and p.shape == (0, 2)
        (w.sum() + p.sum()).backward()
        assert t.grad.shape == (0, 5) and bias.grad.shape == (0, 2)


def test_triton_backend_declares_its_limits():
    triton_impl = backends.implementations("fusion_mix")["triton"]
    device = torch.device("cuda")
    assert triton_impl.limits(backends.Problem(device, torch.float32, "forward", {"units": 512, "adapters": 64})) == []
    reasons = triton_impl.limits(backends.Problem(device, torch.float32, "forward", {"units": 512, "adapters": 65}))
    assert reasons and "at most 64" in reasons[0]
    # without the interpreter forced, CPU tensors are served by the torch reference automatically
    problem = backends.Problem(torch.device("cpu"), torch.float32, "forward", {"units": 8, "adapters": 2})
    assert backends.select("fusion_mix", problem).backend == "torch"


def _call(**overrides):
    t, a, bias, offsets, _ = inputs(3, [2, 2])
    arguments = dict(t_=t, a=a, bias_scores=bias, segment_offsets=offsets, temperature=1.0, dropout_mask=None)
    arguments.update(overrides)
    return fusion_mix(**arguments)


@pytest.mark.parametrize("overrides, message", [
    (dict(a=torch.randn(3, 5)), "one shape"),
    (dict(bias_scores=torch.randn(4, 2)), "leading dims"),
    (dict(a=torch.randn(3, 4).double()), "share one float dtype"),
    (dict(t_=torch.randn(3, 4).int(), a=torch.randn(3, 4).int()), "share one float dtype"),
    (dict(bias_scores=torch.randn(3, 0), segment_offsets=torch.tensor([0])), "at least one adapter"),
    (dict(segment_offsets=torch.tensor([0, 4])), r"int tensor \[N \+ 1 = 3\]"),
    (dict(segment_offsets=torch.tensor([0.0, 2.0, 4.0])), "int tensor"),
    (dict(segment_offsets=torch.tensor([0, 2, 5])), "rise from 0 to R = 4"),
    (dict(segment_offsets=torch.tensor([1, 2, 4])), "rise from 0"),
    (dict(segment_offsets=torch.tensor([0, 5, 4])), "never falling"),
    (dict(dropout_mask=torch.ones(3, 3)), "dropout_mask must be"),
    (dict(dropout_mask=torch.ones(3, 2, dtype=torch.bool)), "float tensor"),
    (dict(temperature=0.0), "temperature must be a positive"),
    (dict(temperature=True), "temperature must be a positive"),
    (dict(t_="x"), "must be a tensor"),
])
def test_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.clear_selection_cache()
    try:
        with pytest.raises(backends.BackendNotSupportedError, match="TRITON_INTERPRET"):
            fusion_mix(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 2), offsets_of([2, 2]), backend="triton")
    finally:
        backends.clear_selection_cache()
