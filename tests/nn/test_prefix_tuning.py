"""pefops.nn PrefixEncoder and PromptEmbedding: shapes, PEFT's flat layout, gradients, inits, errors."""

import pytest
import torch

from pefops.nn import PrefixEncoder, PromptEmbedding


@pytest.mark.parametrize("projection", [True, False])
def test_layer_slices_equal_the_full_forward(projection):
    torch.manual_seed(0)
    encoder = PrefixEncoder(3, 2, 5, 7, projection=projection, projection_hidden=11)
    pairs = encoder()
    assert len(pairs) == 3
    for index, (key, value) in enumerate(pairs):
        assert key.shape == value.shape == (2, 7, 5)
        layer_key, layer_value = encoder.layer(index)
        torch.testing.assert_close(layer_key, key, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer_value, value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [True, False])
def test_flat_layout_and_parameters_are_peft_s(projection):
    """Same parameter names and the same per-layer key/value split as PEFT's PrefixEncoder +
    PeftModel.get_prompt (view [P, 2L, H, D], permute, split by 2)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    layers, heads, head_dim, count, hidden = 3, 2, 4, 5, 6
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=count, token_dim=heads * head_dim,
                                     num_layers=layers, num_attention_heads=heads, encoder_hidden_size=hidden,
                                     prefix_projection=projection, num_transformer_submodules=1)
    theirs = peft.tuners.prefix_tuning.PrefixEncoder(config)
    ours = PrefixEncoder(layers, heads, head_dim, count, projection=projection, projection_hidden=hidden)
    assert set(dict(ours.named_parameters())) == set(dict(theirs.named_parameters()))
    ours.load_state_dict(theirs.state_dict())
    flat = theirs(torch.arange(count).unsqueeze(0))  # [1, P, 2 * L * H * D]
    torch.testing.assert_close(ours.flat(), flat[0], atol=0, rtol=0)
    split = flat.view(1, count, layers * 2, heads, head_dim).permute(2, 0, 3, 1, 4).split(2)
    for index, pair in enumerate(split):
        key, value = ours.layer(index)
        torch.testing.assert_close(key, pair[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(value, pair[1][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [True, False])
def test_gradients_of_one_layer_slice(projection):
    torch.manual_seed(0)
    encoder = PrefixEncoder(2, 2, 3, 4, projection=projection, projection_hidden=5).double()
    names, parameters = zip(*encoder.named_parameters())
    layer_one = _LayerCall(encoder, 1)

    def call(*values):
        return torch.func.functional_call(layer_one, {f"encoder.{n}": v for n, v in zip(names, values)}, ())

    assert torch.autograd.gradcheck(call, tuple(p.detach().clone().requires_grad_() for p in parameters))
    # layer 1's slice has no gradient path into layer 0's rows of the last Linear / columns of the table
    key, value = encoder.layer(1)
    (key.sum() + value.sum()).backward()
    if projection:
        assert torch.count_nonzero(encoder.transform[2].weight.grad[: encoder.layer_width]) == 0
    else:
        assert torch.count_nonzero(encoder.embedding.weight.grad[:, : encoder.layer_width]) == 0


class _LayerCall(torch.nn.Module):
    def __init__(self, encoder, index):
        super().__init__()
        self.encoder, self.index = encoder, index

    def forward(self):
        return self.encoder.layer(self.index)


def test_zero_init_and_load_flat():
    encoder = PrefixEncoder(2, 2, 3, 4, projection=True, projection_hidden=5, zero_init=True)
    assert all(torch.count_nonzero(t) == 0 for pair in encoder() for t in pair)
    table = PrefixEncoder(2, 2, 3, 4, projection=False)
    flat = torch.randn(4, 2 * 2 * 2 * 3)
    table.load_flat(flat)
    torch.testing.assert_close(table.flat(), flat, atol=0, rtol=0)
    with pytest.raises(ValueError, match="projection=False"):
        encoder.load_flat(flat)
    with pytest.raises(ValueError, match=r"expected \(4, 24\)"):
        table.load_flat(flat[:, :-1])


def test_errors_and_repr():
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        PrefixEncoder(2, 0, 3, 4)
    with pytest.raises(ValueError, match="has 2 layers; asked for layer 2"):
        PrefixEncoder(2, 1, 3, 4).layer(2)
    text = repr(PrefixEncoder(2, 1, 3, 4, projection_hidden=7))
    assert "num_layers=2, num_kv_heads=1, head_dim=3, num_virtual_tokens=4, projection=True, projection_hidden=7" in text
    assert "projection_hidden" not in repr(PrefixEncoder(2, 1, 3, 4, projection=False)).split("\n")[0]


def test_prompt_embedding_inits():
    torch.manual_seed(0)
    words = torch.nn.Embedding(20, 6)
    random = PromptEmbedding(4, 6, init="random", init_std=0.5)
    assert random(3).shape == (3, 4, 6) and 0.2 < random.embedding.weight.std() < 1.0
    generator = torch.Generator().manual_seed(3)
    vocab = PromptEmbedding(4, 6, init="vocab", word_embeddings=words, generator=generator)
    ids = torch.randint(0, 20, (4,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vocab.embedding.weight, words.weight[ids].detach(), atol=0, rtol=0)
    cycled = PromptEmbedding(5, 6, init=[7, 2], word_embeddings=words)  # token ids cycled to P, as PEFT's TEXT init
    torch.testing.assert_close(cycled.embedding.weight, words.weight[[7, 2, 7, 2, 7]].detach(), atol=0, rtol=0)

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [len(word) for word in text.split()]}

    text = PromptEmbedding(2, 6, init="a bbb cc", word_embeddings=words, tokenizer=Tokenizer())
    torch.testing.assert_close(text.embedding.weight, words.weight[[1, 3]].detach(), atol=0, rtol=0)
    assert "init=text" in repr(text)
    # the prompt is a trainable leaf; the word embedding is only read at init
    text(2).sum().backward()
    assert text.embedding.weight.grad is not None and words.weight.grad is None


def test_prompt_embedding_errors():
    with pytest.raises(ValueError, match="needs word_embeddings"):
        PromptEmbedding(3, 6, init="vocab")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptEmbedding(3, 6, init="some text", word_embeddings=torch.nn.Embedding(5, 6))
    with pytest.raises(ValueError, match="width 4; the prompt has 6"):
        PromptEmbedding(3, 6, init="vocab", word_embeddings=torch.nn.Embedding(5, 4))
    with pytest.raises(ValueError, match="positive int"):
        PromptEmbedding(0, 6)
