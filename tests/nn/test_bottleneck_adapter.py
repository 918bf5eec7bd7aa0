"""pefops.nn.BottleneckAdapter: initialisations, and equality with AdapterHub's eager formula for
every option combination (fused and unfused paths)."""

import pytest
import torch

from pefops.nn import BottleneckAdapter
from tests.adapter_inputs import NAIVE_ACTIVATIONS
from tests.tolerances import assert_close


def eager_adapterhub(module, x, residual):
    """AdapterHub's Adapter.forward written out (down → act → up → *scaling → gate → residual/LN)."""
    h = x if module.adapter_norm_before is None else module.adapter_norm_before(x)
    h = NAIVE_ACTIVATIONS[module.activation](module.down_proj(h))
    output = module.up_proj(h) * module.scaling
    if module.gate is not None:
        output = output * torch.sigmoid(module.gate(x)).mean(dim=1).unsqueeze(-1)
    if module.adapter_residual_before_ln:
        output = output + residual
    if module.adapter_norm_after is not None:
        output = module.adapter_norm_after(output)
    if not module.adapter_residual_before_ln:
        output = output + residual
    return output


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


@pytest.mark.parametrize("options", [
    dict(),
    dict(scaling="channel", activation="gelu"),
    dict(scaling="learned", activation="swish"),
    dict(scaling=4.0, ln_before=True),
    dict(ln_after=True, adapter_residual_before_ln=True),
    dict(ln_after=True, adapter_residual_before_ln=False),
    dict(use_gating=True, activation="tanh"),
])
@pytest.mark.parametrize("separate_residual", [False, True])
def test_matches_adapterhub_formula(options, separate_residual):
    torch.manual_seed(0)
    module = randomise(BottleneckAdapter(24, reduction_factor=3, **options))
    x = torch.randn(2, 5, 24, requires_grad=True)
    residual = torch.randn(2, 5, 24) if separate_residual else None
    out = module(x, residual)
    expected = eager_adapterhub(module, x, x if residual is None else residual)
    assert_close(out, expected, torch.float32, "out")
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *module.parameters()])
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, torch.float32, "grad")


def test_outer_layer_norm_is_fused_into_the_epilogue():
    torch.manual_seed(0)
    module = randomise(BottleneckAdapter(16, 4, activation="relu", scaling="channel"))
    norm = randomise(torch.nn.LayerNorm(16))
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    expected = norm(eager_adapterhub(module, x, residual))
    assert_close(module(x, residual, layer_norm=norm), expected, torch.float32, "out")


def test_dropout_in_training_only():
    module = randomise(BottleneckAdapter(16, 4, dropout=0.5))
    x = torch.randn(64, 16)
    module.eval()
    assert_close(module(x), eager_adapterhub(module, x, x), torch.float32, "eval")
    module.train()
    torch.manual_seed(3)
    first = module(x)
    assert not torch.allclose(first, eager_adapterhub(module, x, x))


def test_initialisations():
    torch.manual_seed(0)
    bert = BottleneckAdapter(768, 64, init="bert")
    assert abs(bert.down_proj.weight.std().item() - 0.02) < 2e-3 and bert.up_proj.bias.abs().max() == 0
    houlsby = BottleneckAdapter(768, 64, init="houlsby")
    assert houlsby.down_proj.weight.abs().max() <= 2e-2 and houlsby.up_proj.weight.abs().max() <= 2e-2
    assert houlsby.down_proj.weight.std() < 1e-2  # truncation narrows the spread
    mam = BottleneckAdapter(768, 64, init="mam")
    assert mam.up_proj.weight.abs().max() == 0 and mam.down_proj.weight.abs().max() > 0
    x = torch.randn(4, 768)
    assert torch.equal(mam(x), x)  # a no-op at initialisation


def test_bottleneck_size_from_reduction_factor():
    assert BottleneckAdapter(768, reduction_factor=16).bottleneck_size == 48
    assert BottleneckAdapter(8, reduction_factor=16).bottleneck_size == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of bottleneck_size and reduction_factor"),
    (dict(bottleneck_size=4, reduction_factor=2), "exactly one"),
    (dict(bottleneck_size=4, init="xavier"), "unknown init"),
    (dict(bottleneck_size=4, activation="swishy"), "unknown activation"),
    (dict(bottleneck_size=4, scaling="per_token"), "scaling must be a float"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckAdapter(16, **kwargs)


def test_extra_repr():
    text = repr(BottleneckAdapter(32, 8, activation="gelu", scaling="channel"))
    assert "bottleneck_size=8" in text and "activation=gelu" in text and "learned[32]" in text
