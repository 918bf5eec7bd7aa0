"""hf tier: the architecture table. Every path of every entry names a real module in a tiny model of
that type (so a typo in an entry fails here, not in a user's call), and architecture_of names the
supported model types when a model lacks a method."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pefops.hf import ARCHITECTURES  # noqa: E402
from pefops.hf.architectures import architecture_of, get_submodule  # noqa: E402
from pefops.hf.side_tuning import _layer_weights  # noqa: E402

pytestmark = pytest.mark.hf

COMMON = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
CONFIGS = {
    "bert": lambda: transformers.BertConfig(**COMMON),
    "roberta": lambda: transformers.RobertaConfig(**COMMON),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4),
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
    "t5": lambda: transformers.T5Config(vocab_size=50, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=37),
    "reformer": lambda: transformers.ReformerConfig(vocab_size=50, hidden_size=32, num_attention_heads=2,
                                                    attention_head_size=16, attn_layers=["local", "lsh"],
                                                    feed_forward_size=37, axial_pos_embds=False),
}


def tiny(model_type):
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(CONFIGS[model_type]())


def test_every_model_type_has_a_tiny_config_here():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_path_names_a_module(model_type):
    model = tiny(model_type)
    assert model.config.model_type == model_type
    architecture = ARCHITECTURES[model_type]
    base = model.base_model
    for site in architecture.sites:
        for layer in get_submodule(base, architecture.layers):
            module = get_submodule(layer, site.module)
            if site.style == "post_ln":
                assert isinstance(get_submodule(module, site.dense), torch.nn.Linear)
                assert isinstance(get_submodule(module, site.dropout), torch.nn.Dropout)
                assert isinstance(get_submodule(module, site.layer_norm), torch.nn.LayerNorm)
            else:
                assert site.style == "pre_norm"
                get_submodule(layer, site.residual_norm)
    if architecture.prefix is not None:
        for group in architecture.prefix.groups:
            for layer in get_submodule(base, architecture.stack(group.layers)):
                assert hasattr(get_submodule(layer, group.attention), "forward")
    if architecture.side is not None:
        hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        assert get_submodule(base, architecture.side.embedding).weight.shape[1] == hidden
        for layer in get_submodule(base, architecture.stack(architecture.side.layers)):
            q, k, v, o, fc_in, fc_out = _layer_weights(layer, architecture.side)
            assert q.shape[1] == k.shape[1] == v.shape[1] == fc_in.shape[1] == hidden  # inputs: the hidden size
            assert o.shape[0] == fc_out.shape[0] == hidden  # outputs: back to the hidden size
    for patch in architecture.lsh_patches:
        from pefops.hf.lsh_attention import _import_object

        layer_class = _import_object(patch.layer)
        assert callable(_import_object(patch.forward))
        assert any(type(module) is layer_class for module in model.modules())


def test_gpt2_fused_qkv_is_split_in_three():
    model = tiny("gpt2")
    layer = model.h[0]
    q, k, v, *_ = _layer_weights(layer, ARCHITECTURES["gpt2"].side)
    torch.testing.assert_close(torch.cat([q, k, v]), layer.attn.c_attn.weight.t(), atol=0, rtol=0)


def test_architecture_of_names_the_supported_model_types():
    t5 = tiny("t5")
    assert architecture_of(t5, "prefix") is ARCHITECTURES["t5"]
    with pytest.raises(ValueError, match=r"bottleneck adapters support model types bert, gpt2, llama, roberta; "
                                         r"got 't5'"):
        architecture_of(t5, "sites")
    with pytest.raises(ValueError, match=r"prefix-tuning supports model types bert, gpt2, llama, roberta, t5; "
                                         r"got None"):
        architecture_of(torch.nn.Linear(2, 2), "prefix")
    with pytest.raises(ValueError, match="apply_lsh_attention supports model types reformer; got 'bert'"):
        architecture_of(tiny("bert"), "lsh_patches")
    with pytest.raises(ValueError, match="unknown architecture feature 'adapters'"):
        architecture_of(t5, "adapters")
