"""hf tier: prompt tuning on tiny random GPT-2, LLaMA, BERT and RoBERTa: the hook equals prepending the
virtual embeddings by hand (mask, labels, token types extended), generate() with the cache, inits,
save/load, disable/remove. PEFT equivalence is in test_peft_prefix.py."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402

from tests.hf.test_prefix_tuning import generated_cache, make_inputs, make_model, output_of  # noqa: E402

pytestmark = pytest.mark.hf
COUNT = 3
KINDS = ["gpt2", "llama", "bert", "roberta", "t5"]


def by_hand(model, tuning, inputs):
    """The base model run on [prompt ; token embeddings] with the mask, labels and token types
    extended as PEFT does."""
    ids = inputs["input_ids"]
    batch = ids.shape[0]
    embeds = torch.cat([tuning.prompt.embedding.weight.expand(batch, -1, -1), model.get_input_embeddings()(ids)], 1)
    extended = {"inputs_embeds": embeds,
                "attention_mask": torch.cat([torch.ones(batch, COUNT, dtype=torch.long), inputs["attention_mask"]], 1)}
    if "labels" in inputs:
        extended["labels"] = torch.cat([torch.full((batch, COUNT), -100), inputs["labels"]], 1)
    if "decoder_input_ids" in inputs:  # T5: the prompt is on the encoder side only
        extended["decoder_input_ids"] = inputs["decoder_input_ids"]
    if "token_type_ids" in inputs:
        extended["token_type_ids"] = torch.cat([torch.zeros(batch, COUNT, dtype=torch.long), inputs["token_type_ids"]], 1)
    with hf.prompt_disabled(model):
        return model(**extended)


@pytest.mark.parametrize("kind", KINDS)
def test_equals_prepending_by_hand_with_gradients(kind):
    model = make_model(kind)
    inputs = make_inputs(kind)
    if kind in ("gpt2", "llama"):
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    if kind == "bert":
        inputs["token_type_ids"] = torch.randint(0, 2, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(2))
    tuning = hf.apply_prompt_tuning(model, COUNT, init_std=0.5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt_tuning.prompt.embedding.weight"}
    out = model(**inputs)
    expected = by_hand(model, tuning, inputs)
    ours, theirs = (out.logits, expected.logits) if hasattr(out, "logits") else (out.last_hidden_state,
                                                                                   expected.last_hidden_state)
    if kind == "t5":
        assert ours.shape[1] == inputs["decoder_input_ids"].shape[1]
        assert out.encoder_last_hidden_state.shape[1] == inputs["input_ids"].shape[1] + COUNT
    else:
        assert ours.shape[1] == inputs["input_ids"].shape[1] + COUNT
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    loss = out.loss if "labels" in inputs else ours.square().mean()
    reference_loss = expected.loss if "labels" in inputs else theirs.square().mean()
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=0)
    grad = torch.autograd.grad(loss, tuning.prompt.embedding.weight)[0]
    reference_grad = torch.autograd.grad(reference_loss, tuning.prompt.embedding.weight)[0]
    torch.testing.assert_close(grad, reference_grad, atol=1e-7, rtol=1e-5)
    assert grad.abs().max() > 0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_uses_the_prompt_once_and_matches_uncached_logits(kind):
    model = make_model(kind)
    tuning = hf.apply_prompt_tuning(model, COUNT, init_std=0.5)
    inputs = make_inputs(kind)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ids = ids.masked_fill(mask == 0, 0)
    mask[1] = 1  # generate wants left padding only
    new = 4
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    length = ids.shape[1]
    assert out.sequences.shape == (3, length + new)
    assert generated_cache(out).get_seq_length() == COUNT + length + new - 1  # the prompt is in the cache, once
    full_mask = torch.cat([mask, torch.ones(3, new - 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=out.sequences[:, :-1], attention_mask=full_mask, use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, COUNT + length - 1:], atol=1e-5, rtol=1e-5)
    assert tuning.enabled


def test_inits_save_load_disable_remove(tmp_path):
    model = make_model("gpt2")
    words = model.get_input_embeddings().weight
    tuning = hf.apply_prompt_tuning(model, 5, init=[7, 9])
    torch.testing.assert_close(tuning.prompt.embedding.weight, words[[7, 9, 7, 9, 7]].detach(), atol=0, rtol=0)
    hf.remove_prompt_tuning(model)

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [len(word) for word in text.split()]}

    tuning = hf.apply_prompt_tuning(model, 2, init="hello to you", tokenizer=Tokenizer())
    torch.testing.assert_close(tuning.prompt.embedding.weight, words[[5, 2]].detach(), atol=0, rtol=0)
    hf.remove_prompt_tuning(model)
    tuning = hf.apply_prompt_tuning(model, COUNT, init="vocab", generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, words.shape[0], (COUNT,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tuning.prompt.embedding.weight, words[ids].detach(), atol=0, rtol=0)

    inputs = make_inputs("gpt2")
    with torch.no_grad():
        expected = output_of(model, inputs)
    hf.save_prefix(model, tmp_path)
    loaded = make_model("gpt2")
    with torch.no_grad():
        base = output_of(loaded, inputs)
    hf.load_prefix(loaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, inputs), expected, atol=0, rtol=0)
        with hf.prompt_disabled(loaded):
            torch.testing.assert_close(output_of(loaded, inputs), base, atol=0, rtol=0)
        hf.remove_prompt_tuning(loaded)
        torch.testing.assert_close(output_of(loaded, inputs), base, atol=0, rtol=0)


def test_t5_generate_with_the_prompt_in_front_of_the_encoder_input():
    model = make_model("t5")
    hf.apply_prompt_tuning(model, COUNT, init_std=0.5)
    inputs = make_inputs("t5")
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
                         min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert generated_cache(out).cross_attention_cache.get_seq_length() == COUNT + inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits
        with hf.prompt_disabled(model):
            base = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full, atol=1e-5, rtol=1e-5)
    assert (full - base).abs().max() > 1e-4


def test_errors():
    with pytest.raises(ValueError, match="supports model types"):
        hf.apply_prompt_tuning(torch.nn.Linear(2, 2), COUNT)
    model = make_model("gpt2")
    hf.apply_prompt_tuning(model, COUNT)
    with pytest.raises(ValueError, match="already has prompt tuning"):
        hf.apply_prompt_tuning(model, COUNT)
    with pytest.raises(ValueError, match="by keyword"):
        model(torch.ones(1, 3, dtype=torch.long), None, torch.ones(1, 3))
    with pytest.raises(ValueError, match="2-D attention masks"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        hf.apply_prompt_tuning(make_model("gpt2"), COUNT, init="some text")
    with pytest.raises(ValueError, match="has no prompt tuning"):
        hf.remove_prompt_tuning(make_model("gpt2"))
