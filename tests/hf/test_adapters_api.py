"""hf tier: add / activate / train / save / load on tiny random configs of BERT, RoBERTa, GPT-2
and LLaMA, through the fused op."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402

pytestmark = pytest.mark.hf


def tiny(model_type):
    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    if model_type == "gpt2":
        config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    elif model_type == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=64)
    elif model_type == "roberta":
        config = transformers.RobertaConfig(**common, max_position_embeddings=64)
    else:
        config = transformers.BertConfig(**common, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


INPUT = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 1, 1]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])


def hidden(model):
    return model(input_ids=INPUT, attention_mask=MASK).last_hidden_state


@pytest.mark.parametrize("model_type", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
def test_zero_up_projection_is_a_no_op(model_type, preset):
    model = tiny(model_type)
    with torch.no_grad():
        before = hidden(model)
    hf.add_adapter(model, "a", preset, set_active=True)
    with torch.no_grad():
        for name, parameter in hf.adapter_parameters(model, "a").items():
            if "up_proj" in name:
                parameter.zero_()
        after = hidden(model)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_train_adapter_freezes_everything_else(model_type):
    model = tiny(model_type)
    hf.add_adapter(model, "task", "double_seq_bn")
    trainable = hf.train_adapter(model, "task")
    expected = sum(p.numel() for p in hf.adapter_parameters(model, "task").values())
    assert trainable == expected > 0
    assert all(p.requires_grad == (".adapters.task." in n) for n, p in model.named_parameters())
    assert hf.active_adapter(model) == "task" and model.training
    hidden(model).square().mean().backward()
    assert all(p.grad is not None for p in hf.adapter_parameters(model, "task").values())


def test_config_fields_and_overrides():
    config = hf.resolve_config("seq_bn[reduction_factor=4,non_linearity=gelu,scaling=channel]")
    assert (config.reduction_factor, config.non_linearity, config.scaling) == (4, "gelu", "channel")
    assert hf.resolve_config("houlsby") == hf.DoubleSeqBnConfig()
    assert hf.resolve_config("parallel").is_parallel and hf.ParBnConfig().scaling == 4.0
    with pytest.raises(ValueError, match="unknown adapter config"):
        hf.resolve_config("lora")
    with pytest.raises(ValueError, match="unknown bottleneck config keys"):
        hf.resolve_config({"mh_adapter": True, "output_adapter": True, "reduction_factor": 2, "non_linearity": "relu", "rank": 3})
    with pytest.raises(ValueError, match="phm_layer"):
        hf.resolve_config("seq_bn[phm_layer=true]")


def test_leave_out_and_per_layer_reduction():
    model = tiny("bert")
    config = hf.SeqBnConfig(reduction_factor={"0": 2, "default": 8}, leave_out=[1], mh_adapter=True)
    hf.add_adapter(model, "x", config)
    sizes = {n: p.shape for n, p in hf.adapter_parameters(model, "x").items() if n.endswith("down_proj.weight")}
    assert all(".layer.0." in n for n in sizes) and all(s[0] == 16 for s in sizes.values())


def test_errors():
    model = tiny("bert")
    hf.add_adapter(model, "a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        hf.add_adapter(model, "a")
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        hf.set_active_adapters(model, "b")
    with pytest.raises(ValueError, match="without dots"):
        hf.add_adapter(model, "a.b")
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=10, d_model=8, num_layers=1, num_heads=2, d_kv=4, d_ff=8))
    with pytest.raises(ValueError, match="support model types"):
        hf.add_adapter(t5, "a")


def test_switching_and_removing_adapters():
    model = tiny("gpt2")
    with torch.no_grad():
        base = hidden(model)
    hf.add_adapter(model, "one", "par_bn")
    hf.add_adapter(model, "two", "seq_bn")
    with torch.no_grad():
        for p in hf.adapter_parameters(model, "one").values():
            p.normal_(0, 0.1)
        hf.set_active_adapters(model, "one")
        one = hidden(model)
        hf.set_active_adapters(model, "two")
        two = hidden(model)
        hf.remove_adapter(model, "two")
        assert hf.active_adapter(model) is None
        torch.testing.assert_close(hidden(model), base)
    assert not torch.allclose(one, two)
    assert set(hf.list_adapters(model)) == {"one"}
