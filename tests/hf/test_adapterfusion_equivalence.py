"""hf tier: AdapterFusion against AdapterHub `adapters` 1.3 (transformers 4.57): the real adapter and
fusion checkpoints loaded into pefops on transformers 5 give the same outputs, fusion attentions'
effect, temperature schedule, gradients and regularisation loss. Fixtures: tests/fixtures/adapterfusion."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import pefops.hf as hf  # noqa: E402
from pefops.nn import AdapterFusion  # noqa: E402

pytestmark = pytest.mark.hf
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapterfusion"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "fusion").is_dir()) if FIXTURES.exists() else []


def fused_model(case_dir):
    config = transformers.AutoConfig.from_pretrained(case_dir)
    model = transformers.AutoModel.from_config(config)
    model.load_state_dict(load_file(case_dir / "base.safetensors"))
    model.eval()
    for adapter_dir in sorted((case_dir / "adapters").iterdir()):
        hf.load_adapter(model, str(adapter_dir))
    fuse = hf.load_adapter_fusion(model, str(case_dir / "fusion"), set_active=True)
    return model, fuse


def test_fixtures_cover_both_presets_on_bert_and_roberta():
    for name in ("bert_dynamic", "bert_static", "roberta_dynamic", "roberta_static"):
        assert name in CASES


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_adapterhub(case):
    case_dir = FIXTURES / case
    io = load_file(case_dir / "io.safetensors")
    model, fuse = fused_model(case_dir)
    assert fuse == hf.Fuse("a", "b", "c")
    inputs = dict(input_ids=io["input_ids"], attention_mask=io["attention_mask"])
    calls = sorted(int(k.removeprefix("last_hidden_state_call")) for k in io if k.startswith("last_hidden_state_call"))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, io["last_hidden_state"], atol=1e-5, rtol=0)
        done = 1  # forward calls so far; the temperature falls by 0.05 every call, as AdapterHub's
        for call in calls:
            if call == 0:
                torch.testing.assert_close(io["last_hidden_state_call0"], io["last_hidden_state"])
                continue
            while done < call and call - done <= 3:
                model(**inputs)
                done += 1
            if done < call:  # fast-forward a long schedule (the per-call decay itself is unit-tested)
                for module in model.modules():
                    if isinstance(module, AdapterFusion):
                        module.T = max(module.T - module.reduction * (call - done), 1.0)
                done = call
            out = model(**inputs).last_hidden_state
            done += 1
            torch.testing.assert_close(out, io[f"last_hidden_state_call{call}"], atol=1e-5, rtol=0)
        hf.set_active_adapters(model, None)
        torch.testing.assert_close(model(**inputs).last_hidden_state, io["base_last_hidden_state"], atol=1e-5, rtol=0)


def test_gradients_and_regularisation_equal_adapterhub():
    case_dir = FIXTURES / "bert_dynamic"
    grads = load_file(case_dir / "grads.safetensors")
    io = load_file(case_dir / "io.safetensors")
    model, fuse = fused_model(case_dir)
    parameters = hf.fusion_parameters(model, fuse)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters.values():
        p.requires_grad_(True)
    out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out.detach(), grads["last_hidden_state_train"], atol=1e-5, rtol=0)
    (out * grads["loss_weight"]).sum().backward()
    for name, parameter in parameters.items():
        # ours: "...output.fusions.a,b,c.query.weight"; AdapterHub: "...output.adapter_fusion_layer.a,b,c.query.weight"
        layer_index = name.split(".")[2]
        leaf = name.split("a,b,c.")[1]
        reference = grads[f"grad.encoder.layer.{layer_index}.output.adapter_fusion_layer.a,b,c.{leaf}"]
        torch.testing.assert_close(parameter.grad, reference, atol=1e-5 * max(1.0, reference.abs().max().item()), rtol=0)
    regularisation = hf.fusion_regularization_loss(model)
    torch.testing.assert_close(regularisation, grads["reg_loss"], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    case_dir = FIXTURES / "roberta_dynamic"
    io = load_file(case_dir / "io.safetensors")
    model, fuse = fused_model(case_dir)
    hf.save_adapter_fusion(model, str(tmp_path), fuse)
    meta = json.loads((tmp_path / "adapter_fusion_config.json").read_text())
    assert meta["adapter_names"] == ["a", "b", "c"] and meta["name"] == "a,b,c"
    config = transformers.AutoConfig.from_pretrained(case_dir)
    fresh = transformers.AutoModel.from_config(config)
    fresh.load_state_dict(load_file(case_dir / "base.safetensors"))
    fresh.eval()
    for adapter_dir in sorted((case_dir / "adapters").iterdir()):
        hf.load_adapter(fresh, str(adapter_dir))
    hf.load_adapter_fusion(fresh, str(tmp_path), set_active=True)
    with torch.no_grad():
        out = fresh(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out, io["last_hidden_state"], atol=1e-5, rtol=0)
