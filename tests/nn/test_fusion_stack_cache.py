"""AdapterFusion stacks its frozen adapters once and reuses the layout until one of them changes."""

import torch

import pefops.nn.adapter_fusion as fusion_module
from pefops.nn import AdapterFusion, BottleneckAdapter


def _setup(hidden=16):
    torch.manual_seed(0)
    adapters = [BottleneckAdapter(hidden, r, scaling=s) for r, s in ((4, 1.0), (3, 2.0))]
    for a in adapters:
        a.requires_grad_(False)
        with torch.no_grad():
            a.up_proj.weight.normal_(0, 0.3)
    fusion = AdapterFusion(hidden, "dynamic").eval()
    x = torch.randn(5, hidden)
    return adapters, fusion, x


def test_stacked_once_and_invalidated_by_in_place_updates(monkeypatch):
    adapters, fusion, x = _setup()
    calls = []
    real = fusion_module.stack_adapters
    monkeypatch.setattr(fusion_module, "stack_adapters", lambda *a: calls.append(1) or real(*a))
    first = fusion(x, x, x, adapters)
    again = fusion(x, x, x, adapters)
    assert len(calls) == 1 and torch.equal(first, again)
    with torch.no_grad():
        adapters[1].up_proj.weight.mul_(2.0)  # an in-place update: version moves
    changed = fusion(x, x, x, adapters)
    assert len(calls) == 2 and not torch.allclose(changed, first)
    with torch.no_grad():
        adapters[0].up_proj.bias.data = adapters[0].up_proj.bias.data + 1.0  # new storage, same object
    fusion(x, x, x, adapters)
    assert len(calls) == 3
    fusion(x, x, x, adapters[::-1])  # another adapter list
    assert len(calls) == 4


def test_cached_equals_fresh_stack():
    adapters, fusion, x = _setup()
    fusion(x, x, x, adapters)
    with torch.no_grad():
        adapters[0].down_proj.weight.add_(0.5)
    cached = fusion(x, x, x, adapters)
    fresh = AdapterFusion(16, "dynamic").eval()
    fresh.load_state_dict(fusion.state_dict())
    assert torch.allclose(cached, fresh(x, x, x, adapters), atol=1e-6)
