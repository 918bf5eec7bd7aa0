"""hf tier for mixed-task batches: set_active_adapters(model, names, row_adapter=...) gives every row
the output of running it alone with its adapter, and training updates each adapter only from its
rows."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_adapters_api import INPUT, MASK, tiny  # noqa: E402

pytestmark = pytest.mark.hf
CONFIGS = (("a", "seq_bn"), ("b", "seq_bn[reduction_factor=8]"), ("c", "seq_bn[scaling=channel]"))


def model_with_adapters(model_type, configs=CONFIGS):
    model = tiny(model_type)
    for name, config in configs:
        hf.add_adapter(model, name, config)
        with torch.no_grad():
            for p in hf.adapter_parameters(model, name).values():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("model_type", ["bert", "roberta", "gpt2", "llama"])
def test_each_row_equals_running_it_alone(model_type):
    model = model_with_adapters(model_type)
    index = torch.tensor([2, 0])
    hf.set_active_adapters(model, ["a", "b", "c"], row_adapter=index)
    with torch.no_grad():
        mixed = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
        for row, adapter in enumerate(index.tolist()):
            hf.set_active_adapters(model, "abc"[adapter])
            alone = model(input_ids=INPUT[row:row + 1], attention_mask=MASK[row:row + 1]).last_hidden_state
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=0)


def test_training_updates_each_adapter_only_from_its_rows():
    model = model_with_adapters("bert", CONFIGS[:2])
    for p in model.parameters():
        p.requires_grad_(False)
    for name in ("a", "b"):
        for p in hf.adapter_parameters(model, name).values():
            p.requires_grad_(True)
    batch = torch.cat([INPUT, INPUT]), torch.cat([MASK, MASK])
    hf.set_active_adapters(model, ["a", "b"], row_adapter=torch.tensor([0, 0, 0, 0]))
    model(input_ids=batch[0], attention_mask=batch[1]).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for name, p in hf.adapter_parameters(model, "a").items() if "up_proj" in name)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in hf.adapter_parameters(model, "b").values())


def test_mixed_gradients_equal_separate_runs():
    model = model_with_adapters("gpt2", CONFIGS[:2])
    for p in model.parameters():
        p.requires_grad_(False)
    parameters = {n: p.requires_grad_(True) for name in ("a", "b") for n, p in hf.adapter_parameters(model, name).items()}
    index = torch.tensor([1, 0])
    hf.set_active_adapters(model, ["a", "b"], row_adapter=index)
    model(input_ids=INPUT, attention_mask=MASK).last_hidden_state.square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in parameters.items()}
    for p in parameters.values():
        p.grad = None
    for row, adapter in enumerate(index.tolist()):
        hf.set_active_adapters(model, "ab"[adapter])
        model(input_ids=INPUT[row:row + 1], attention_mask=MASK[row:row + 1]).last_hidden_state.square().sum().backward()
    for n, p in parameters.items():
        torch.testing.assert_close(mixed[n], p.grad, atol=1e-5, rtol=1e-4)


def test_routing_errors():
    model = model_with_adapters("bert", CONFIGS[:2])
    with pytest.raises(ValueError, match="row_adapter values must be in \\[0, 2\\)"):
        hf.set_active_adapters(model, ["a", "b"], row_adapter=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no adapters named \\['z'\\]"):
        hf.set_active_adapters(model, ["a", "z"], row_adapter=torch.tensor([0, 1]))
    hf.set_active_adapters(model, ["a", "b"], row_adapter=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="row_adapter has 3 entries; the batch has 2 rows"):
        model(input_ids=INPUT, attention_mask=MASK)
