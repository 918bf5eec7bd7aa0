"""hf tier for the one checkpoint convention (issue 15): every hf.save_* writes a directory with a JSON
config carrying the same base fields plus safetensors; the older single-file mask and side forms are
still read; a checkpoint of another hidden size is refused with the file named."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops  # noqa: E402
import pefops.hf as hf  # noqa: E402
from tests.hf.test_adapters_api import INPUT, MASK, tiny  # noqa: E402

pytestmark = pytest.mark.hf


def wide_bert():
    config = transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)
    return transformers.AutoModel.from_config(config).eval()


def masked_model(model_type="bert"):
    model = tiny(model_type)
    hf.apply_mask_tuning(model, init_sparsity=0.3)
    hf.freeze_masks(model)
    return model


def config_of(directory, name):
    return json.loads((directory / name).read_text())


def check_base_fields(config, method, model_type="bert", architecture="BertModel", hidden=32):
    assert config["method"] == method
    assert config["pefops_version"] == pefops.__version__
    assert (config["model_type"], config["architecture"], config["hidden_size"]) == (model_type, architecture, hidden)


def test_every_saver_writes_a_directory_with_the_base_fields(tmp_path):
    model = tiny("bert")
    hf.add_adapter(model, "a", "seq_bn")
    hf.add_adapter(model, "b", "seq_bn")
    hf.add_adapter_fusion(model, ["a", "b"])
    hf.save_adapter(model, str(tmp_path / "adapter"), "a")
    hf.save_adapter_fusion(model, str(tmp_path / "fusion"), ["a", "b"])
    check_base_fields(config_of(tmp_path / "adapter", "adapter_config.json"), "bottleneck_adapter")
    check_base_fields(config_of(tmp_path / "fusion", "adapter_fusion_config.json"), "adapter_fusion")
    prefixed = tiny("gpt2")
    hf.apply_prefix_tuning(prefixed, 3, projection_hidden=8)
    hf.save_prefix(prefixed, tmp_path / "prefix")
    check_base_fields(config_of(tmp_path / "prefix", "prefix_config.json"), "prefix_tuning", "gpt2", "GPT2Model")
    prompted = tiny("llama")
    hf.apply_prompt_tuning(prompted, 2)
    hf.save_prefix(prompted, tmp_path / "prompt")
    check_base_fields(config_of(tmp_path / "prompt", "prefix_config.json"), "prompt_tuning", "llama", "LlamaModel")
    hf.save_masks(masked_model(), str(tmp_path / "masks"))
    check_base_fields(config_of(tmp_path / "masks", "masks_config.json"), "mask_tuning")
    assert (tmp_path / "masks" / "masks.safetensors").is_file()
    hf.save_side(hf.side_tune(tiny("bert"), method="side", reduction_factor=4), str(tmp_path / "side"))
    check_base_fields(config_of(tmp_path / "side", "side_config.json"), "side_tuning")
    # the saved prefix and prompt still load (the base fields are not hyper-parameters to compare)
    hf.load_prefix(tiny("gpt2"), tmp_path / "prefix")
    hf.load_prefix(tiny("llama"), tmp_path / "prompt")


def test_masks_directory_round_trip_and_old_file_form(tmp_path):
    model = masked_model()
    with torch.no_grad():
        expected = model(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    hf.save_masks(model, str(tmp_path / "task"))
    hf.save_masks(model, str(tmp_path / "task.safetensors"))  # the older form, still written and read
    for path in (tmp_path / "task", tmp_path / "task.safetensors"):
        fresh = tiny("bert")
        hf.load_masks(fresh, str(path))
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=INPUT, attention_mask=MASK).last_hidden_state, expected)
    with pytest.raises(ValueError, match="masks_config.json: saved from a model of hidden size 32; this model's is 48"):
        hf.load_masks(wide_bert(), str(tmp_path / "task"))


def test_side_directory_round_trip_and_old_file_form(tmp_path):
    tuned = hf.side_tune(tiny("bert"), method="ladder", reduction_factor=4, alpha_init=0.5)  # alpha: not the default
    with torch.no_grad():
        expected = tuned(input_ids=INPUT, attention_mask=MASK).last_hidden_state
    directory = tmp_path / "side"
    directory.mkdir()  # an existing directory: save_side used to fail with a raw "Is a directory" error
    hf.save_side(tuned, str(directory))
    hf.save_side(tuned, str(tmp_path / "side.safetensors"))
    fresh = [hf.side_tune(tiny("bert"), method="ladder", reduction_factor=4) for _ in range(2)]
    hf.load_side(fresh[0], str(directory))
    hf.load_side(fresh[1], str(tmp_path / "side.safetensors"))
    with torch.no_grad():
        for loaded in fresh:
            torch.testing.assert_close(loaded(input_ids=INPUT, attention_mask=MASK).last_hidden_state, expected)
    wide = hf.side_tune(wide_bert(), method="ladder", reduction_factor=4)
    before = {n: p.clone() for n, p in wide.side_parameters().items()}
    with pytest.raises(ValueError, match="side_config.json: saved from a model of hidden size 32"):
        hf.load_side(wide, str(directory))
    assert all(torch.equal(before[n], p) for n, p in wide.side_parameters().items())
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file is a file; a checkpoint is a directory"):
        hf.save_side(tuned, str(tmp_path / "a_file"))
