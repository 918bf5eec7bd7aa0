"""pefops.nn.LSHSelfAttention against transformers' LSHSelfAttention (the anchor): outputs, every
gradient, the random-number use, state dicts."""

import pytest
import torch

from pefops.nn import LSHSelfAttention
from tests.tolerances import assert_close

transformers = pytest.importorskip("transformers")
from transformers.models.reformer.modeling_reformer import LSHSelfAttention as TransformersLSH  # noqa: E402

HIDDEN, HEADS, HEAD_DIM = 32, 2, 16


def transformers_layer(num_hashes=2, num_buckets=4, chunk_length=16, before=1, after=0, causal=False, hash_seed=11,
                       dropout=0.0):
    config = transformers.ReformerConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HEAD_DIM, num_hashes=num_hashes,
        num_buckets=num_buckets, lsh_attn_chunk_length=chunk_length, lsh_num_chunks_before=before,
        lsh_num_chunks_after=after, is_decoder=causal, hash_seed=hash_seed, lsh_attention_probs_dropout_prob=dropout,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return TransformersLSH(config, layer_idx=0)


def padding_mask(batch, seq):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - seq // 4:] = 0
    return mask


def run(layer, hidden, mask, pefops_module):
    """Output and the gradients of hidden_states, query_key and value for a fixed random readout."""
    hidden = hidden.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(hidden, attention_mask=mask)
    out = out if pefops_module else out.hidden_states
    readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    if mask is not None:
        readout = readout * mask[..., None]  # outputs of padded queries are not used by any model
    (out * readout).sum().backward()
    return out.detach(), hidden.grad, layer.query_key.weight.grad, layer.value.weight.grad


CASES = [
    dict(num_hashes=1, num_buckets=4),
    dict(num_hashes=2, num_buckets=[2, 4], after=1),
    dict(num_hashes=4, num_buckets=8, causal=True),
    dict(num_hashes=8, num_buckets=[2, 2], chunk_length=32, causal=True),
    dict(num_hashes=4, num_buckets=4, chunk_length=8, before=2, after=1),
    dict(num_hashes=3, num_buckets=6, hash_seed=None),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_equals_transformers_outputs_and_gradients(case, masked):
    reference = transformers_layer(**case)
    module = LSHSelfAttention.from_transformers(reference)
    hidden = torch.randn(2, 64, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = padding_mask(2, 64) if masked else None
    torch.manual_seed(123)  # the same global RNG state for both (matters for hash_seed=None)
    expected = run(reference, hidden, mask, pefops_module=False)
    rng_after_reference = torch.get_rng_state()
    torch.manual_seed(123)
    actual = run(module, hidden, mask, pefops_module=True)
    # the rotations were drawn from the same generator, in the same way
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    keep = slice(None) if mask is None else mask.bool()
    assert_close(actual[0][keep], expected[0][keep], torch.float32, "output")
    for name, a, e in zip(("grad hidden_states", "grad query_key", "grad value"), actual[1:], expected[1:]):
        assert_close(a, e, torch.float32, name)


# causal=True covers transformers' float32 logsumexp rounding at |lse| ~ 1e5 (a causal query whose
# only visible key is itself, self-masked to -1e5, twice in its window across rounds): its
# probabilities sum to 1 - 2e-3 there, and both backends reproduce that.


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernels_equal_transformers(monkeypatch, causal):
    # the forced backend raises when it cannot serve, so this runs the Triton kernels (interpreted on CPU)
    monkeypatch.setenv("PEFOPS_BACKEND", "triton")
    reference = transformers_layer(num_hashes=4, num_buckets=[2, 4], causal=causal)
    module = LSHSelfAttention.from_transformers(reference)
    hidden = torch.randn(2, 64, HIDDEN, generator=torch.Generator().manual_seed(2))
    mask = padding_mask(2, 64)
    expected = run(reference, hidden, mask, pefops_module=False)
    actual = run(module, hidden, mask, pefops_module=True)
    assert_close(actual[0][mask.bool()], expected[0][mask.bool()], torch.float32, "output")
    for name, a, e in zip(("grad hidden_states", "grad query_key", "grad value"), actual[1:], expected[1:]):
        assert_close(a, e, torch.float32, name)


def test_one_chunk_is_full_attention_and_draws_nothing():
    reference = transformers_layer(num_hashes=4, chunk_length=64, causal=True)
    module = LSHSelfAttention.from_transformers(reference)
    hidden = torch.randn(2, 48, HIDDEN)
    mask = padding_mask(2, 48)
    state = torch.get_rng_state()
    expected = run(reference, hidden, mask, pefops_module=False)
    actual = run(module, hidden, mask, pefops_module=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(actual[0][mask.bool()], expected[0][mask.bool()], torch.float32, "output")
    for a, e in zip(actual[1:], expected[1:]):
        assert_close(a, e, torch.float32, "gradient")


def test_sequence_not_a_chunk_multiple_is_padded_as_reformer_does():
    # transformers' layer needs a multiple of the chunk; ReformerModel pads with masked tokens
    reference = transformers_layer(num_hashes=2, num_buckets=[2, 4], chunk_length=16)
    module = LSHSelfAttention.from_transformers(reference)
    hidden = torch.randn(2, 53, HIDDEN)
    padded = torch.cat([hidden, torch.zeros(2, 11, HIDDEN)], dim=1)
    padded_mask = torch.cat([torch.ones(2, 53), torch.zeros(2, 11)], dim=1).long()
    with torch.no_grad():
        expected = reference(padded, attention_mask=padded_mask).hidden_states[:, :53]
        actual = module(hidden)
    assert actual.shape == (2, 53, HEADS * HEAD_DIM)
    assert_close(actual, expected, torch.float32, "output")


def test_automatic_num_buckets_follows_transformers():
    reference = transformers_layer(num_hashes=2, num_buckets=None, chunk_length=8)
    module = LSHSelfAttention.from_transformers(reference)
    assert module.num_buckets is None
    hidden = torch.randn(1, 128, HIDDEN)
    with torch.no_grad():
        expected = reference(hidden).hidden_states
        actual = module(hidden)
    assert module.num_buckets == reference.num_buckets is not None
    assert_close(actual, expected, torch.float32, "output")


def test_state_dict_names_match_transformers():
    reference = transformers_layer()
    module = LSHSelfAttention(HIDDEN, HEADS, HEAD_DIM, num_hashes=2, num_buckets=4, chunk_length=16)
    assert module.state_dict().keys() == reference.state_dict().keys() == {"query_key.weight", "value.weight"}
    module.load_state_dict(reference.state_dict())  # strict
    assert torch.equal(module.query_key.weight, reference.query_key.weight)
    assert module.query_key.bias is None and module.value.bias is None


@pytest.mark.parametrize("chunk_length", [16, 64])  # hashed, and one chunk (full attention)
def test_dropout_draws_the_same_masks_as_transformers(chunk_length):
    reference = transformers_layer(num_hashes=2, num_buckets=4, chunk_length=chunk_length, dropout=0.3).train()
    module = LSHSelfAttention.from_transformers(reference).train()
    hidden = torch.randn(2, 64, HIDDEN)
    torch.manual_seed(5)
    expected = reference(hidden).hidden_states
    torch.manual_seed(5)
    actual = module(hidden)
    assert_close(actual, expected, torch.float32, "output with dropout")
    module.eval()
    assert torch.equal(module(hidden), module(hidden))  # no dropout in eval
    assert not torch.allclose(module(hidden), actual)


def test_extra_repr_and_errors():
    module = LSHSelfAttention(HIDDEN, HEADS, HEAD_DIM, num_hashes=4, num_buckets=[2, 4], chunk_length=16, causal=True)
    text = repr(module)
    for piece in ("num_hashes=4", "num_buckets=[2, 4]", "chunk_length=16", "causal=True", "num_chunks_before=1"):
        assert piece in text
    with pytest.raises(ValueError, match="even"):
        LSHSelfAttention(HIDDEN, HEADS, HEAD_DIM, num_hashes=1, num_buckets=5, chunk_length=16)
    with pytest.raises(ValueError, match="num_chunks_after"):
        LSHSelfAttention(HIDDEN, HEADS, HEAD_DIM, num_hashes=1, num_buckets=4, chunk_length=16, num_chunks_after=-1)
    with pytest.raises(ValueError, match="hidden_size=32"):
        module(torch.randn(1, 16, 31))
    with pytest.raises(ValueError, match="attention_mask must be"):
        module(torch.randn(1, 16, HIDDEN), attention_mask=torch.ones(1, 17))
