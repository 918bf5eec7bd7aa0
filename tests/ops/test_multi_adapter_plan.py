"""multi_adapter plans a routing index once (issue #13): the forward and backward of every layer that
gets the same index tensor reuse one plan (its flat copy, the kernels' row grouping and work tables,
the torch backend's padded layout); an in-place edit of the index or a new index tensor makes a new
plan, and results and gradients stay those of the reference."""

import importlib

import pytest
import torch

from pefops.ops import multi_adapter, multi_adapter_ref
from tests.host_sync import no_host_sync
from tests.tolerances import assert_close

module = importlib.import_module("pefops.ops.multi_adapter")  # the module, not the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (tests/conftest.py)
ADAPTERS, RANK, HIDDEN = 3, 4, 16


def _weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((ADAPTERS, RANK, HIDDEN), (ADAPTERS, RANK), (ADAPTERS, HIDDEN, RANK), (ADAPTERS, HIDDEN))
    return [(torch.randn(shape, generator=generator) * 0.5).to(DEVICE).requires_grad_() for shape in shapes]


def _x(batch=5, seq=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, HIDDEN, generator=generator).to(DEVICE).requires_grad_()


def _layer(x, index, weights, backend):
    return multi_adapter(x, index, *weights, activation="gelu", scaling=0.5, backend=backend)


def _check(x, index, weights, backend):
    """One layer's output and gradients against the reference (which never uses a plan)."""
    out = _layer(x, index, weights, backend)
    grads = torch.autograd.grad(out.square().sum(), [x, *weights])
    ref = multi_adapter_ref(x, index.to(x.device), *weights, activation="gelu", scaling=0.5)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *weights])
    assert_close(out, ref, torch.float32, "out")
    for name, actual, wanted in zip(("x", "dw", "db", "uw", "ub"), grads, ref_grads):
        assert_close(actual, wanted, torch.float32, name)


def _builds():
    return module.PLAN_STATS["plans"]


@pytest.mark.triton
def test_triton_layers_share_one_plan_and_its_work_tables():
    weights, other = _weights(0), _weights(2)
    index = torch.tensor([2, 0, 1, 2, 0], device=DEVICE)
    before = _builds()
    x = _x()
    out1 = _layer(x, index, weights, "triton")
    plan = module._routing_plan(index, tuple(x.shape[:-1]), ADAPTERS, x.device)
    groups = plan.groups()
    tables = groups.work_tables_built
    # a second layer (other weights) and the backward of both: the same plan, no new work table, and
    # no host read at all (the grouping is cached)
    with no_host_sync():
        out2 = _layer(out1, index, other, "triton")
        out2.square().sum().backward()
    assert _builds() == before + 1
    assert plan.groups() is groups and groups.work_tables_built == tables <= 2
    ref = multi_adapter_ref(multi_adapter_ref(x, index, *weights, activation="gelu", scaling=0.5), index, *other,
                            activation="gelu", scaling=0.5)
    assert_close(out2, ref, torch.float32, "two layers")


@pytest.mark.triton
def test_triton_in_place_edit_and_new_index_replan():
    weights = _weights()
    index = torch.tensor([2, 0, 1, 2, 0], device=DEVICE)
    before = _builds()
    _check(_x(), index, weights, "triton")
    index[1] = 2  # in place: its _version moves, the old grouping would route row 1 to adapter 0
    _check(_x(), index, weights, "triton")
    assert _builds() == before + 2
    _check(_x(), torch.tensor([1, 1, 0, 0, 2], device=DEVICE), weights, "triton")  # a new tensor
    assert _builds() == before + 3


@pytest.mark.triton
def test_triton_backward_after_the_index_changed():
    # the forward's plan (its own copy of the index) serves the backward even after the caller
    # edited its tensor and a second forward planned the new values
    weights = _weights()
    index = torch.tensor([2, 0, 1, 2, 0], device=DEVICE)
    x = _x()
    out = _layer(x, index, weights, "triton")
    ref = multi_adapter_ref(x, index.clone(), *weights, activation="gelu", scaling=0.5)
    index.fill_(1)
    _layer(_x(), index, weights, "triton")
    grads = torch.autograd.grad(out.square().sum(), [x, *weights])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *weights])
    for name, actual, wanted in zip(("x", "dw", "db", "uw", "ub"), grads, ref_grads):
        assert_close(actual, wanted, torch.float32, name)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_torch_layers_share_one_padding(backend):
    weights = _weights()
    index = torch.tensor([2, 0, 1, 2, 0])
    plans, paddings = _builds(), module.PLAN_STATS["paddings"]
    for _ in range(3):  # three layers, forward and backward
        _check(_x(), index, weights, backend)
    assert _builds() == plans + 1
    assert module.PLAN_STATS["paddings"] == paddings + 1
    index[0] = 1
    _check(_x(), index, weights, backend)
    assert _builds() == plans + 2 and module.PLAN_STATS["paddings"] == paddings + 2


def test_the_plan_depends_on_the_rows_per_index():
    # an index per sequence broadcast over two sequence lengths: two plans, each right
    weights = _weights()
    index = torch.tensor([2, 0, 1, 2, 0])
    before = _builds()
    _check(_x(seq=3), index, weights, None)
    _check(_x(seq=4), index, weights, None)
    assert _builds() == before + 2
    _check(_x(seq=3), index, weights, None)  # still cached
    assert _builds() == before + 2


def test_out_of_range_cpu_index_raises_every_call():
    weights = _weights()
    index = torch.tensor([0, 3, 1, 0, 0])
    for _ in range(2):  # a failed plan is not cached
        with pytest.raises(ValueError, match="adapter_index values must lie in \\[0, 3\\)"):
            _layer(_x(), index, weights, None)
    index[1] = 2
    _check(_x(), index, weights, None)


def test_the_plan_owns_its_index():
    # an int64 [rows] index is used as given by the reference; the plan keeps its own copy
    x = torch.randn(6, HIDDEN)
    index = torch.tensor([2, 0, 1, 1, 2, 0])
    plan = module._routing_plan(index, tuple(x.shape[:-1]), ADAPTERS, x.device)
    assert plan.index.untyped_storage().data_ptr() != index.untyped_storage().data_ptr()
    assert torch.equal(plan.index, index)


def test_inference_tensors_are_planned_every_call():
    weights = [w.detach() for w in _weights()]
    x = _x().detach()
    with torch.inference_mode():
        index = torch.tensor([2, 0, 1, 2, 0])
        before = _builds()
        first = _layer(x, index, weights, None)
        index[0] = 1  # no version counter to see this by: a fresh plan each call is what keeps it right
        second = _layer(x, index, weights, None)
        assert _builds() == before + 2
        assert_close(second, multi_adapter_ref(x, index, *weights, activation="gelu", scaling=0.5), torch.float32,
                     "out")
        assert not torch.equal(first, second)


def test_index_on_another_device_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (a CUDA index with a CPU x)")
    with pytest.raises(ValueError, match="adapter_index must be on x's device cpu or on the CPU"):
        multi_adapter(torch.randn(2, HIDDEN), torch.tensor([0, 1], device="cuda"),
                      *[w.detach().cpu() for w in _weights()])


@pytest.mark.gpu
def test_cpu_index_for_cuda_x():
    # planned on the host, copied over without a sync; results as with the index on the device
    weights = _weights()
    index = torch.tensor([2, 0, 1, 2, 0])
    _check(_x(), index, weights, None)
    _check(_x(), index, weights, "triton")
