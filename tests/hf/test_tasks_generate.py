"""hf tier: greedy generate() over a mixed-task batch (issue 15) on tiny GPT-2 and LLaMA language
models. One left-padded batch, the KV cache on, rows of an adapter, a mask set, a pefops prefix, a
PEFT prefix and the base: every row's prompt logits and generated tokens equal that row alone (no
padding) with its task applied by the method's own loader."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_peft_prefix import make_model  # noqa: E402
from tests.hf.test_tasks import randomise  # noqa: E402
from tests.hf.test_tasks_prefix import save_prefixes  # noqa: E402

pytestmark = pytest.mark.hf
NAMES = ["adapter", "masks", "prefix", "peft", None]
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23], [30, 31, 32], [40, 41, 42, 43, 44], [50, 51, 52]]
ROW_TASK = torch.tensor([2, 0, 3, 1, 4, 2])
NEW_TOKENS = 6


def save_tasks(kind, root):
    source = make_model(kind)
    hf.add_adapter(source, "adapter", "double_seq_bn")
    randomise(hf.adapter_parameters(source, "adapter").values())
    hf.save_adapter(source, str(root / "adapter"), "adapter")
    masked = make_model(kind)
    hf.apply_mask_tuning(masked, init_sparsity=0.3)
    hf.freeze_masks(masked)
    hf.save_masks(masked, str(root / "masks"))
    save_prefixes(lambda: make_model(kind), "CAUSAL_LM", root)

def alone(kind, root, name):
    """The language model with task `name` applied by its method's own loader."""
    model = make_model(kind)
    if name == "adapter":
        hf.load_adapter(model, str(root / "adapter"), set_active=True)
    elif name == "masks":
        hf.load_masks(model, str(root / "masks"))
    elif name == "prefix":
        hf.load_prefix(model, root / "prefix")
    elif name == "peft":
        hf.load_peft_prefix(model, root / "peft")
    return model


def greedy(model, input_ids, attention_mask):
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0, use_cache=True)
    return out[:, input_ids.shape[1]:]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_greedy_generate_equals_each_row_alone(kind, tmp_path):
    save_tasks(kind, tmp_path)
    model = make_model(kind)
    for name in NAMES[:-1]:
        hf.load_task(model, name, tmp_path / name)
    width = max(map(len, PROMPTS))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])  # left padding
    attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    hf.set_row_tasks(model, NAMES, ROW_TASK)
    with torch.no_grad():
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
        mixed = greedy(model, input_ids, attention_mask)
    models = {name: alone(kind, tmp_path, name) for name in NAMES}
    for row, prompt in enumerate(PROMPTS):  # the logits of the left-padded prompt, real positions only
        with torch.no_grad():
            expected = models[NAMES[ROW_TASK[row]]](input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits[row, width - len(prompt):], expected, atol=2e-5, rtol=1e-4)
    for row, prompt in enumerate(PROMPTS):
        single = torch.tensor([prompt])
        with torch.no_grad():
            expected = greedy(models[NAMES[ROW_TASK[row]]], single, torch.ones_like(single))
        assert mixed[row].tolist() == expected[0].tolist(), f"row {row} ({NAMES[ROW_TASK[row]]})"
    assert len({tuple(row) for row in mixed.tolist()}) > 3  # the tasks do generate differently


def test_a_mask_set_with_a_trained_head_is_refused_as_a_task(tmp_path):
    masked = make_model("llama")
    hf.apply_mask_tuning(masked, init_sparsity=0.3)
    hf.freeze_masks(masked)
    with torch.no_grad():
        masked.lm_head.weight.add_(0.01)  # the head trained with the masks: it would need routing per row
    hf.save_masks(masked, str(tmp_path / "masks"))
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"differ from the model's \(\['lm_head.weight'\]\)"):
        hf.load_task(model, "masks", tmp_path / "masks")
    assert hf.list_tasks(model) == {} and not hf.masked_modules(model)


def test_prefix_key_values_are_computed_once_per_routing_in_inference(tmp_path):
    save_prefixes(lambda: make_model("gpt2"), "CAUSAL_LM", tmp_path)
    model = make_model("gpt2")
    hf.load_task(model, "prefix", tmp_path / "prefix")
    hf.load_task(model, "peft", tmp_path / "peft")
    calls = []
    for name in ("prefix", "peft"):
        encoder = model.pefops_task_modules[name].encoder
        encoder.layer = (lambda original: lambda index: calls.append(index) or original(index))(encoder.layer)
    hf.set_row_tasks(model, ["prefix", "peft", None], torch.tensor([0, 1, 2]))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    with torch.no_grad():
        first = greedy(model, ids, torch.ones_like(ids))
    assert sorted(calls) == [0, 0, 1, 1]  # 2 layers x 2 tasks, not x every decoding step
    with torch.no_grad():  # a changed prefix parameter is seen: recomputed, other tokens
        model.pefops_task_modules["prefix"].encoder.embedding.weight.mul_(-3.0)
        second = greedy(model, ids, torch.ones_like(ids))
    assert len(calls) == 8 and second[1].tolist() == first[1].tolist() and second[0].tolist() != first[0].tolist()
    calls.clear()
    model(input_ids=ids).logits.sum()  # with autograd: computed per forward (gradients flow)
    assert sorted(calls) == [0, 0, 1, 1]
