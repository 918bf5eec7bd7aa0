"""Reference tier for AdapterFusion: the fused algebra equals AdapterHub's formula on stacked adapter
outputs for every option, with gradients; the module's options, initialisation and temperature."""

import copy

import pytest
import torch

from pefops.nn import AdapterFusion, BottleneckAdapter
from pefops.ops import adapter_fusion_eager
from tests.tolerances import assert_close

CONFIGS = ["dynamic", "static", {"residual_before": True}, {"temperature": True}, {"query": False},
           {"key": False}, {"value_before_softmax": False}, {"query_before_ln": True}]


def adapters(hidden=24, seed=0):
    torch.manual_seed(seed)
    modules = [BottleneckAdapter(hidden, r, activation="gelu", scaling=s) for r, s in ((4, 1.0), (6, 2.0), (3, "channel"))]
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0, 0.3)
            module.requires_grad_(False)
    return modules


def randomised_fusion(config, hidden=24):
    fusion = AdapterFusion(hidden, config)
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return fusion.eval()


def eager_reference(fusion, x, query, residual, modules, temperature):
    ups = torch.stack([m.up_projection(x) for m in modules], dim=-2)
    projection = lambda layer: (None, None) if layer is None else (layer.weight, layer.bias)  # noqa: E731
    (qw, qb), (kw, kb) = projection(fusion.query), projection(fusion.key)
    return adapter_fusion_eager(None, query, residual, ups, query_weight=qw, query_bias=qb, key_weight=kw, key_bias=kb,
                                value_weight=None if fusion.value is None else fusion.value.weight,
                                temperature=temperature, residual_before=fusion.config.residual_before,
                                value_before_softmax=fusion.config.value_before_softmax)


def float64_copies(fusion, modules, *tensors):
    copies = [copy.deepcopy(m).double() for m in modules]
    return copy.deepcopy(fusion).double(), copies, [t.detach().double().requires_grad_() for t in tensors]


def errors(got, truth):
    return max(((g.double() - t).abs().max() / max(1.0, t.abs().max())).item() for g, t in zip(got, truth))


@pytest.mark.parametrize("tokens", [(2, 5), (4, 20)], ids=["fewer-tokens-than-units", "folded-weights"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_fused_equals_adapterhub_formula_with_gradients(config, tokens):
    # 10 tokens < 13 units: per-token query/key/value products; 80 tokens: the matrices folded per call.
    # The truth is AdapterHub's formula in float64: two float32 paths that sum in different orders
    # differ from each other by up to twice what each differs from the truth (seen: eager float32 is
    # 1.1e-5 off the truth in a weight gradient summed over 80 tokens, the fused path 0.6e-5), so
    # each float32 path is held to the truth at the same bound.
    modules = adapters()
    fusion = randomised_fusion(config)
    x, query, residual = (torch.randn(*tokens, 24, requires_grad=True) for _ in range(3))
    temperature = fusion.T
    out = fusion(x, query, residual, modules)
    eager = eager_reference(fusion, x, query, residual, modules, temperature)
    fusion64, modules64, inputs64 = float64_copies(fusion, modules, x, query, residual)
    truth = eager_reference(fusion64, *inputs64, modules64, temperature)
    assert_close(out, truth, torch.float32, "out")
    grad = torch.randn_like(out)
    wanted = [x, query, residual, *fusion.parameters()]
    truth_grads = torch.autograd.grad(truth, [*inputs64, *fusion64.parameters()], grad.double())
    fused_error = errors(torch.autograd.grad(out, wanted, grad, retain_graph=True), truth_grads)
    eager_error = errors(torch.autograd.grad(eager, wanted, grad), truth_grads)
    bound = 2e-5  # float32 gradients summed over up to 80 tokens
    assert eager_error <= bound, f"the float32 formula itself is {eager_error:.2e} off the float64 truth"
    assert fused_error <= bound, f"fused gradients {fused_error:.2e} off the float64 truth (formula: {eager_error:.2e})"


def test_float64_gradcheck_of_the_fused_path():
    modules = [m.double() for m in adapters()]
    fusion = randomised_fusion("dynamic").double()
    x, query, residual = (torch.randn(3, 24, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda x, q, r: fusion(x, q, r, modules), (x, query, residual))


def test_temperature_decays_every_call_to_one():
    fusion = AdapterFusion(8, {"temperature": True})
    assert fusion.T == 50.0
    x = torch.randn(2, 8)
    modules = adapters(8)
    for _ in range(3):
        fusion(x, x, x, modules)
    assert abs(fusion.T - (50.0 - 3 * 0.05)) < 1e-9
    fusion.T = 1.01
    fusion(x, x, x, modules)
    assert fusion.T == 1.0


def test_initialisation_and_regulariser():
    fusion = AdapterFusion(16, "dynamic")
    expected = torch.full((16, 16), 1e-6).fill_diagonal_(1.0)
    torch.testing.assert_close(fusion.value.weight, expected)
    assert fusion.regularization_loss().item() == pytest.approx(0.01 * 240 * 1e-12, rel=1e-3)
    assert fusion.query.bias.abs().max() == 0 and abs(fusion.query.weight.std().item() - 0.02) < 0.01
    assert AdapterFusion(16, "static").value is None


def test_unfusable_adapters_take_the_formula_path():
    modules = adapters()
    modules[1] = BottleneckAdapter(24, 5, ln_before=True)  # an adapter LayerNorm: not stackable
    fusion = randomised_fusion("dynamic")
    x = torch.randn(2, 3, 24)
    out = fusion(x, x, x, modules)
    assert_close(out, eager_reference(fusion, x, x, x, modules, 1.0), torch.float32, "out")


def test_bad_config():
    with pytest.raises(ValueError, match="unknown fusion config"):
        AdapterFusion(8, "dense")
    with pytest.raises(ValueError, match="unknown fusion config keys"):
        AdapterFusion(8, {"heads": 2})


def stacked_adapters():
    from pefops.ops import stack_adapters

    modules = adapters()
    return stack_adapters([m.down_proj.weight for m in modules], [m.down_proj.bias for m in modules],
                          [m.up_proj.weight for m in modules], [m.up_proj.bias for m in modules],
                          [m.scaling for m in modules])


def test_an_extra_up_bias_row_is_refused_not_a_phantom_adapter():
    from pefops.ops import adapter_fusion

    down, down_bias, up, up_bias, segment = stacked_adapters()
    x = torch.randn(3, 24)
    phantom = torch.cat([up_bias, torch.randn(1, 24)])
    with pytest.raises(ValueError, match="up_bias_scaled has 4 rows but segment lays out 3 adapters"):
        adapter_fusion(x, x, x, down, down_bias, up, phantom, segment)
    with pytest.raises(ValueError, match="up_bias_scaled has 2 rows but segment lays out 3 adapters"):
        adapter_fusion(x, x, x, down, down_bias, up, up_bias[:2], segment)
    # a segment written by hand is read once: the same layout passes, a gap or a disorder is refused
    own = segment.clone()
    torch.testing.assert_close(adapter_fusion(x, x, x, down, down_bias, up, up_bias, own),
                               adapter_fusion(x, x, x, down, down_bias, up, up_bias, segment))
    for bad in (segment * 2, segment.flip(0), segment + 1):
        with pytest.raises(ValueError, match="contiguous, non-empty run of units in adapter order"):
            adapter_fusion(x, x, x, down, down_bias, up, up_bias, bad)
    own[-1] = 3  # an in-place change to a segment already seen is checked again
    with pytest.raises(ValueError, match="up_bias_scaled has 3 rows but segment lays out 4 adapters"):
        adapter_fusion(x, x, x, down, down_bias, up, up_bias, own)
    with pytest.raises(ValueError, match="segment must be an integer tensor"):
        adapter_fusion(x, x, x, down, down_bias, up, up_bias, segment.float())


def test_stack_adapters_refuses_lists_of_unequal_length_and_bad_entries():
    from pefops.ops import stack_adapters

    downs, ups = [torch.randn(4, 24), torch.randn(2, 24)], [torch.randn(24, 4), torch.randn(24, 2)]
    with pytest.raises(ValueError, match="one entry per adapter in every list.*'scalings': 1"):
        stack_adapters(downs, [None, None], ups, [None, None], [1.0])
    with pytest.raises(ValueError, match="one entry per adapter in every list.*'up_weights': 1"):
        stack_adapters(downs, [None, None], ups[:1], [None, None], [1.0, 1.0])
    with pytest.raises(ValueError, match="adapter 1: down bias must be \\[2\\] or None"):
        stack_adapters(downs, [None, torch.randn(3)], ups, [None, None], [1.0, 1.0])
    with pytest.raises(ValueError, match="adapter 0: up bias must be \\[24\\] or None"):
        stack_adapters(downs, [None, None], ups, [torch.randn(1, 24), None], [1.0, 1.0])
    with pytest.raises(ValueError, match="adapter 1: a scaling tensor has 1 or 24 values"):
        stack_adapters(downs, [None, None], ups, [None, None], [1.0, torch.ones(2)])
    with pytest.raises(ValueError, match="adapter 0: scaling must be a float or a tensor"):
        stack_adapters(downs, [None, None], ups, [None, None], ["channel", 1.0])


def test_projection_shapes_and_dtypes_are_named_not_mat1_mat2():
    from pefops.ops import adapter_fusion

    stacked = stacked_adapters()
    x = torch.randn(3, 24)
    for name, value, message in (("query_weight", torch.randn(1, 24), "query_weight must be \\[24, 24\\]"),
                                 ("key_weight", torch.randn(24, 12), "key_weight must be \\[24, 24\\]"),
                                 ("value_weight", torch.randn(24), "value_weight must be \\[24, 24\\]"),
                                 ("query_bias", torch.randn(23), "query_bias must be \\[24\\]"),
                                 ("key_bias", torch.randn(1, 24), "key_bias must be \\[24\\]"),
                                 ("value_weight", torch.randn(24, 24, dtype=torch.float64), "must match x's dtype")):
        with pytest.raises(ValueError, match=message):
            adapter_fusion(x, x, x, *stacked, **{name: value})
    with pytest.raises(ValueError, match="down_bias must be \\[R=13\\]"):
        adapter_fusion(x, x, x, stacked[0], stacked[1][:4], *stacked[2:])
    with pytest.raises(ValueError, match="up_bias_scaled must be \\[N, 24\\]"):
        adapter_fusion(x, x, x, *stacked[:3], stacked[3][:, :5], stacked[4])
    with pytest.raises(ValueError, match="up_weight must match x's dtype"):
        adapter_fusion(x, x, x, stacked[0], stacked[1], stacked[2].double(), *stacked[3:])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 weights, bfloat16 activations: allowed
        out = adapter_fusion(x.bfloat16(), x.bfloat16(), x.bfloat16(), *stacked, value_weight=torch.eye(24))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_fused_op_rejects_bad_inputs():
    from pefops.ops import adapter_fusion, stack_adapters

    modules = adapters()
    stacked = stack_adapters([m.down_proj.weight for m in modules], [m.down_proj.bias for m in modules],
                             [m.up_proj.weight for m in modules], [m.up_proj.bias for m in modules],
                             [m.scaling for m in modules])
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match="query must have x's shape"):
        adapter_fusion(x, torch.randn(3, 23), x, *stacked)
    with pytest.raises(ValueError, match="down_weight \\[R, 24\\] and up_weight \\[24, R\\] expected"):
        adapter_fusion(x, x, x, stacked[0][:, :20], *stacked[1:])
    with pytest.raises(ValueError, match="segment must be \\[R=13\\]"):
        adapter_fusion(x, x, x, *stacked[:4], stacked[4][:5])
    with pytest.raises(ValueError, match="temperature must be positive"):
        adapter_fusion(x, x, x, *stacked, temperature=0.0)
    with pytest.raises(ValueError, match="adapter 1: expected down \\[r >= 1, 24\\]"):
        stack_adapters([torch.randn(4, 24), torch.randn(4, 20)], [None, None],
                       [torch.randn(24, 4), torch.randn(24, 4)], [None, None], [1.0, 1.0])
