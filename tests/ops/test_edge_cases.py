"""Edge cases of every public op (issue #12), on the torch backend and the Triton backend (under
TRITON_INTERPRET=1 on CPU): double backward through a custom op says so (and a first-order
create_graph=True call still works); zero-size inputs give empty outputs of the right shape and
empty / zero gradients, or a clear error where the op has no meaning."""

import re

import pytest
import torch

from pefops import backend as backends
from tests.ops.edge_inputs import BACKENDS, CALLS


def _available(backend):
    if backend == "triton" and not (backends.triton_interpreter_enabled() or torch.cuda.is_available()):
        pytest.skip("the Triton backend needs TRITON_INTERPRET=1 (set before import) or CUDA")


def _cases():
    for name in CALLS:
        for backend in BACKENDS[name]:
            yield pytest.param(name, backend, id=f"{name}-{backend or 'default'}")


# ------------------------------------------------------------------------------- double backward

# ops whose every path is plain torch autograd on CPU: a second derivative is simply computed
DOUBLE_DIFFERENTIABLE = {"masked_linear_routed", "adapter_fusion"}
MESSAGE_NAME = {"alpha_blend": "gated_blend", "ladder_gate": "gated_blend"}


@pytest.mark.parametrize("name, backend", list(_cases()))
def test_double_backward_says_it_is_not_supported(name, backend):
    _available(backend)
    run, leaves = CALLS[name](backend)
    out = run()
    # first order with create_graph=True works and equals the plain gradient
    plain = torch.autograd.grad(run().square().sum(), leaves, allow_unused=True)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True, allow_unused=True)
    for grad, expected in zip(grads, plain):
        assert (grad is None) == (expected is None)
        if grad is not None:
            torch.testing.assert_close(grad.detach(), expected, rtol=0, atol=0)
    second = sum(grad.square().sum() for grad in grads if grad is not None)
    if name in DOUBLE_DIFFERENTIABLE:
        hessian_terms = torch.autograd.grad(second, leaves, allow_unused=True)
        assert all(term is None or torch.isfinite(term).all() for term in hessian_terms)
        return
    op = MESSAGE_NAME.get(name, name)
    message = re.escape(f"double backward (create_graph=True) through pefops.ops.{op}")
    with pytest.raises(RuntimeError, match=message + ".* is not supported"):
        torch.autograd.grad(second, leaves, allow_unused=True)


def test_double_backward_of_the_eager_lsh_path_says_so_too():
    # the automatic torch choice runs LSH attention through an autograd.Function (no custom op),
    # whose backward computes without a graph: a second derivative must not come back silently
    # without its share
    run, leaves = CALLS["lsh_attention"](None)
    grads = torch.autograd.grad(run().square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=re.escape("through pefops.ops.lsh_attention is not supported")):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    # also when the window is longer than the sequence (the explicit-window path)
    from pefops.ops import lsh_attention

    qk, v = (torch.randn(1, 1, 32, 8, requires_grad=True) for _ in range(2))
    out = lsh_attention(qk, v, num_hashes=1, num_buckets=4, chunk_length=16, num_chunks_before=3, hash_seed=1)
    grads = torch.autograd.grad(out.square().sum(), (qk, v), create_graph=True)
    with pytest.raises(RuntimeError, match=re.escape("through pefops.ops.lsh_attention is not supported")):
        torch.autograd.grad(sum(g.square().sum() for g in grads), (qk, v))


# ------------------------------------------------------------------------------- zero sizes

# (op, the sizes that differ from the call's defaults, the output's shape)
ZERO_SIZE_CASES = [
    ("bottleneck_adapter", dict(batch=0), (0, 3, 8)),
    ("bottleneck_adapter", dict(tokens=0), (2, 0, 8)),
    ("bottleneck_adapter", dict(hidden=0), (2, 3, 0)),
    ("bottleneck_adapter", dict(tokens=0, layer_norm=True), (2, 0, 8)),
    ("multi_adapter", dict(batch=0), (0, 2, 8)),  # a routed batch of no sequences
    ("multi_adapter", dict(tokens=0), (3, 0, 8)),
    ("multi_adapter", dict(hidden=0), (3, 2, 0)),
    ("multi_adapter", dict(batch=0, layer_norm=True), (0, 2, 8)),
    ("adapter_fusion", dict(batch=0), (0, 3, 8)),
    ("adapter_fusion", dict(tokens=0), (2, 0, 8)),
    ("adapter_fusion", dict(hidden=0), (2, 3, 0)),
    ("fusion_mix", dict(rows=0), (0,)),
    ("fusion_mix", dict(units=0), (15,)),  # w [5, 0] and p [5, 3]: the softmax of the bias scores alone
    ("masked_linear", dict(rows=0), (0, 6)),
    ("masked_linear", dict(in_features=0), (4, 6)),  # every output is the bias
    ("masked_linear", dict(out_features=0), (4, 0)),
    ("masked_linear_scores", dict(rows=0), (0, 6)),
    ("masked_linear_scores", dict(in_features=0), (4, 6)),
    ("masked_linear_scores", dict(out_features=0), (4, 0)),
    ("masked_linear_routed", dict(batch=0), (0, 2, 6)),  # a routed batch of no sequences
    ("masked_linear_routed", dict(tokens=0), (3, 0, 6)),
    ("masked_linear_routed", dict(in_features=0), (3, 2, 6)),
    ("masked_linear_routed", dict(out_features=0), (3, 2, 0)),
    ("gated_blend", dict(rows=0), (0, 5)),
    ("gated_blend", dict(channels=0), (4, 0)),
    ("gated_blend", dict(channels=0, per_channel=False), (4, 0)),
    ("alpha_blend", dict(rows=0), (0, 5)),
    ("ladder_gate", dict(rows=0), (0, 5)),
    ("ladder_gate", dict(channels=0), (4, 0)),
    ("prefix_attention", dict(batch=0), (0, 2, 3, 8)),
    ("prefix_attention", dict(queries=0), (2, 2, 0, 8)),
    ("prefix_attention", dict(keys=0), (2, 2, 3, 8)),  # the prefix alone
    ("prefix_attention", dict(keys=0, prefix_length=0), (2, 2, 3, 8)),  # no keys at all: zeros (as SDPA)
    ("prefix_attention", dict(dim=0), (2, 2, 3, 0)),
    ("lsh_attention", dict(batch=0), (0, 2, 32, 8)),
    ("lsh_attention", dict(seq=0), (1, 2, 0, 8)),
    ("lsh_attention", dict(heads=0), (1, 0, 32, 8)),
]

# sizes where the op has no meaning: a clear error (op, sizes, message)
ZERO_SIZE_ERRORS = [
    ("bottleneck_adapter", dict(hidden=0, layer_norm=True), "layer_norm over hidden size 0 has no meaning"),
    ("multi_adapter", dict(hidden=0, layer_norm=True), "layer_norm over hidden size 0 has no meaning"),
    ("lsh_attention", dict(dim=0), "head_dim must be >= 1"),
    ("prefix_attention", dict(heads=0), "k and v must have at least one head"),
]


def _zero_cases():
    for name, sizes, shape in ZERO_SIZE_CASES:
        label = "-".join(f"{key}{value}" for key, value in sizes.items())
        for backend in BACKENDS[name]:
            yield pytest.param(name, sizes, shape, backend, id=f"{name}-{label}-{backend or 'default'}")


def _outputs_and_grads(name, backend, sizes):
    run, leaves = CALLS[name](backend, **sizes)
    out = run()
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)
    return out, leaves, grads


@pytest.mark.parametrize("name, sizes, shape, backend", list(_zero_cases()))
def test_zero_sizes_give_empty_results_and_gradients(name, sizes, shape, backend):
    _available(backend)
    out, leaves, grads = _outputs_and_grads(name, backend, sizes)
    assert tuple(out.shape) == shape
    assert torch.isfinite(out).all()
    for index, (leaf, grad) in enumerate(zip(leaves, grads)):
        if grad is None:  # only alpha_blend's frozen base gets no gradient (by design)
            assert name == "alpha_blend" and index == 0
            continue
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype and torch.isfinite(grad).all()
        if out.numel() == 0:
            assert not grad.any(), f"gradient {index} of an empty output is not zero"
    if name == "prefix_attention" and sizes.get("prefix_length") == 0:
        assert not out.any()
    if backend == "triton":  # the same results as the torch backend's
        expected_out, _, expected_grads = _outputs_and_grads(name, "torch", sizes)
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
        for grad, expected in zip(grads, expected_grads):
            if grad is not None:
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, sizes, message", ZERO_SIZE_ERRORS, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_sizes_without_meaning_say_so(name, sizes, message, backend):
    _available(backend)
    with pytest.raises(ValueError, match=re.escape(message)):
        CALLS[name](backend, **sizes)[0]()


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0), (0, 16)])
def test_pack_mask_of_zero_rows_or_columns(shape):
    from pefops.ops import pack_mask, unpack_mask

    mask = torch.zeros(shape, dtype=torch.bool)
    for packed in (pack_mask(mask), pack_mask(torch.rand(shape), 0.5), pack_mask(mask.long())):
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (shape[0], (shape[1] + 7) // 8)
        assert tuple(unpack_mask(packed, shape[1]).shape) == shape
