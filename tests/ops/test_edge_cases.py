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
