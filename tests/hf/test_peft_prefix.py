"""hf tier: PEFT 0.21 prefix-tuning and prompt-tuning checkpoints, produced here with PEFT itself
(get_peft_model + save_pretrained on tiny random GPT-2 and LLaMA), imported by load_peft_prefix /
load_peft_prompt: the logits (padding masks included) and the prefix gradients equal PEFT's."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import pefops.hf as hf  # noqa: E402

pytestmark = pytest.mark.hf
VOCAB = 61
COUNT = 4


def make_model(kind, head="lm"):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0)
        model_class = transformers.GPT2LMHeadModel if head == "lm" else transformers.GPT2ForSequenceClassification
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model_class = transformers.LlamaForCausalLM if head == "lm" else transformers.LlamaForSequenceClassification
    return model_class(config).eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    return ids, mask


def peft_checkpoint(kind, config, directory, head="lm"):
    """A PEFT model with a random prompt encoder, saved with save_pretrained; returns it and the base state."""
    base = make_model(kind, head)
    state = {name: value.clone() for name, value in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
        with torch.no_grad():
            for parameter in model.prompt_encoder.parameters():
                parameter.normal_(0.0, 1.0)
            for name, parameter in model.named_parameters():
                if "modules_to_save" in name:
                    parameter.normal_(0.0, 0.3)
        model.save_pretrained(str(directory))
    return model.eval(), state


def fresh(kind, state, head="lm"):
    model = make_model(kind, head)
    torch.manual_seed(123)  # different head init than the PEFT model's, so a head import is visible
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefix_checkpoint_reproduces_peft_logits_and_gradients(kind, projection, tmp_path):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=COUNT, prefix_projection=projection,
                                     encoder_hidden_size=24)
    theirs, state = peft_checkpoint(kind, config, tmp_path, "lm")
    ours = fresh(kind, state)
    tuning = hf.load_peft_prefix(ours, tmp_path)
    assert tuning.peft_compatible_positions and not tuning.encoder.projection
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    expected = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == expected.logits.shape == (3, 8, VOCAB)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    if not projection:
        # PEFT's flat prefix is a leaf only without the MLP: then its gradient must equal ours
        expected.loss.backward()
        got.loss.backward()
        their_grad = theirs.prompt_encoder["default"].embedding.weight.grad
        torch.testing.assert_close(tuning.encoder.embedding.weight.grad, their_grad, atol=1e-6, rtol=1e-5)
        assert their_grad.abs().max() > 0
    # the same prefix without the position shift gives other logits: PEFT's numbering matters
    hf.remove_prefix_tuning(ours)
    hf.apply_prefix_tuning(ours, COUNT, projection=False).load_state_dict(tuning.state_dict())
    with torch.no_grad():
        unshifted = ours(input_ids=ids, attention_mask=mask).logits
    assert (unshifted - expected.logits).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_classification_heads_in_modules_to_save_are_imported(kind, tmp_path):
    ids, mask = inputs()
    # prompt tuning: PEFT's forward runs, so compare logits
    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=COUNT)
    theirs, state = peft_checkpoint(kind, config, tmp_path / "prompt", "cls")
    ours = fresh(kind, state, "cls")
    hf.load_peft_prompt(ours, tmp_path / "prompt")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    # prefix-tuning: PEFT 0.21's SEQ_CLS forward itself fails on transformers 5 (it looks for a
    # `past_key_values` argument, now `cache`), so check the imported head weights
    config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=COUNT)
    theirs, state = peft_checkpoint(kind, config, tmp_path / "prefix", "cls")
    ours = fresh(kind, state, "cls")
    hf.load_peft_prefix(ours, tmp_path / "prefix")
    saved = {name.replace(".modules_to_save.default", ""): p for name, p in theirs.named_parameters()
             if "modules_to_save" in name}
    assert saved
    for name, parameter in saved.items():
        torch.testing.assert_close(ours.get_parameter(name.removeprefix("base_model.")), parameter, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompt_checkpoint_reproduces_peft_logits_and_gradients(kind, tmp_path):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=COUNT)
    theirs, state = peft_checkpoint(kind, config, tmp_path, "lm")
    ours = fresh(kind, state)
    tuning = hf.load_peft_prompt(ours, tmp_path)
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    expected = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == expected.logits.shape == (3, 8 + COUNT, VOCAB)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    their_grad = theirs.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(tuning.prompt.embedding.weight.grad, their_grad, atol=1e-6, rtol=1e-5)
    assert their_grad.abs().max() > 0


def test_wrong_checkpoints_are_refused(tmp_path):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=COUNT)
    peft_checkpoint("gpt2", config, tmp_path / "gpt2", "lm")
    with pytest.raises(ValueError, match=r"\(num_layers, token_dim, kv heads\)"):
        hf.load_peft_prefix(make_model("llama"), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="holds a 'PREFIX_TUNING' adapter; expected 'PROMPT_TUNING'"):
        hf.load_peft_prompt(make_model("gpt2"), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="adapter_config.json"):
        hf.load_peft_prefix(make_model("gpt2"), tmp_path / "missing")
