"""pefops.nn.MaskedLinear: the authors' score initialisation, training and inference forms, Conv1D
weights used in place, task switching without copying the weight."""

import pytest
import torch

from pefops.nn import MaskedLinear
from pefops.ops import pack_mask, unpack_mask
from tests.masked_inputs import naive_masked_linear
from tests.tolerances import assert_close


@pytest.mark.parametrize("threshold, sparsity", [(1e-2, 0.5), (0.0, 0.3), (5e-2, 0.9)])
def test_initial_masked_out_fraction_equals_init_sparsity(threshold, sparsity):
    torch.manual_seed(0)
    layer = MaskedLinear.from_linear(torch.nn.Linear(512, 512), threshold=threshold, init_sparsity=sparsity)
    assert abs((1 - layer.density()) - sparsity) < 0.01
    assert layer.scores.min() >= -0.02 and layer.scores.max() <= (0.02 + threshold) / sparsity - 0.02


def test_weight_is_shared_not_copied_and_frozen():
    linear = torch.nn.Linear(16, 8)
    layer = MaskedLinear.from_linear(linear, train_bias=True)
    assert layer.weight is linear.weight and not layer.weight.requires_grad
    assert layer.bias.requires_grad and layer.scores.requires_grad


def test_training_form_equals_formula_and_freeze_keeps_outputs():
    torch.manual_seed(0)
    layer = MaskedLinear.from_linear(torch.nn.Linear(24, 10))
    x = torch.randn(3, 5, 24)
    mask = layer.scores.detach() > layer.threshold
    expected = naive_masked_linear(x.reshape(-1, 24), layer.weight, mask, layer.bias).reshape(3, 5, 10)
    assert_close(layer(x), expected, torch.float32, "training form")
    layer(x).sum().backward()
    assert layer.scores.grad is not None and layer.weight.grad is None
    layer.freeze()
    assert layer.frozen and layer.mask.dtype == torch.uint8 and layer.scores is None
    assert torch.equal(unpack_mask(layer.mask, 24), mask)
    with torch.no_grad():
        assert_close(layer(x), expected, torch.float32, "inference form")
    assert "frozen" in repr(layer)


def test_set_mask_switches_tasks():
    layer = MaskedLinear.from_linear(torch.nn.Linear(9, 4, bias=False))
    pointer = layer.weight.data_ptr()
    x = torch.randn(2, 9)
    for density in (0.0, 1.0):
        mask = torch.full((4, 9), bool(density))
        layer.set_mask(pack_mask(mask))
        with torch.no_grad():
            assert_close(layer(x), naive_masked_linear(x, layer.weight, mask), torch.float32, "switched")
    assert layer.weight.data_ptr() == pointer
    with pytest.raises(ValueError, match="mask must be uint8 \\(4, 2\\)"):
        layer.set_mask(torch.zeros(4, 3, dtype=torch.uint8))


def test_conv1d_weight_used_transposed():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # nf=6 outputs, nx=10 inputs, weight [10, 6]
    torch.nn.init.normal_(conv.weight)
    layer = MaskedLinear.from_linear(conv)
    assert layer.weight is conv.weight and (layer.in_features, layer.out_features) == (10, 6)
    x = torch.randn(4, 10)
    mask = layer.scores.detach() > layer.threshold
    assert_close(layer(x), naive_masked_linear(x, conv.weight.t(), mask, conv.bias), torch.float32, "conv1d")
    layer.set_mask(pack_mask(torch.ones(6, 10, dtype=torch.bool)))
    with torch.no_grad():
        assert_close(layer(x), conv(x), torch.float32, "full mask equals the dense layer")
    del transformers


def test_bad_configuration():
    with pytest.raises(ValueError, match="init_sparsity must be in"):
        MaskedLinear.from_linear(torch.nn.Linear(4, 4), init_sparsity=1.0)
    with pytest.raises(ValueError, match="takes nn.Linear or transformers Conv1D"):
        MaskedLinear.from_linear(torch.nn.Conv2d(1, 1, 1))
