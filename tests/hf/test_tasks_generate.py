"""hf tier: greedy generate() over a mixed-task batch (issue 15) on tiny GPT-2 and LLaMA language
models. One left-padded batch, the KV cache on, rows of an adapter, a mask set, a pefops prefix, a
PEFT prefix, pefops and PEFT prompts (2 and 5 virtual tokens) and the base: every row's prompt logits
and generated tokens equal that row alone (no padding) with its task applied by the method's own
loader; with prompt rows, the language-modelling loss and the prompts' gradients too."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_peft_prefix import make_model  # noqa: E402
from tests.hf.test_tasks import randomise  # noqa: E402
from tests.hf.test_tasks_prefix import save_prefixes  # noqa: E402
from tests.hf.test_tasks_prompt import COUNTS, left_padded, load_prompt_alone, save_prompts  # noqa: E402

pytestmark = pytest.mark.hf
NAMES = ["adapter", "masks", "prefix", "peft", None]
PROMPT_NAMES = ["prompt", "peft_prompt", None, "prefix", "peft", "masks"]
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
    save_prompts(lambda: make_model(kind), "CAUSAL_LM", root)


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
    elif name in COUNTS:
        load_prompt_alone(model, root, name)
    return model


def greedy(model, input_ids, attention_mask, with_logits=False):
    """The generated tokens [B, NEW_TOKENS] (and, with_logits, every step's logits [B, NEW_TOKENS, vocab])."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0, use_cache=True,
                         return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, input_ids.shape[1]:]
    return (tokens, torch.stack(out.logits, dim=1)) if with_logits else tokens


def mixed_model(kind, root, names):
    model = make_model(kind)
    for name in dict.fromkeys(names):
        if name is not None:
            hf.load_task(model, name, root / name)
    return model


def assert_mixed_generate_equals_alone(kind, root, names, row_task):
    """One left-padded batch of PROMPTS, row b through task names[row_task[b]], the KV cache on: every
    row's prompt logits (real positions; prompt rows have their virtual tokens in front), greedy tokens
    and every decoding step's logits equal that row alone, unpadded, with its task applied by its
    method's own loader. Returns the generated tokens."""
    model = mixed_model(kind, root, names)
    input_ids, attention_mask, positions = left_padded(PROMPTS)  # positions as generate() numbers the rows
    hf.set_row_tasks(model, names, row_task)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
        mixed, steps = greedy(model, input_ids, attention_mask, with_logits=True)
    models = {name: alone(kind, root, name) for name in names}
    for row, prompt in enumerate(PROMPTS):
        single, model_alone = torch.tensor([prompt]), models[names[row_task[row]]]
        with torch.no_grad():
            expected = model_alone(input_ids=single).logits[0]
            tokens, expected_steps = greedy(model_alone, single, torch.ones_like(single), with_logits=True)
        torch.testing.assert_close(logits[row, -len(prompt):], expected[-len(prompt):], atol=2e-5, rtol=1e-4)
        assert mixed[row].tolist() == tokens[0].tolist(), f"row {row} ({names[row_task[row]]})"
        # every decoding step's logits too: greedy tokens of a tiny random model hide small differences
        torch.testing.assert_close(steps[row], expected_steps[0], atol=2e-5, rtol=1e-4)
    return mixed


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_greedy_generate_equals_each_row_alone(kind, tmp_path):
    save_tasks(kind, tmp_path)
    mixed = assert_mixed_generate_equals_alone(kind, tmp_path, NAMES, ROW_TASK)
    assert len({tuple(row) for row in mixed.tolist()}) > 3  # the tasks do generate differently


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompt_rows_generate_as_each_row_alone(kind, tmp_path):
    save_tasks(kind, tmp_path)
    # prompts of 2 and 5 virtual tokens beside the base, a pefops prefix, a PEFT prefix and a mask set
    mixed = assert_mixed_generate_equals_alone(kind, tmp_path, PROMPT_NAMES, torch.tensor([0, 1, 2, 3, 4, 5]))
    assert len({tuple(row) for row in mixed.tolist()}) > 3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompt_rows_language_modelling_loss_and_gradients_equal_each_row_alone(kind, tmp_path):
    """Labels get the front block ignored; the first token of a row without a prompt is no target (a hidden
    slot precedes it). Summed losses (num_items_in_batch=1) and the prompts' gradients equal the rows alone."""
    save_tasks(kind, tmp_path)
    row_task = torch.tensor([2, 0, 1, 5, 4, 0])  # rows 0 and 4 (base, PEFT prefix): no virtual token
    model = mixed_model(kind, tmp_path, PROMPT_NAMES)
    prompts = {name: model.pefops_task_modules[name].prompt.embedding.weight for name in ("prompt", "peft_prompt")}
    for weight in prompts.values():
        weight.requires_grad_(True)
    # right padding, as in training (with left padding a pad's logit would predict a row's first token)
    input_ids = torch.tensor([p + [0] * (max(map(len, PROMPTS)) - len(p)) for p in PROMPTS])
    attention_mask = (input_ids != 0).long()
    hf.set_row_tasks(model, PROMPT_NAMES, row_task)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                labels=input_ids.masked_fill(attention_mask == 0, -100), num_items_in_batch=1)
    out.loss.backward()
    total, grads = 0.0, {name: torch.zeros_like(weight) for name, weight in prompts.items()}
    for row, prompt in enumerate(PROMPTS):
        name, single = PROMPT_NAMES[row_task[row]], torch.tensor([prompt])
        own = alone(kind, tmp_path, name)
        loss = own(input_ids=single, labels=single, num_items_in_batch=1).loss
        total = total + loss.detach()
        if name in grads:
            grads[name] += torch.autograd.grad(loss, own.prompt_tuning.prompt.embedding.weight)[0]
    torch.testing.assert_close(out.loss.detach(), total, atol=1e-4, rtol=1e-5)
    for name, weight in prompts.items():
        assert weight.grad.abs().max() > 1e-3
        torch.testing.assert_close(weight.grad, grads[name], atol=1e-5, rtol=1e-4)


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


def test_prefix_key_values_are_computed_once_in_inference(tmp_path):
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
    swap = torch.tensor([1, 0, 2])
    hf.set_row_tasks(model, ["prefix", "peft", None], swap)  # a serving loop's next batch
    with torch.no_grad():
        swapped = greedy(model, ids, torch.ones_like(ids))
    assert len(calls) == 4  # nor per routing
    for row, name in ((0, "peft"), (1, "prefix")):
        hf.set_row_tasks(model, [name], torch.zeros(1, dtype=torch.long))
        with torch.no_grad():
            assert swapped[row].tolist() == greedy(model, ids[row:row + 1], torch.ones_like(ids[:1]))[0].tolist()
    hf.set_row_tasks(model, ["prefix", "peft", None], torch.tensor([0, 1, 2]))
    with torch.no_grad():  # a changed prefix parameter is seen: that task's recomputed, other tokens
        model.pefops_task_modules["prefix"].encoder.embedding.weight.mul_(-3.0)
        second = greedy(model, ids, torch.ones_like(ids))
    assert sorted(calls[4:]) == [0, 1]  # the other task's kept
    assert second[1].tolist() == first[1].tolist() and second[0].tolist() != first[0].tolist()
    calls.clear()
    model(input_ids=ids).logits.sum()  # with autograd: computed per forward (gradients flow)
    assert sorted(calls) == [0, 0, 1, 1]
