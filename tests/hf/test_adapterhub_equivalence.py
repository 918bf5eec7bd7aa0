"""hf tier: AdapterHub `adapters` 1.3 (transformers 4.57) outputs, reproduced on transformers 5 by
loading the real AdapterHub checkpoints into pefops. Fixtures: tests/fixtures/adapterhub (made by
its make_fixtures.py in a side venv)."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import pefops.hf as hf  # noqa: E402

pytestmark = pytest.mark.hf
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "adapter").is_dir())


def base_model(case_dir):
    config = transformers.AutoConfig.from_pretrained(case_dir)
    model = transformers.AutoModel.from_config(config)
    model.load_state_dict(load_file(case_dir / "base.safetensors"), strict=True)
    return model.eval()


def run(model, io):
    with torch.no_grad():
        return model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state


def test_all_presets_and_architectures_have_fixtures():
    for architecture in ("bert", "roberta", "gpt2", "llama"):
        for preset in ("seq_bn", "double_seq_bn", "par_bn"):
            assert f"{architecture}_{preset}" in CASES


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_adapterhub(case):
    case_dir = FIXTURES / case
    io = load_file(case_dir / "io.safetensors")
    model = base_model(case_dir)
    torch.testing.assert_close(run(model, io), io["base_last_hidden_state"], atol=1e-5, rtol=0)
    name = hf.load_adapter(model, str(case_dir / "adapter"), set_active=True)
    assert name == "task"
    torch.testing.assert_close(run(model, io), io["last_hidden_state"], atol=1e-5, rtol=0)
    hf.set_active_adapters(model, None)  # deactivated: the base model again
    torch.testing.assert_close(run(model, io), io["base_last_hidden_state"], atol=1e-5, rtol=0)


def test_safetensors_adapterhub_checkpoint():
    case_dir = FIXTURES / "bert_seq_bn"
    io = load_file(case_dir / "io.safetensors")
    model = base_model(case_dir)
    hf.load_adapter(model, str(case_dir / "adapter_safetensors"), set_active=True)
    torch.testing.assert_close(run(model, io), io["last_hidden_state"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["bert_double_seq_bn", "gpt2_par_bn", "bert_custom_seq", "llama_custom_par"])
def test_save_load_round_trip(case, tmp_path):
    case_dir = FIXTURES / case
    io = load_file(case_dir / "io.safetensors")
    model = base_model(case_dir)
    hf.load_adapter(model, str(case_dir / "adapter"), set_active=True)
    hf.save_adapter(model, str(tmp_path), "task")
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    fresh = base_model(case_dir)
    hf.load_adapter(fresh, str(tmp_path), load_as="again", set_active=True)
    torch.testing.assert_close(run(fresh, io), io["last_hidden_state"], atol=1e-5, rtol=0)


def test_load_rejects_mismatched_model(tmp_path):
    model = base_model(FIXTURES / "gpt2_seq_bn")
    with pytest.raises(ValueError, match="model type 'bert'"):
        hf.load_adapter(model, str(FIXTURES / "bert_seq_bn" / "adapter"))
    assert hf.list_adapters(model) == {}
