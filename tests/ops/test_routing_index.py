"""Routing indices (issue #12): every layer that keeps a routing index keeps its own copy (the
caller editing its tensor in place afterwards changes nothing), and float / bool task indices are
refused with the same message wherever an index is accepted, never truncated."""

import pytest
import torch

from pefops.nn import MaskedLinear
from pefops.ops import masked_linear_routed, multi_adapter, pack_mask, unpack_mask
from tests.masked_inputs import naive_masked_linear
from tests.tolerances import assert_close

BAD_INDICES = [
    pytest.param(torch.tensor([0.0, 1.0, 1.7]), id="float"),
    pytest.param(torch.tensor([False, True, True]), id="bool"),
    pytest.param(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), id="float64"),
]


def _adapters(adapters=3, rank=4, hidden=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((adapters, rank, hidden), (adapters, rank), (adapters, hidden, rank), (adapters, hidden))
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("backend", [None, "torch"])
def test_multi_adapter_owns_its_index(backend):
    # the custom op saves the index for backward: an in-place edit of the caller's tensor after the
    # forward must neither change the gradients nor break the backward
    weights = _adapters()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    index = torch.tensor([2, 0, 1, 1, 2, 0])  # one per row: int64 [rows] is used as given, no conversion copy
    out = multi_adapter(x, index, *weights, backend=backend)
    expected_out = multi_adapter(x, index.clone(), *weights, backend=backend)
    expected = torch.autograd.grad(expected_out.square().sum(), [x, *weights])
    index.fill_(0)
    grads = torch.autograd.grad(out.square().sum(), [x, *weights])
    for name, actual, wanted in zip(("x", "dw", "db", "uw", "ub"), grads, expected):
        assert_close(actual, wanted, torch.float32, name)


@pytest.mark.parametrize("index", BAD_INDICES)
def test_multi_adapter_refuses_float_and_bool_indices(index):
    with pytest.raises(ValueError, match="adapter_index must be an integer tensor.*float and bool indices are refused"):
        multi_adapter(torch.randn(3, 8), index, *_adapters())


def _masks(tasks=3, out_features=6, in_features=11):
    return torch.stack([pack_mask(torch.rand(out_features, in_features, generator=torch.Generator().manual_seed(t))
                                  > 0.5) for t in range(tasks)])


@pytest.mark.parametrize("index", BAD_INDICES)
def test_masked_linear_routed_refuses_float_and_bool_indices(index):
    weight = torch.randn(6, 11)
    with pytest.raises(ValueError, match="row_task must be an integer tensor.*float and bool indices are refused"):
        masked_linear_routed(torch.randn(3, 2, 11), weight, _masks(), index)


@pytest.mark.parametrize("index", BAD_INDICES)
def test_masked_linear_set_row_masks_refuses_float_and_bool_indices(index):
    layer = MaskedLinear(torch.randn(6, 11)).freeze()
    with pytest.raises(ValueError, match="row_task must be an integer tensor.*float and bool indices are refused"):
        layer.set_row_masks(_masks(), index)
    with pytest.raises(ValueError, match="row_task must be an integer tensor"):
        layer.set_row_masks(_masks(), None)
    with pytest.raises(ValueError, match="row_task values must be in \\[-1, 3\\)"):  # -1: the weight unmasked
        layer.set_row_masks(_masks(), torch.tensor([0, 3, 1]))


def test_masked_linear_set_row_masks_owns_its_index():
    weight = torch.randn(6, 11, generator=torch.Generator().manual_seed(2))
    layer = MaskedLinear(weight).freeze()
    masks = _masks()
    task = torch.tensor([2, 0, 1])
    layer.set_row_masks(masks, task)
    task.fill_(0)  # the caller reuses its tensor: the layer's routing must not change
    x = torch.randn(3, 2, 11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = layer(x)
    for row, t in enumerate((2, 0, 1)):
        expected = naive_masked_linear(x[row], weight, unpack_mask(masks[t], 11), None)
        assert_close(out[row], expected, torch.float32, f"row {row}")


def test_hf_row_routing_owns_its_index():
    pytest.importorskip("transformers")
    from pefops.hf.adapters import RowRouting

    index = torch.tensor([1, 0, 1])
    routing = RowRouting(["a", "b"], index)
    index.fill_(0)
    assert routing.row_adapter.tolist() == [1, 0, 1]
    for bad in (torch.tensor([0.0, 1.0]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="row_adapter must be an integer tensor"):
            RowRouting(["a", "b"], bad)


def test_hf_set_row_masks_refuses_float_and_bool_indices():
    pytest.importorskip("transformers")
    import pefops.hf as hf

    model = torch.nn.Sequential(MaskedLinear(torch.randn(6, 11)).freeze())
    for bad in (torch.tensor([0.0, 1.0]), torch.tensor([True, False])):
        # refused before any file is opened (the paths do not exist)
        with pytest.raises(ValueError, match="row_task must be an integer tensor.*float and bool indices are refused"):
            hf.set_row_masks(model, ["/nonexistent/a.safetensors"], bad)
