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


# ------------------------------------------------------------------ adapters of different configs in one batch

MIXED_CONFIGS = (
    ("seq", "seq_bn"),  # output site only
    ("houlsby", "double_seq_bn"),  # both sites, swish
    ("par", "par_bn"),  # parallel, scaling 4
    ("lnorm", "seq_bn[ln_before=true,ln_after=true,non_linearity=tanh]"),  # adapter LayerNorms: own forward
    ("gated", "double_seq_bn[use_gating=true,leave_out=1]"),  # gating, absent from layer 1
)
MIXED_INPUT = torch.cat([INPUT, INPUT.flip(0), INPUT, INPUT.flip(0), INPUT[:1]])
MIXED_MASK = torch.cat([MASK, MASK.flip(0), MASK, MASK.flip(0), MASK[:1]])
MIXED_INDEX = torch.tensor([4, 0, 1, 2, 3, 1, 0, 4, 2])


def _mixed_model(model_type):
    model = model_with_adapters(model_type, MIXED_CONFIGS)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {n: p.requires_grad_(True) for name, _ in MIXED_CONFIGS
                   for n, p in hf.adapter_parameters(model, name).items()}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "gpt2", "llama"])
def test_rows_of_different_configs_equal_running_alone_forward_and_gradients(model_type):
    model, parameters = _mixed_model(model_type)
    names = [name for name, _ in MIXED_CONFIGS]
    hf.set_active_adapters(model, names, row_adapter=MIXED_INDEX)
    mixed = model(input_ids=MIXED_INPUT, attention_mask=MIXED_MASK).last_hidden_state
    (mixed * MIXED_MASK[..., None]).square().sum().backward()
    mixed_grads = {n: p.grad.clone() for n, p in parameters.items() if p.grad is not None}
    for p in parameters.values():
        p.grad = None
    for row, adapter in enumerate(MIXED_INDEX.tolist()):
        hf.set_active_adapters(model, names[adapter])
        alone = model(input_ids=MIXED_INPUT[row:row + 1], attention_mask=MIXED_MASK[row:row + 1]).last_hidden_state
        torch.testing.assert_close(mixed[row:row + 1].detach(), alone.detach(), atol=1e-5, rtol=1e-5)
        (alone * MIXED_MASK[row:row + 1, :, None]).square().sum().backward()
    for n, p in parameters.items():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(mixed_grads.get(n, torch.zeros_like(p)), expected, atol=1e-4, rtol=1e-4, msg=n)


def test_rows_whose_adapter_is_absent_pass_through_like_the_base():
    model = model_with_adapters("bert", (("out", "seq_bn"), ("skip", "seq_bn[leave_out=0]")))
    with torch.no_grad():
        hf.set_active_adapters(model, None)
        base = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
        # "skip" exists only in layer 1; a row routed to it runs layer 0 unchanged, as running it alone
        hf.set_active_adapters(model, ["out", "skip"], row_adapter=torch.tensor([1, 1]))
        routed = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
        hf.set_active_adapters(model, "skip")
        alone = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    torch.testing.assert_close(routed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(routed, base)


def test_routed_training_applies_adapter_dropout():
    model = model_with_adapters("bert", (("drop", "seq_bn[dropout=0.5]"), ("plain", "seq_bn")))
    index = torch.tensor([0, 1])
    hf.set_active_adapters(model, ["drop", "plain"], row_adapter=index)
    with torch.no_grad():
        evaluated = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
        model.train()
        for module in model.modules():  # only the adapters' dropout: the base's own dropout off
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(0)
        trained = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
        hf.set_active_adapters(model, "drop")
        torch.manual_seed(0)
        alone = model(input_ids=INPUT[:1], attention_mask=MASK[:1]).last_hidden_state
    assert not torch.allclose(trained[:1], evaluated[:1], atol=1e-4)  # dropout ran on the "drop" row
    torch.testing.assert_close(trained[:1], alone, atol=1e-5, rtol=1e-5)  # as running it alone, same RNG
    torch.testing.assert_close(trained[1:], evaluated[1:], atol=1e-5, rtol=1e-5)  # no dropout: unchanged


def test_routing_is_copied_and_removal_falls_back_to_the_base():
    model = model_with_adapters("bert", CONFIGS[:2])
    index = torch.tensor([1, 0])
    hf.set_active_adapters(model, ["a", "b"], row_adapter=index)
    with torch.no_grad():
        before = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
        index[0] = 0  # the caller's tensor changes; the routing does not
        torch.testing.assert_close(model(input_ids=INPUT, attention_mask=MASK).last_hidden_state, before)
        hf.remove_adapter(model, "b")
        assert hf.active_adapter(model) is None
        model(input_ids=INPUT, attention_mask=MASK)
