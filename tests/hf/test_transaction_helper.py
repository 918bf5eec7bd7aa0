"""pefops.hf.transaction on its own: what model_transaction restores, nesting, copy_into."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402
from pefops.hf.transaction import copy_into, model_transaction  # noqa: E402
from tests.hf.test_adapters_api import INPUT, MASK, tiny  # noqa: E402
from tests.hf.test_transactions import assert_same_state, fingerprint  # noqa: E402

pytestmark = pytest.mark.hf


def test_rollback_restores_tree_parameters_flags_hooks_config_and_written_tensors():
    model = tiny("gpt2")
    with torch.no_grad():
        before_out = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="stop"):
        with model_transaction(model):
            hf.add_adapter(model, "a", "double_seq_bn", set_active=True)  # new modules, hooks, registry
            for p in model.parameters():
                p.requires_grad_(False)
            model.train()
            model.config._attn_implementation_internal = "eager"
            copy_into([(model.wte.weight, torch.zeros_like(model.wte.weight))])
            model.h[0].mlp = torch.nn.Identity()
            raise RuntimeError("stop")
    assert_same_state(before, fingerprint(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=INPUT, attention_mask=MASK).last_hidden_state, before_out)


def test_a_caught_inner_failure_is_undone_by_the_inner_transaction():
    model = tiny("bert")
    hf.add_adapter(model, "a", "seq_bn")
    with model_transaction(model):
        before = fingerprint(model)
        with pytest.raises(ValueError):
            hf.add_adapter(model, "a", "double_seq_bn")
        assert_same_state(before, fingerprint(model))
        hf.add_adapter(model, "b", "double_seq_bn")
    assert set(hf.list_adapters(model)) == {"a", "b"}


def test_copy_into_refuses_a_broadcast():
    with pytest.raises(ValueError, match="internal"):
        copy_into([(torch.zeros(4, 4), torch.zeros(1, 4))])


def test_fusion_layer_names_a_width_mismatch():
    from pefops.nn import BottleneckAdapter
    from pefops.nn.adapter_fusion import AdapterFusion

    fusion = AdapterFusion(8)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="adapters \\[1\\] have another width"):
        fusion(x, x, x, [BottleneckAdapter(8, 2), BottleneckAdapter(6, 2)])
    with pytest.raises(ValueError, match="x has shape"):
        fusion(torch.randn(2, 3, 6), x, x, [BottleneckAdapter(8, 2)])
