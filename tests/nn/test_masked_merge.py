"""Frozen MaskedLinear at prefill sizes: W ⊙ M merged once per (mask, weight) version and a dense
F.linear; the cache follows set_mask and in-place weight updates; PEFOPS_MASKED_MERGE=0 turns it off."""

import torch

from pefops.nn import MaskedLinear
from pefops.nn import masked_linear as module
from pefops.ops import masked_linear, pack_mask


def _layer(N=40, K=27, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = MaskedLinear(torch.randn(N, K, generator=g), torch.randn(N, generator=g))
    layer.freeze()
    return layer, g


def test_merged_equals_the_masked_op_and_is_made_once(monkeypatch):
    layer, g = _layer()
    x = torch.randn(33, 27, generator=g)
    expected = masked_linear(x, layer.weight, layer.mask, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    merged = layer.merged_weight()
    layer(x)
    assert layer.merged_weight() is merged  # reused


def test_cache_follows_set_mask_and_in_place_weight_updates():
    layer, g = _layer()
    x = torch.randn(20, 27, generator=g)
    first = layer(x)
    other = pack_mask(torch.randn(40, 27, generator=g) > 0)
    layer.set_mask(other)
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, other, layer.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), first)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, other, layer.bias), rtol=1e-5, atol=1e-5)


def test_masked_inf_weight_is_dropped():
    layer, g = _layer()
    with torch.no_grad():
        masked = ~torch.from_numpy(__import__("numpy").unpackbits(layer.mask.numpy(), axis=1, bitorder="little")[:, :27]
                                   .astype(bool))
        layer.weight[masked] = float("inf")
    assert torch.isfinite(layer(torch.randn(3, 27, generator=g))).all()


def test_off_switch_and_training_use_the_fused_ops(monkeypatch):
    layer, g = _layer()
    x = torch.randn(20, 27, generator=g)
    monkeypatch.setenv(module.MERGE_ENV, "0")
    layer(x)
    assert "_merged" not in layer.__dict__
    monkeypatch.delenv(module.MERGE_ENV)
    layer(x)
    assert "_merged" in layer.__dict__
    training = MaskedLinear(torch.randn(40, 27, generator=g))
    training(x)
    assert "_merged" not in training.__dict__


def test_cache_follows_in_place_mask_edits_data_reassignment_and_bias_updates():
    layer, g = _layer()
    x = torch.randn(5, 27, generator=g)
    first = layer(x)
    other = pack_mask(torch.randn(40, 27, generator=g) > 0)
    with torch.no_grad():
        layer.mask.copy_(other)  # in place: same tensor, new version
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, other, layer.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), first)
    layer.weight.data = torch.randn(40, 27, generator=g)  # new storage under the same Parameter
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, other, layer.bias), rtol=1e-5, atol=1e-5)
    layer.weight = torch.nn.Parameter(torch.randn(40, 27, generator=g), requires_grad=False)  # a new Parameter
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, other, layer.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.bias.add_(1.0)  # the bias is read per call, never cached
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, other, layer.bias), rtol=1e-5, atol=1e-5)
    layer.bias = None
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, other, None), rtol=1e-5, atol=1e-5)


def test_row_masks_and_unfreezing_bypass_an_existing_merge():
    layer, g = _layer()
    x = torch.randn(2, 3, 27, generator=g)
    layer(x)
    assert "_merged" in layer.__dict__
    masks = torch.stack([pack_mask(torch.randn(40, 27, generator=g) > 0) for _ in range(2)])
    row_task = torch.tensor([1, 0])
    layer.set_row_masks(masks, row_task)
    expected = torch.stack([masked_linear(x[b], layer.weight, masks[row_task[b]], layer.bias) for b in range(2)])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.set_row_masks(None)
    torch.testing.assert_close(layer(x), masked_linear(x, layer.weight, layer.mask, layer.bias), rtol=1e-5, atol=1e-5)
    layer.scores = torch.nn.Parameter(torch.randn(40, 27, generator=g))  # back to training form
    layer.mask = None
    out = layer(x)
    assert out.requires_grad and "_merged" not in layer.__dict__
