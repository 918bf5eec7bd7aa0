"""hf tier for prompt-tuning rows in a mixed-task batch (issue 15): a pefops prompt (2 virtual tokens) and
a PEFT prompt (5), loaded with load_task, share one batch with an adapter, a fusion, a mask set,
pefops and PEFT prefixes and the base. Row b equals its task alone by the method's own activation
(load_prefix / load_peft_prompt ...): its token outputs, its prompt's virtual-token outputs (the last P
of the front block), positions under right padding and under left padding with position_ids, and the
gradients of each task's parameters, on tiny BERT, GPT-2 and LLaMA. Bad routing is refused before the
model changes."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_adapters_api import tiny  # noqa: E402
from tests.hf import test_tasks, test_tasks_prefix  # noqa: E402
from tests.hf.test_tasks import ATTENTION, TOKENS, read_out  # noqa: E402
from tests.hf.test_tasks_prefix import hidden_alone, prefix_alone, save_with_peft, train_only  # noqa: E402
from tests.hf.test_tasks_prefix import mixed_model as prefix_mixed_model  # noqa: E402

pytestmark = pytest.mark.hf
NAMES = ["prompt", "masks", None, "peft_prompt", "houlsby", "prefix", "fusion", "peft"]
COUNTS = {"prompt": 2, "peft_prompt": 5}  # virtual tokens of the prompt tasks
checkpoints = test_tasks.checkpoints  # the module fixtures prompt_checkpoints builds on
prefix_checkpoints = test_tasks_prefix.prefix_checkpoints


def save_prompts(make_model, task_type, root):
    """Under root: "prompt", a pefops prompt (2 virtual tokens), and "peft_prompt", a PEFT prompt (5)
    saved by PEFT from a model make_model() builds."""
    source = make_model()
    hf.apply_prompt_tuning(source, COUNTS["prompt"], init_std=0.5)
    hf.save_prefix(source, root / "prompt")
    config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=COUNTS["peft_prompt"])
    save_with_peft(make_model, config, root / "peft_prompt", 0.5)


def load_prompt_alone(model, root, name):
    """Apply prompt task `name` to `model` by its method's own loader; returns the PromptTuning."""
    return hf.load_prefix(model, root / "prompt") if name == "prompt" else hf.load_peft_prompt(model, root / name)


@pytest.fixture(scope="module")
def prompt_checkpoints(prefix_checkpoints):
    for model_type, root in prefix_checkpoints.items():
        save_prompts(lambda: tiny(model_type), "FEATURE_EXTRACTION", root)
    return prefix_checkpoints


def mixed_model(model_type, root):
    model = prefix_mixed_model(model_type, root)
    for name in COUNTS:
        assert hf.load_task(model, name, root / name) == "prompt_tuning"
    return model


def model_alone(model_type, root, name):
    """A tiny model with only task `name` applied by its method's own loader (None: the base)."""
    if name in ("prefix", "peft"):
        return prefix_alone(model_type, root, name)[0]
    model = tiny(model_type)
    if name in COUNTS:
        load_prompt_alone(model, root, name)
    elif name == "houlsby":
        hf.load_adapter(model, str(root / name), set_active=True)
    else:
        assert name is None, name
    return model


def output_alone(model_type, root, name, input_ids, attention_mask=None):
    """[P + S, hidden]: one row run alone with only task `name`, its virtual tokens (if any) in front."""
    with torch.no_grad():
        out = model_alone(model_type, root, name)(input_ids=input_ids, attention_mask=attention_mask)
    return out.last_hidden_state[0]


def width_of(row_task) -> int:
    return max([COUNTS.get(NAMES[index], 0) for index in row_task.tolist()])


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_each_row_equals_its_task_alone(prompt_checkpoints, model_type):
    root = prompt_checkpoints[model_type]
    model = mixed_model(model_type, root)
    length = TOKENS.shape[1]
    # prompts of 2 and 5 slots with every other method; one prompt (2 slots); none (the block is gone)
    for row_task in (torch.tensor([0, 1, 2, 3, 4]), torch.tensor([3, 5, 0, 6, 7]), torch.tensor([4, 0, 2, 0, 1]),
                     torch.tensor([1, 2, 4, 5, 6])):
        hf.set_row_tasks(model, NAMES, row_task)
        with torch.no_grad():
            mixed = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
        width = width_of(row_task)
        assert mixed.shape[1] == width + length  # one front block of max(P_t) slots, then the tokens
        for row, index in enumerate(row_task.tolist()):
            name = NAMES[index]
            keep = ATTENTION[row].bool()  # padded positions are not compared (their values are free)
            if name in COUNTS:
                expected = output_alone(model_type, root, name, TOKENS[row:row + 1], ATTENTION[row:row + 1])
            else:
                expected = hidden_alone(model_type, root, name, row)
            count = expected.shape[0] - length
            torch.testing.assert_close(mixed[row, width:][keep], expected[count:][keep], atol=2e-5, rtol=1e-4)
            # the row's own virtual tokens: the last P slots of the block
            torch.testing.assert_close(mixed[row, width - count:width], expected[:count], atol=2e-5, rtol=1e-4)
    hf.set_row_tasks(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS[:1], attention_mask=ATTENTION[:1]).last_hidden_state[0],
                                   hidden_alone(model_type, root, None, 0), atol=2e-5, rtol=1e-4)


def left_padded(rows: list[list[int]]):
    """(input_ids, attention_mask, position_ids as generate() numbers left-padded rows)."""
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_left_padded_rows_with_position_ids_equal_their_unpadded_run(prompt_checkpoints, model_type):
    """Given position_ids number each row's tokens (absolute embeddings in BERT / GPT-2, RoPE in
    LLaMA); a prompt row's are shifted by its own P, so left padding does not move them."""
    root = prompt_checkpoints[model_type]
    model = mixed_model(model_type, root)
    rows = [[5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19], [20], [21, 22, 23, 24, 25]]
    row_task = torch.tensor([0, 3, 2, 5, 7, 4])  # prompt, peft prompt, base, prefix, peft prefix, adapter
    input_ids, attention_mask, position_ids = left_padded(rows)
    hf.set_row_tasks(model, NAMES, row_task)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    for row, tokens in enumerate(rows):
        expected = output_alone(model_type, root, NAMES[row_task[row]], torch.tensor([tokens]))
        torch.testing.assert_close(mixed[row, -len(tokens):], expected[-len(tokens):], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_gradients_reach_each_task_from_its_rows_only(prompt_checkpoints, model_type):
    root = prompt_checkpoints[model_type]
    model = mixed_model(model_type, root)
    trained = train_only(model, ["prompt", "peft_prompt", "prefix", "houlsby"])
    row_task = torch.tensor([0, 3, 5, 0, 4])  # prompt, peft prompt, prefix, prompt, adapter
    hf.set_row_tasks(model, NAMES, row_task)
    length = TOKENS.shape[1]

    def loss(hidden, row):  # the real positions: the last `length` of each row
        return read_out(hidden[:, -length:], ATTENTION[row])

    loss(model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state, slice(None)).backward()
    expected = {}  # each task's gradient: the sum over its rows run alone
    for row, index in enumerate(row_task.tolist()):
        name = NAMES[index]
        alone = model_alone(model_type, root, name)
        if name == "houlsby":
            parameters = hf.adapter_parameters(alone, name)
        else:
            parameters = dict(getattr(alone, "prompt_tuning" if name in COUNTS else "prefix_tuning").named_parameters())
        hidden = alone(input_ids=TOKENS[row:row + 1], attention_mask=ATTENTION[row:row + 1]).last_hidden_state
        grads = torch.autograd.grad(loss(hidden, slice(row, row + 1)), list(parameters.values()))
        for key, grad in zip(parameters, grads):
            expected.setdefault(name, {}).setdefault(key, torch.zeros_like(grad)).add_(grad)
    for name, parameters in trained.items():
        assert set(parameters) == set(expected[name])
        for key, parameter in parameters.items():
            assert parameter.grad is not None and parameter.grad.abs().max() > 1e-3
            torch.testing.assert_close(parameter.grad, expected[name][key], atol=1e-5, rtol=1e-4)


def test_bad_prompt_routing_is_refused_before_anything_changes(prompt_checkpoints, tmp_path):
    from tests.hf.test_prefix_tuning import make_model as prefix_test_model

    root = prompt_checkpoints["gpt2"]
    model = mixed_model("gpt2", root)
    hf.set_row_tasks(model, NAMES, torch.tensor([0, 3, 2, 5, 4]))
    with torch.no_grad():
        routed = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
    hooks = dict(model._forward_pre_hooks)
    with pytest.raises(ValueError, match="set_row_tasks routed 5 rows; this forward has 3"):
        model(input_ids=TOKENS[:3], attention_mask=ATTENTION[:3])
    with pytest.raises(ValueError, match=r"row_task values must be in \[0, 8\)"):
        hf.set_row_tasks(model, NAMES, torch.tensor([0, 8, 1, 1, 1]))
    assert dict(model._forward_pre_hooks) == hooks  # the earlier routing stands
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state, routed)
    hf.set_row_tasks(model, None)
    assert dict(model._forward_pre_hooks) == {} and "_pefops_row_prompt" not in model.__dict__
    for model_type, match in (("t5", "'t5' is an encoder-decoder model"),
                              ("roberta", "'roberta' numbers positions otherwise")):
        source = prefix_test_model(model_type) if model_type == "t5" else tiny(model_type)
        hf.apply_prompt_tuning(source, 2)
        hf.save_prefix(source, tmp_path / model_type)
        other = prefix_test_model(model_type) if model_type == "t5" else tiny(model_type)
        hf.load_task(other, "prompt", tmp_path / model_type)
        hooks = {name: dict(module._forward_pre_hooks) for name, module in other.named_modules()}
        with pytest.raises(ValueError, match=match):
            hf.set_row_tasks(other, ["prompt", None], torch.tensor([0, 1]))
        assert {name: dict(module._forward_pre_hooks) for name, module in other.named_modules()} == hooks
    own = tiny("gpt2")
    hf.load_task(own, "prompt", root / "prompt")
    hf.apply_prompt_tuning(own, 3)
    with pytest.raises(ValueError, match="has prefix-tuning or prompt tuning applied itself: remove it before "
                                         "routing prompt tasks"):
        hf.set_row_tasks(own, ["prompt", None], torch.tensor([0, 1]))
