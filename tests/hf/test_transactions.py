"""Fault injection for every model-changing function of pefops.hf: each failing input must raise a
clear error (ValueError / FileNotFoundError, naming the file for loaders) and leave the model exactly as
it was: outputs bit-identical, and the same parameters (objects and values), buffers, requires_grad,
module tree, patched forwards, hooks, training flags, attention implementation and pefops
registries. A retry with good input then works."""

import json
import os
import types
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pefops.hf as hf  # noqa: E402
from pefops.hf import checkpoint as checkpoint_module  # noqa: E402
from pefops.hf import lsh_attention as lsh_module  # noqa: E402
from pefops.hf import mask_tuning as mask_module  # noqa: E402
from pefops.hf import prefix_tuning as prefix_module  # noqa: E402
from pefops.hf import row_prompt as row_prompt_module  # noqa: E402
from pefops.hf import side_tuning as side_module  # noqa: E402
from pefops.hf.adapters import AdapterLayer  # noqa: E402
from pefops.hf.config import BottleneckConfig, DoubleSeqBnConfig  # noqa: E402
from tests.hf.test_adapters_api import INPUT, MASK, tiny  # noqa: E402

pytestmark = pytest.mark.hf


# ------------------------------------------------------------------------------------ state of a model


def fingerprint(model) -> dict:
    """Everything a pefops function may change, in comparable form (tensors cloned)."""
    modules = list(model.named_modules(remove_duplicate=False))
    configs = {}
    for name, module in modules:
        config = module.__dict__.get("config")
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[name] = (id(config), config._attn_implementation, repr(getattr(config, "pefops_lsh", None)))
    pefops_attrs = {}
    for name, module in modules:
        for key, value in module.__dict__.items():
            if key.startswith("_pefops"):
                pefops_attrs[(name, key)] = repr(dict(value)) if isinstance(value, dict) else repr(value)
        if isinstance(module, AdapterLayer):
            pefops_attrs[(name, "configs")] = repr(dict(module.configs))
            pefops_attrs[(name, "active")] = repr(module.active)
        for key in ("_row_masks", "enabled", "_hooks", "trainable_modules"):
            if key in module.__dict__:
                pefops_attrs[(name, key)] = repr(module.__dict__[key])
    return {
        "parameters": {n: (id(p), p.detach().clone(), p.requires_grad, p.dtype)
                       for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: (id(b), None if b is None else b.clone()) for n, b in model.named_buffers(remove_duplicate=False)},
        "modules": [(n, type(m).__name__, id(m), m.training) for n, m in modules],
        "forwards": {n: m.__dict__.get("forward") for n, m in modules},
        "hooks": {n: tuple(tuple(getattr(m, attr)) for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                                 "_forward_hooks_with_kwargs",
                                                                 "_forward_pre_hooks_with_kwargs"))
                  for n, m in modules},
        "configs": configs,
        "pefops": pefops_attrs,
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"], "module tree / training flags changed"
    assert after["parameters"].keys() == before["parameters"].keys(), "parameter names changed"
    for name, (pid, value, grad, dtype) in before["parameters"].items():
        pid2, value2, grad2, dtype2 = after["parameters"][name]
        assert pid2 == pid, f"parameter object {name} replaced"
        assert grad2 == grad, f"requires_grad of {name} changed"
        assert dtype2 == dtype and torch.equal(value2, value), f"parameter {name} changed"
    assert after["buffers"].keys() == before["buffers"].keys(), "buffer names changed"
    for name, (bid, value) in before["buffers"].items():
        bid2, value2 = after["buffers"][name]
        assert bid2 == bid and (value is None) == (value2 is None), f"buffer {name} replaced"
        assert value is None or torch.equal(value, value2), f"buffer {name} changed"
    assert after["forwards"] == before["forwards"], "patched forwards changed"
    assert after["hooks"] == before["hooks"], "hooks changed"
    assert after["configs"] == before["configs"], "config (attention implementation / pefops_lsh) changed"
    assert after["pefops"] == before["pefops"], "pefops registries changed"


def encoder_output(model):
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).last_hidden_state.clone()


def logits_output(model):
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).logits.clone()


def randomise(parameters, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


# ------------------------------------------------------------------------------------ checkpoint surgery


def rewrite_tensors(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors = change(tensors) or tensors
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def rewrite_json(path, change):
    with open(path) as handle:
        data = json.load(handle)
    result = change(data)
    data = result if result is not None else data
    with open(path, "w") as handle:
        json.dump(data, handle)


def write_text(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def truncate(path, keep=0.5):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: int(len(data) * keep)])


def drop(mapping, key):
    mapping.pop(key)


def last_key(tensors, contains=""):
    return sorted(k for k in tensors if contains in k)[-1]


# ------------------------------------------------------------------------------------ fixtures per method


def adapter_model(model_type="bert"):
    model = tiny(model_type)
    hf.add_adapter(model, "a", "seq_bn")
    randomise(hf.adapter_parameters(model, "a").values())
    hf.set_active_adapters(model, "a")
    return model


def saved_adapter(tmp_path, name="t", config="double_seq_bn", model_type="bert"):
    source = tiny(model_type)
    hf.add_adapter(source, name, config)
    randomise(hf.adapter_parameters(source, name).values(), seed=3)
    directory = tmp_path / "adapter"
    hf.save_adapter(source, str(directory), name)
    return str(directory), source


def fusion_model():
    model = tiny("bert")
    for name in ("a", "b"):
        hf.add_adapter(model, name, "seq_bn")
        randomise(hf.adapter_parameters(model, name).values(), seed=len(name) + ord(name))
    return model


def saved_fusion(tmp_path):
    source = fusion_model()
    hf.add_adapter_fusion(source, ["a", "b"])
    randomise(hf.fusion_parameters(source, "a,b").values(), seed=5)
    directory = tmp_path / "fusion"
    hf.save_adapter_fusion(source, str(directory), "a,b")
    return str(directory)


def classifier(num_labels=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, num_labels=num_labels, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(config).eval()


def saved_masks(tmp_path, name="task.safetensors"):
    source = classifier()
    hf.apply_mask_tuning(source, targets=["query", "value"])
    torch.manual_seed(4)
    for module in hf.masked_modules(source).values():
        module.scores.data.normal_()
    randomise(source.classifier.parameters(), seed=6)
    path = tmp_path / name
    hf.save_masks(source, str(path))
    return str(path)


def masked_classifier():
    model = classifier()
    hf.apply_mask_tuning(model, targets=["query", "value"])
    hf.freeze_masks(model)
    return model


def side_model():
    return hf.side_tune(tiny("bert"), method="ladder", reduction_factor=4)


def saved_side(tmp_path):
    source = side_model()
    randomise(source.side_parameters().values(), seed=7)
    path = tmp_path / "side.safetensors"
    hf.save_side(source, str(path))
    return str(path)


def saved_prefix(tmp_path, method="prefix"):
    source = classifier()
    if method == "prefix":
        hf.apply_prefix_tuning(source, 3, projection_hidden=16, trainable_modules=["classifier"])
    else:
        hf.apply_prompt_tuning(source, 3, trainable_modules=["classifier"])
    randomise([p for p in source.parameters() if p.requires_grad], seed=8)
    directory = tmp_path / method
    hf.save_prefix(source, str(directory))
    return str(directory)


def peft_checkpoint(tmp_path, peft_type="PREFIX_TUNING", count=3):
    """A PEFT save_pretrained directory written by hand (what PEFT 0.21 writes for a tiny BERT)."""
    directory = tmp_path / "peft"
    directory.mkdir()
    if peft_type == "PREFIX_TUNING":
        config = {"peft_type": peft_type, "num_virtual_tokens": count, "num_layers": 2, "token_dim": 32,
                  "num_attention_heads": 4, "num_transformer_submodules": 1, "task_type": "SEQ_CLS"}
        flat = torch.randn(count, 2 * 2 * 32)
    else:
        config = {"peft_type": peft_type, "num_virtual_tokens": count, "token_dim": 32,
                  "num_transformer_submodules": 1, "task_type": "SEQ_CLS"}
        flat = torch.randn(count, 32)
    tensors = {"prompt_embeddings": flat, "base_model.classifier.modules_to_save.default.weight": torch.randn(3, 32),
               "base_model.classifier.modules_to_save.default.bias": torch.randn(3)}
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return str(directory)


def lsh_reformer():
    from tests.hf.test_lsh_attention import reformer_config

    torch.manual_seed(0)
    return transformers.ReformerModel(reformer_config()).eval()


def reformer_output(model):
    ids = torch.randint(2, 61, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.clone()


def side_output(model):
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).last_hidden_state.clone()


def boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def fail_after(real):
    """`real` runs (changing the model), then the call fails: what rollback must undo."""

    def wrapper(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("injected failure")

    return wrapper


# ------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    function: str  # the pefops.hf function under test
    name: str
    build: Callable  # (tmp_path) -> model
    fail: Callable  # (model, tmp_path, monkeypatch) -> None; must raise
    retry: Optional[Callable]  # (model, tmp_path) -> None; must work
    output: Callable = encoder_output
    match: Optional[str] = None  # a regex the error must match
    error: type = ValueError  # RuntimeError for injected failures


def _file_in(tmp_path, *parts):
    return os.path.join(str(tmp_path), *parts)


def adapter_load_case(name, corrupt, match=None, error=ValueError, load_as=None, build=adapter_model):
    def fail(model, tmp_path, monkeypatch):
        directory, _ = saved_adapter(tmp_path)
        corrupt(directory)
        hf.load_adapter(model, directory, load_as=load_as)

    def retry(model, tmp_path):
        import shutil

        shutil.rmtree(_file_in(tmp_path, "adapter"))
        directory, source = saved_adapter(tmp_path)
        hf.load_adapter(model, directory, set_active=True)
        hf.set_active_adapters(source, "t")
        torch.testing.assert_close(encoder_output(model), encoder_output(source), atol=1e-5, rtol=0)

    return Case("load_adapter", name, lambda tmp: build(), fail, retry, match=match, error=error)


ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _weights(directory):
    return os.path.join(directory, ADAPTER_WEIGHTS)


def _config(directory):
    return os.path.join(directory, ADAPTER_CONFIG)


def _set_config_field(key, value):
    def corrupt(directory):
        def change(data):
            data["config"][key] = value
        rewrite_json(_config(directory), change)
    return corrupt


def _pop_config_field(key):
    def corrupt(directory):
        rewrite_json(_config(directory), lambda data: drop(data["config"], key))
    return corrupt



def bad_config_case(what, bad_config, good_config, match):
    """add_adapter(m, "b", bad_config) refused; the retry adds "b" with good_config."""
    return Case("add_adapter", what, lambda tmp: adapter_model(), lambda m, tmp, mp: hf.add_adapter(m, "b", bad_config),
                lambda m, tmp: hf.add_adapter(m, "b", good_config), match=match)


CASES = [
    # ---- add_adapter
    Case("add_adapter", "existing name, other sites", lambda tmp: adapter_model(),
         lambda m, tmp, mp: hf.add_adapter(m, "a", "double_seq_bn"),
         lambda m, tmp: hf.add_adapter(m, "b", "double_seq_bn"), match="already has an adapter named 'a'"),
    Case("add_adapter", "reduction_factor map missing a layer", lambda tmp: adapter_model(),
         lambda m, tmp, mp: hf.add_adapter(m, "b", DoubleSeqBnConfig(reduction_factor={"0": 8})),
         lambda m, tmp: (hf.add_adapter(m, "b", DoubleSeqBnConfig(reduction_factor={"0": 8, "default": 4})),
                         hf.remove_adapter(m, "b")), match="no entry for layer 1"),
    bad_config_case("reduction_factor 0", "seq_bn[reduction_factor=0]", "seq_bn[reduction_factor=2]", "reduction_factor"),
    bad_config_case("unknown activation", "seq_bn[non_linearity=nope]", "seq_bn[non_linearity=tanh]", "unknown activation"),
    bad_config_case("unknown config key", "seq_bn[reduction=2]", "seq_bn", "unknown bottleneck config keys"),
    Case("add_adapter", "name with a dot", lambda tmp: adapter_model(),
         lambda m, tmp, mp: hf.add_adapter(m, "b.c", "seq_bn"),
         lambda m, tmp: hf.add_adapter(m, "bc", "seq_bn"), match="adapter name"),
    bad_config_case("places no adapter", BottleneckConfig(False, False, 16, "relu"), "seq_bn", "places no adapter"),
    Case("add_adapter", "injected: layer construction fails at layer 1", lambda tmp: adapter_model(),
         lambda m, tmp, mp: (mp.setattr(AdapterLayer, "add", _fail_on_call(AdapterLayer.add, 2)),
                             hf.add_adapter(m, "b", "double_seq_bn", set_active=True)),
         lambda m, tmp: hf.add_adapter(m, "b", "double_seq_bn", set_active=True), error=RuntimeError),
    Case("add_adapter", "injected: activation fails (gpt2 hooks installed first)", lambda tmp: tiny("gpt2"),
         lambda m, tmp, mp: (mp.setattr(hf.adapters, "set_active_adapters", boom),
                             hf.add_adapter(m, "b", "double_seq_bn", set_active=True)),
         lambda m, tmp: hf.add_adapter(m, "b", "double_seq_bn", set_active=True), error=RuntimeError),
    # ---- remove_adapter
    Case("remove_adapter", "unknown name", lambda tmp: adapter_model(),
         lambda m, tmp, mp: hf.remove_adapter(m, "zz"), lambda m, tmp: hf.remove_adapter(m, "a"),
         match="no adapter named 'zz'"),
    Case("remove_adapter", "fused by an active fusion", lambda tmp: _active_fusion(),
         lambda m, tmp, mp: hf.remove_adapter(m, "a"),
         lambda m, tmp: (hf.remove_adapter_fusion(m, "a,b"), hf.remove_adapter(m, "a")), match="is fused by"),
    Case("remove_adapter", "injected: deactivation fails", lambda tmp: adapter_model(),
         lambda m, tmp, mp: (mp.setattr(hf.adapters, "set_active_adapters", boom), hf.remove_adapter(m, "a")),
         lambda m, tmp: hf.remove_adapter(m, "a"), error=RuntimeError),
    # ---- set_active_adapters
    Case("set_active_adapters", "unknown name", lambda tmp: adapter_model(),
         lambda m, tmp, mp: hf.set_active_adapters(m, "zz"), lambda m, tmp: hf.set_active_adapters(m, None),
         match="no adapter named 'zz'"),
    Case("set_active_adapters", "fusion not added", lambda tmp: fusion_model(),
         lambda m, tmp, mp: hf.set_active_adapters(m, hf.Fuse("a", "b")),
         lambda m, tmp: hf.set_active_adapters(m, "b"), match="no fusion 'a,b'"),
    Case("set_active_adapters", "row index out of range", lambda tmp: fusion_model(),
         lambda m, tmp, mp: hf.set_active_adapters(m, ["a", "b"], row_adapter=torch.tensor([0, 2])),
         lambda m, tmp: hf.set_active_adapters(m, ["a", "b"], row_adapter=torch.tensor([1, 0])),
         match="row_adapter values"),
    Case("set_active_adapters", "float row index", lambda tmp: fusion_model(),
         lambda m, tmp, mp: hf.set_active_adapters(m, ["a", "b"], row_adapter=torch.tensor([0.0, 1.0])),
         lambda m, tmp: hf.set_active_adapters(m, ["a", "b"], row_adapter=torch.tensor([1, 0])),
         match="integer tensor"),
    Case("set_active_adapters", "two names without routing", lambda tmp: fusion_model(),
         lambda m, tmp, mp: hf.set_active_adapters(m, ["a", "b"]), lambda m, tmp: hf.set_active_adapters(m, ["a"]),
         match="one bottleneck adapter"),
    # ---- train_adapter
    Case("train_adapter", "unknown name", lambda tmp: adapter_model(),
         lambda m, tmp, mp: hf.train_adapter(m, "zz"), lambda m, tmp: hf.train_adapter(m, "a"),
         match="no adapter named 'zz'"),
    Case("train_adapter", "injected: activation fails after freezing", lambda tmp: adapter_model(),
         lambda m, tmp, mp: (mp.setattr(hf.adapters, "set_active_adapters", boom), hf.train_adapter(m, "a")),
         lambda m, tmp: hf.train_adapter(m, "a"), error=RuntimeError),
    # ---- load_adapter
    adapter_load_case("config is a JSON list", lambda d: write_text(_config(d), "[1, 2]"), match="adapter_config.json"),
    adapter_load_case("truncated JSON", lambda d: truncate(_config(d)), match="adapter_config.json"),
    adapter_load_case("reduction_factor 0", _set_config_field("reduction_factor", 0),
                      match="adapter_config.json.*reduction_factor"),
    adapter_load_case("config lacks mh_adapter", _pop_config_field("mh_adapter"),
                      match="adapter_config.json.*mh_adapter"),
    adapter_load_case("unknown config key", _set_config_field("bogus", 1), match="adapter_config.json.*bogus"),
    adapter_load_case("config field not an object", lambda d: rewrite_json(_config(d), lambda x: x.update(config=3)),
                      match="adapter_config.json"),
    adapter_load_case("model type differs", lambda d: rewrite_json(_config(d), lambda x: x.update(model_type="gpt2")),
                      match="model type"),
    adapter_load_case("hidden size differs", lambda d: rewrite_json(_config(d), lambda x: x.update(hidden_size=64)),
                      match="hidden size"),
    adapter_load_case("weights file missing", lambda d: os.remove(_weights(d)), error=FileNotFoundError,
                      match="adapter.safetensors"),
    adapter_load_case("weights truncated", lambda d: truncate(_weights(d)), match="adapter.safetensors"),
    adapter_load_case("wrong shape in the last tensor",
                      lambda d: rewrite_tensors(_weights(d), lambda t: t.update(
                          {last_key(t): torch.zeros(t[last_key(t)].numel() + 1)})),
                      match="adapter.safetensors.*shape"),
    adapter_load_case("broadcastable shape",
                      lambda d: rewrite_tensors(_weights(d), lambda t: t.update(
                          {last_key(t, "adapter_up.weight"): t[last_key(t, "adapter_up.weight")][:1]})),
                      match="adapter.safetensors.*shape"),
    adapter_load_case("missing tensor", lambda d: rewrite_tensors(_weights(d), lambda t: drop(t, last_key(t))),
                      match="lacks 1 adapter tensors"),
    adapter_load_case("unexpected tensor under the adapter's prefix",
                      lambda d: rewrite_tensors(_weights(d), lambda t: t.update(
                          {"encoder.layer.0.output.adapters.t.adapter_extra.weight": torch.zeros(2)})),
                      match="adapter.safetensors.*adapter_extra"),
    adapter_load_case("unexpected key elsewhere",
                      lambda d: rewrite_tensors(_weights(d), lambda t: t.update({"pooler.dense.weight": torch.zeros(2)})),
                      match="pooler.dense.weight"),
    adapter_load_case("integer tensor", lambda d: rewrite_tensors(_weights(d), lambda t: t.update(
        {last_key(t): t[last_key(t)].to(torch.int64)})), match="dtype"),
    adapter_load_case("load_as empty", lambda d: None, load_as="", match="load_as"),
    adapter_load_case("name already in the model", lambda d: None, load_as="a", match="already has an adapter"),
    Case("load_adapter", "injected: activation fails after the copy", lambda tmp: adapter_model(),
         lambda m, tmp, mp: (mp.setattr(checkpoint_module, "set_active_adapters", boom),
                             hf.load_adapter(m, saved_adapter(tmp)[0], set_active=True)),
         lambda m, tmp: hf.load_adapter(m, saved_adapter(tmp)[0], set_active=True), error=RuntimeError),
    # ---- add_adapter_fusion / train_adapter_fusion / remove_adapter_fusion
    Case("add_adapter_fusion", "unknown adapter", lambda tmp: fusion_model(),
         lambda m, tmp, mp: hf.add_adapter_fusion(m, ["a", "zz"]), lambda m, tmp: hf.add_adapter_fusion(m, ["a", "b"]),
         match="unknown adapters \\['zz'\\]"),
    Case("add_adapter_fusion", "already added", lambda tmp: _active_fusion(),
         lambda m, tmp, mp: hf.add_adapter_fusion(m, ["a", "b"]), lambda m, tmp: hf.add_adapter_fusion(m, ["b", "a"]),
         match="already has a fusion"),
    Case("add_adapter_fusion", "bad config value", lambda tmp: fusion_model(),
         lambda m, tmp, mp: hf.add_adapter_fusion(m, ["a", "b"], {"dropout_prob": 2.0}),
         lambda m, tmp: hf.add_adapter_fusion(m, ["a", "b"], {"dropout_prob": 0.1}), match="dropout_prob"),
    Case("add_adapter_fusion", "parallel adapters", lambda tmp: _with_parallel(fusion_model()),
         lambda m, tmp, mp: hf.add_adapter_fusion(m, ["a", "p"]), lambda m, tmp: hf.add_adapter_fusion(m, ["a", "b"]),
         match="parallel"),
    Case("add_adapter_fusion", "injected: activation fails", lambda tmp: fusion_model(),
         lambda m, tmp, mp: (mp.setattr(hf.adapters, "set_active_adapters", boom),
                             hf.add_adapter_fusion(m, ["a", "b"], set_active=True)),
         lambda m, tmp: hf.add_adapter_fusion(m, ["a", "b"], set_active=True), error=RuntimeError),
    Case("train_adapter_fusion", "unknown fusion", lambda tmp: _active_fusion(),
         lambda m, tmp, mp: hf.train_adapter_fusion(m, ["b", "a"]), lambda m, tmp: hf.train_adapter_fusion(m, ["a", "b"]),
         match="no fusion 'b,a'"),
    Case("train_adapter_fusion", "injected: activation fails after freezing", lambda tmp: _active_fusion(),
         lambda m, tmp, mp: (mp.setattr(hf.adapters, "set_active_adapters", boom), hf.train_adapter_fusion(m, "a,b")),
         lambda m, tmp: hf.train_adapter_fusion(m, "a,b"), error=RuntimeError),
    Case("remove_adapter_fusion", "unknown fusion", lambda tmp: _active_fusion(),
         lambda m, tmp, mp: hf.remove_adapter_fusion(m, "b,a"), lambda m, tmp: hf.remove_adapter_fusion(m, "a,b"),
         match="no fusion 'b,a'"),
    Case("remove_adapter_fusion", "injected: deactivation fails", lambda tmp: _active_fusion(),
         lambda m, tmp, mp: (mp.setattr(hf.adapters, "set_active_adapters", boom), hf.remove_adapter_fusion(m, "a,b")),
         lambda m, tmp: hf.remove_adapter_fusion(m, "a,b"), error=RuntimeError),
]


def _fail_on_call(real, failing_call):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return wrapper


def _active_fusion():
    model = fusion_model()
    hf.add_adapter_fusion(model, ["a", "b"], set_active=True)
    randomise(hf.fusion_parameters(model, "a,b").values(), seed=9)
    return model


def _with_parallel(model):
    hf.add_adapter(model, "p", "par_bn")
    return model


# ---- load_adapter_fusion
def fusion_load_case(name, corrupt, match=None, error=ValueError, build=fusion_model):
    def fail(model, tmp_path, monkeypatch):
        directory = saved_fusion(tmp_path)
        corrupt(directory)
        hf.load_adapter_fusion(model, directory)

    def retry(model, tmp_path):
        import shutil

        shutil.rmtree(_file_in(tmp_path, "fusion"))
        hf.load_adapter_fusion(model, saved_fusion(tmp_path), set_active=True)
        encoder_output(model)

    return Case("load_adapter_fusion", name, lambda tmp: build(), fail, retry, match=match, error=error)


FUSION_WEIGHTS = "model_adapter_fusion.safetensors"
FUSION_CONFIG = "adapter_fusion_config.json"
CASES += [
    fusion_load_case("broadcastable [1, H] query weight", lambda d: rewrite_tensors(
        os.path.join(d, FUSION_WEIGHTS), lambda t: t.update({last_key(t, "query.weight"): t[last_key(t, "query.weight")][:1]})),
        match="query.weight.*shape"),
    fusion_load_case("wrong shape in the last tensor", lambda d: rewrite_tensors(
        os.path.join(d, FUSION_WEIGHTS), lambda t: t.update({last_key(t): torch.zeros(3)})), match="shape"),
    fusion_load_case("missing tensor", lambda d: rewrite_tensors(
        os.path.join(d, FUSION_WEIGHTS), lambda t: drop(t, last_key(t))), match="lacks 1 fusion"),
    fusion_load_case("unexpected tensor", lambda d: rewrite_tensors(
        os.path.join(d, FUSION_WEIGHTS), lambda t: t.update({"encoder.layer.0.output.adapter_fusion_layer.a,b.bogus":
                                                             torch.zeros(2)})), match="bogus"),
    fusion_load_case("weights missing", lambda d: os.remove(os.path.join(d, FUSION_WEIGHTS)), error=FileNotFoundError),
    fusion_load_case("weights truncated", lambda d: truncate(os.path.join(d, FUSION_WEIGHTS)), match=FUSION_WEIGHTS),
    fusion_load_case("config truncated", lambda d: truncate(os.path.join(d, FUSION_CONFIG)), match=FUSION_CONFIG),
    fusion_load_case("config a JSON list", lambda d: write_text(os.path.join(d, FUSION_CONFIG), "[]"), match=FUSION_CONFIG),
    fusion_load_case("unknown config key", lambda d: rewrite_json(os.path.join(d, FUSION_CONFIG),
                                                                  lambda x: x["config"].update(bogus=1)),
                     match="bogus"),
    fusion_load_case("fused adapters not loaded", lambda d: rewrite_json(
        os.path.join(d, FUSION_CONFIG), lambda x: x.update(adapter_names=["a", "zz"], name="a,zz")), match="zz"),
    fusion_load_case("integer tensor", lambda d: rewrite_tensors(
        os.path.join(d, FUSION_WEIGHTS), lambda t: t.update({last_key(t): t[last_key(t)].long()})), match="dtype"),
]


# ---- mask-tuning
MASK_FILE = "task.safetensors"


def masks_case(name, corrupt, build, match=None, error=ValueError):
    def fail(model, tmp_path, monkeypatch):
        path = saved_masks(tmp_path)
        corrupt(path)
        hf.load_masks(model, path)

    def retry(model, tmp_path):
        path = saved_masks(tmp_path, "good.safetensors")
        hf.load_masks(model, path)
        logits_output(model)

    return Case("load_masks", name, lambda tmp: build(), fail, retry, output=logits_output, match=match, error=error)


def _bad_head(path):
    rewrite_tensors(path, lambda t: t.update({"classifier.weight": torch.zeros(2, 32)}))


CASES += [
    Case("apply_mask_tuning", "targets match nothing", lambda tmp: classifier(),
         lambda m, tmp, mp: hf.apply_mask_tuning(m, targets=["nonexistent"]),
         lambda m, tmp: hf.apply_mask_tuning(m, targets=["query"]), output=logits_output, match="no Linear layer"),
    Case("apply_mask_tuning", "init_sparsity out of range", lambda tmp: classifier(),
         lambda m, tmp, mp: hf.apply_mask_tuning(m, init_sparsity=2.0),
         lambda m, tmp: hf.apply_mask_tuning(m), output=logits_output, match="init_sparsity"),
    Case("apply_mask_tuning", "injected: the third replacement fails", lambda tmp: classifier(),
         lambda m, tmp, mp: (mp.setattr(mask_module.MaskedLinear, "from_linear",
                                        classmethod(_fail_on_call(mask_module.MaskedLinear.from_linear.__func__, 3))),
                             hf.apply_mask_tuning(m)),
         lambda m, tmp: hf.apply_mask_tuning(m), output=logits_output, error=RuntimeError),
    Case("freeze_masks", "injected: the second layer fails", lambda tmp: _masked_unfrozen(),
         lambda m, tmp, mp: (mp.setattr(mask_module.MaskedLinear, "freeze",
                                        _fail_on_call(mask_module.MaskedLinear.freeze, 2)), hf.freeze_masks(m)),
         lambda m, tmp: hf.freeze_masks(m), output=logits_output, error=RuntimeError),
    masks_case("bad head tensor, model with masks", _bad_head, masked_classifier, match="classifier.weight.*shape"),
    masks_case("bad head tensor, model without masks", _bad_head, classifier, match="classifier.weight.*shape"),
    masks_case("file writes a frozen base weight (pooler)", lambda p: rewrite_tensors(
        p, lambda t: t.update({"bert.pooler.dense.weight": torch.zeros(32, 32)})), masked_classifier,
        match="bert.pooler.dense.weight"),
    masks_case("mask of the wrong dtype", lambda p: rewrite_tensors(p, lambda t: t.update(
        {last_key(t, ".mask"): t[last_key(t, ".mask")].float()})), masked_classifier, match="dtype"),
    masks_case("mask of the wrong shape", lambda p: rewrite_tensors(p, lambda t: t.update(
        {last_key(t, ".mask"): t[last_key(t, ".mask")][:1]})), classifier, match="shape"),
    masks_case("mask for a layer the model has not masked", lambda p: rewrite_tensors(p, lambda t: t.update(
        {"bert.encoder.layer.0.attention.self.key.mask": t[last_key(t, ".mask")].clone()})), masked_classifier,
        match="does not match"),
    masks_case("mask naming no layer", lambda p: rewrite_tensors(p, lambda t: t.update(
        {"bert.encoder.layer.0.nothing.mask": t[last_key(t, ".mask")].clone()})), classifier, match="nothing"),
    masks_case("missing mask", lambda p: rewrite_tensors(p, lambda t: drop(t, last_key(t, ".mask"))),
               masked_classifier, match="missing"),
    masks_case("truncated file", lambda p: truncate(p), classifier, match=MASK_FILE),
    masks_case("not a mask file", lambda p: _strip_metadata(p), classifier,
               match="not a pefops mask file"),
    Case("set_row_masks", "float row_task", lambda tmp: masked_classifier(),
         lambda m, tmp, mp: hf.set_row_masks(m, [saved_masks(tmp)], torch.tensor([0.0, 0.0])),
         lambda m, tmp: hf.set_row_masks(m, [saved_masks(tmp, "g.safetensors")], torch.tensor([0, 0])),
         output=logits_output, match="row_task"),
    Case("set_row_masks", "second file has a wrong mask shape", lambda tmp: masked_classifier(),
         lambda m, tmp, mp: hf.set_row_masks(m, [saved_masks(tmp), _corrupted(saved_masks(tmp, "b.safetensors"))],
                                             torch.tensor([0, 1])),
         lambda m, tmp: hf.set_row_masks(m, [saved_masks(tmp, "g.safetensors")] * 2, torch.tensor([0, 1])),
         output=logits_output, match="b.safetensors.*shape"),
]


def _masked_unfrozen():
    model = classifier()
    hf.apply_mask_tuning(model, targets=["query", "value"])
    return model


def _strip_metadata(path):
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata={"format": "other"})


def _corrupted(path):
    rewrite_tensors(path, lambda t: t.update({last_key(t, ".mask"): t[last_key(t, ".mask")][:1]}))
    return path


# ---- side-tuning
def side_case(name, corrupt, match=None, error=ValueError):
    def fail(model, tmp_path, monkeypatch):
        path = saved_side(tmp_path)
        corrupt(path)
        hf.load_side(model, path)

    def retry(model, tmp_path):
        hf.load_side(model, saved_side(tmp_path))

    return Case("load_side", name, lambda tmp: side_model(), fail, retry, output=side_output, match=match,
                error=error)


CASES += [
    Case("side_tune", "unknown method", lambda tmp: tiny("bert"),
         lambda m, tmp, mp: hf.side_tune(m, method="nope"), lambda m, tmp: hf.side_tune(m), match="method"),
    Case("side_tune", "reduction_factor 0", lambda tmp: tiny("bert"),
         lambda m, tmp, mp: hf.side_tune(m, reduction_factor=0), lambda m, tmp: hf.side_tune(m), match="reduction_factor"),
    Case("side_tune", "injected: ladder initialisation fails", lambda tmp: tiny("bert"),
         lambda m, tmp, mp: (mp.setattr(side_module, "SideTunedModel", boom), hf.side_tune(m)),
         lambda m, tmp: hf.side_tune(m), error=RuntimeError),
    side_case("wrong shape in the last tensor", lambda p: rewrite_tensors(p, lambda t: t.update(
        {last_key(t): torch.zeros(t[last_key(t)].numel() + 1)})), match="side.safetensors.*shape"),
    side_case("missing tensor", lambda p: rewrite_tensors(p, lambda t: drop(t, last_key(t))), match="lacks"),
    side_case("unexpected tensor", lambda p: rewrite_tensors(p, lambda t: t.update({"tuned.base.x": torch.zeros(1)})),
              match="tuned.base.x"),
    side_case("truncated", truncate, match="side.safetensors"),
    side_case("integer tensor", lambda p: rewrite_tensors(p, lambda t: t.update({last_key(t): t[last_key(t)].long()})),
              match="dtype"),
    Case("load_side", "injected: failure after the copy", lambda tmp: side_model(),
         lambda m, tmp, mp: (mp.setattr(side_module, "copy_into", fail_after(side_module.copy_into)),
                             hf.load_side(m, saved_side(tmp))),
         lambda m, tmp: hf.load_side(m, saved_side(tmp)), output=side_output, error=RuntimeError),
]


# ---- prefix / prompt tuning
def prefix_case(function, name, corrupt, method="prefix", build=classifier, match=None, error=ValueError):
    def fail(model, tmp_path, monkeypatch):
        directory = saved_prefix(tmp_path, method)
        corrupt(directory)
        hf.load_prefix(model, directory)

    def retry(model, tmp_path):
        import shutil

        shutil.rmtree(_file_in(tmp_path, method))
        hf.load_prefix(model, saved_prefix(tmp_path, method))
        logits_output(model)

    return Case(function, name, lambda tmp: build(), fail, retry, output=logits_output, match=match, error=error)


PREFIX_WEIGHTS, PREFIX_CONFIG = "prefix.safetensors", "prefix_config.json"


def _with_prefix():
    model = classifier()
    hf.apply_prefix_tuning(model, 3, projection_hidden=16, trainable_modules=["classifier"])
    return model


def _with_prompt():
    model = classifier()
    hf.apply_prompt_tuning(model, 3, trainable_modules=["classifier"])
    return model



def virtual_token_cases(apply):
    """The argument checks apply_prefix_tuning and apply_prompt_tuning share."""
    name = apply.__name__
    return [
        Case(name, "misspelt trainable module", lambda tmp: classifier(),
             lambda m, tmp, mp: apply(m, 3, trainable_modules=["clasifier"]),
             lambda m, tmp: apply(m, 3, trainable_modules=["classifier"]), output=logits_output, match="clasifier"),
        Case(name, "num_virtual_tokens 0", lambda tmp: classifier(), lambda m, tmp, mp: apply(m, 0),
             lambda m, tmp: apply(m, 2), output=logits_output, match="num_virtual_tokens"),
    ]


CASES += virtual_token_cases(hf.apply_prefix_tuning) + virtual_token_cases(hf.apply_prompt_tuning)
CASES += [
    Case("apply_prefix_tuning", "already applied", lambda tmp: _with_prefix(),
         lambda m, tmp, mp: hf.apply_prefix_tuning(m, 3),
         lambda m, tmp: (hf.remove_prefix_tuning(m), hf.apply_prefix_tuning(m, 3)), output=logits_output,
         match="already has prefix-tuning"),
    Case("apply_prefix_tuning", "injected: implementation switch fails", lambda tmp: classifier(),
         lambda m, tmp, mp: (mp.setattr(prefix_module, "_set_implementation", fail_after(prefix_module._set_implementation)),
                             hf.apply_prefix_tuning(m, 3, peft_compatible_positions=True)),
         lambda m, tmp: hf.apply_prefix_tuning(m, 3, peft_compatible_positions=True), output=logits_output,
         error=RuntimeError),
    Case("remove_prefix_tuning", "nothing applied", lambda tmp: classifier(),
         lambda m, tmp, mp: hf.remove_prefix_tuning(m), lambda m, tmp: hf.apply_prefix_tuning(m, 3),
         output=logits_output, match="no prefix-tuning"),
    Case("remove_prefix_tuning", "injected: restoring the implementation fails", lambda tmp: _with_prefix(),
         lambda m, tmp, mp: (mp.setattr(prefix_module, "_set_implementation", boom), hf.remove_prefix_tuning(m)),
         lambda m, tmp: hf.remove_prefix_tuning(m), output=logits_output, error=RuntimeError),
    prefix_case("load_prefix", "weights missing", lambda d: os.remove(os.path.join(d, PREFIX_WEIGHTS)),
                error=FileNotFoundError, match=PREFIX_WEIGHTS),
    prefix_case("load_prefix", "weights truncated", lambda d: truncate(os.path.join(d, PREFIX_WEIGHTS)),
                match=PREFIX_WEIGHTS),
    prefix_case("load_prefix", "wrong shape", lambda d: rewrite_tensors(
        os.path.join(d, PREFIX_WEIGHTS), lambda t: t.update({last_key(t, "encoder"): torch.zeros(1)})),
        match="shape"),
    prefix_case("load_prefix", "wrong shape, model already prefixed", lambda d: rewrite_tensors(
        os.path.join(d, PREFIX_WEIGHTS), lambda t: t.update({last_key(t, "encoder"): torch.zeros(1)})),
        build=_with_prefix, match="shape"),
    prefix_case("load_prefix", "config lacks num_virtual_tokens", lambda d: rewrite_json(
        os.path.join(d, PREFIX_CONFIG), lambda x: drop(x, "num_virtual_tokens")),
        match="prefix_config.json.*num_virtual_tokens"),
    prefix_case("load_prefix", "config truncated", lambda d: truncate(os.path.join(d, PREFIX_CONFIG)),
                match=PREFIX_CONFIG),
    prefix_case("load_prefix", "config a JSON list", lambda d: write_text(os.path.join(d, PREFIX_CONFIG), "[]"),
                match=PREFIX_CONFIG),
    prefix_case("load_prefix", "trainable module unknown", lambda d: rewrite_json(
        os.path.join(d, PREFIX_CONFIG), lambda x: x.update(trainable_modules=["clasifier"])), match="clasifier"),
    prefix_case("load_prefix", "unexpected tensor", lambda d: rewrite_tensors(
        os.path.join(d, PREFIX_WEIGHTS), lambda t: t.update({"model.bert.pooler.dense.weight": torch.zeros(32, 32)})),
        match="pooler"),
    prefix_case("load_prefix", "prompt: wrong shape", lambda d: rewrite_tensors(
        os.path.join(d, PREFIX_WEIGHTS), lambda t: t.update({last_key(t, "prompt"): torch.zeros(2, 32)})),
        method="prompt", match="shape"),
    prefix_case("load_prefix", "prompt: weights missing", lambda d: os.remove(os.path.join(d, PREFIX_WEIGHTS)),
                method="prompt", error=FileNotFoundError),
    Case("remove_prompt_tuning", "nothing applied", lambda tmp: classifier(),
         lambda m, tmp, mp: hf.remove_prompt_tuning(m), lambda m, tmp: hf.apply_prompt_tuning(m, 2),
         output=logits_output, match="no prompt tuning"),
    Case("remove_prompt_tuning", "injected: attribute removal fails", lambda tmp: _with_prompt(),
         lambda m, tmp, mp: (mp.setattr(m.prompt_tuning._hooks[0], "remove", fail_after(m.prompt_tuning._hooks[0].remove)),
                             hf.remove_prompt_tuning(m)),
         lambda m, tmp: hf.remove_prompt_tuning(m), output=logits_output, error=RuntimeError),
    Case("set_trainable_modules", "misspelt", lambda tmp: _with_prefix(),
         lambda m, tmp, mp: prefix_module.set_trainable_modules(m, ["bert.pooler", "clasifier"]),
         lambda m, tmp: prefix_module.set_trainable_modules(m, ["bert.pooler"]), output=logits_output,
         match="clasifier"),
]


# ---- PEFT imports
def peft_case(function, name, corrupt, peft_type="PREFIX_TUNING", match=None, error=ValueError):
    def fail(model, tmp_path, monkeypatch):
        directory = peft_checkpoint(tmp_path, peft_type)
        corrupt(directory)
        (hf.load_peft_prefix if peft_type == "PREFIX_TUNING" else hf.load_peft_prompt)(model, directory)

    def retry(model, tmp_path):
        import shutil

        shutil.rmtree(_file_in(tmp_path, "peft"))
        (hf.load_peft_prefix if peft_type == "PREFIX_TUNING" else hf.load_peft_prompt)(
            model, peft_checkpoint(tmp_path, peft_type))
        logits_output(model)

    return Case(function, name, lambda tmp: classifier(), fail, retry, output=logits_output, match=match,
                error=error)


PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
CASES += [
    peft_case("load_peft_prefix", "config lacks num_virtual_tokens", lambda d: rewrite_json(
        os.path.join(d, PEFT_CONFIG), lambda x: drop(x, "num_virtual_tokens")),
        match="adapter_config.json.*num_virtual_tokens"),
    peft_case("load_peft_prefix", "weights truncated", lambda d: truncate(os.path.join(d, PEFT_WEIGHTS)),
              match=PEFT_WEIGHTS),
    peft_case("load_peft_prefix", "weights missing", lambda d: os.remove(os.path.join(d, PEFT_WEIGHTS)),
              match=PEFT_WEIGHTS),
    peft_case("load_peft_prefix", "wrong-shaped prefix", lambda d: rewrite_tensors(
        os.path.join(d, PEFT_WEIGHTS), lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :-1])),
        match="prompt_embeddings.*shape"),
    peft_case("load_peft_prefix", "layer count differs", lambda d: rewrite_json(
        os.path.join(d, PEFT_CONFIG), lambda x: x.update(num_layers=3)), match="num_layers"),
    peft_case("load_peft_prefix", "head tensor of the wrong shape", lambda d: rewrite_tensors(
        os.path.join(d, PEFT_WEIGHTS), lambda t: t.update(
            {"base_model.classifier.modules_to_save.default.weight": torch.zeros(2, 32)})), match="classifier"),
    peft_case("load_peft_prefix", "tensor matching no parameter", lambda d: rewrite_tensors(
        os.path.join(d, PEFT_WEIGHTS), lambda t: t.update({"base_model.nothing.weight": torch.zeros(1)})),
        match="nothing"),
    peft_case("load_peft_prompt", "wrong-shaped prompt", lambda d: rewrite_tensors(
        os.path.join(d, PEFT_WEIGHTS), lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :-1])),
        peft_type="PROMPT_TUNING", match="prompt_embeddings"),
    peft_case("load_peft_prompt", "head tensor of the wrong shape", lambda d: rewrite_tensors(
        os.path.join(d, PEFT_WEIGHTS), lambda t: t.update(
            {"base_model.classifier.modules_to_save.default.bias": torch.zeros(2)})), peft_type="PROMPT_TUNING",
        match="classifier"),
    peft_case("load_peft_prompt", "config truncated", lambda d: truncate(os.path.join(d, PEFT_CONFIG)),
              peft_type="PROMPT_TUNING", match=PEFT_CONFIG),
]



# ---- mixed-task batches with prompt rows
def _prompt_task_model(tmp_path, model_type="gpt2"):
    """A model with an adapter task "a" and a prompt task "p" (2 virtual tokens), routed per row where the
    model type allows prompt rows (the routing a failed set_row_tasks must keep)."""
    source = tiny(model_type)
    hf.apply_prompt_tuning(source, 2, init_std=0.5)
    hf.save_prefix(source, tmp_path / "prompt_task")
    model = tiny(model_type)
    hf.add_adapter(model, "a", "seq_bn")
    randomise(hf.adapter_parameters(model, "a").values())
    hf.load_task(model, "p", tmp_path / "prompt_task")
    if model_type == "gpt2":
        hf.set_row_tasks(model, ["p", "a"], torch.tensor([0, 1]))
    return model


CASES += [
    Case("set_row_tasks", "injected: installing the prompt hook fails", _prompt_task_model,
         lambda m, tmp, mp: (mp.setattr(row_prompt_module, "install_row_prompt",
                                        fail_after(row_prompt_module.install_row_prompt)),
                             hf.set_row_tasks(m, ["a", "p"], torch.tensor([1, 1]))),
         lambda m, tmp: hf.set_row_tasks(m, ["a", "p"], torch.tensor([1, 1])), error=RuntimeError),
    Case("set_row_tasks", "prompt rows of a RoBERTa", lambda tmp: _prompt_task_model(tmp, "roberta"),
         lambda m, tmp, mp: hf.set_row_tasks(m, ["a", "p"], torch.tensor([0, 1])),
         lambda m, tmp: hf.set_row_tasks(m, ["a", None], torch.tensor([0, 1])), match="numbers positions otherwise"),
]


# ---- LSH attention
CASES += [
    Case("apply_lsh_attention", "model without LSH layers", lambda tmp: tiny("bert"),
         lambda m, tmp, mp: hf.apply_lsh_attention(m), None, match="supports model types"),
    Case("apply_lsh_attention", "injected: patching fails at the second layer", lambda tmp: lsh_reformer(),
         lambda m, tmp, mp: (mp.setattr(lsh_module, "types", types.SimpleNamespace(
             MethodType=_fail_on_call(types.MethodType, 2))),
                             hf.apply_lsh_attention(m)),
         lambda m, tmp: hf.apply_lsh_attention(m), output=reformer_output, error=RuntimeError),
    Case("remove_lsh_attention", "injected: restoring fails", lambda tmp: _patched_reformer(),
         lambda m, tmp, mp: (mp.setattr(lsh_module.LSHAttentionHandle, "remove", fail_after(
             lsh_module.LSHAttentionHandle.remove)), hf.remove_lsh_attention(m)),
         lambda m, tmp: hf.remove_lsh_attention(m), output=reformer_output, error=RuntimeError),
    Case("configure_lsh_attention", "unknown option", lambda tmp: tiny("bert"),
         lambda m, tmp, mp: hf.configure_lsh_attention(m, num_hash=2),
         lambda m, tmp: hf.configure_lsh_attention(m, num_hashes=2), match="unknown pefops_lsh options"),
    Case("configure_lsh_attention", "injected: the implementation switch fails", lambda tmp: tiny("bert"),
         lambda m, tmp, mp: (mp.setattr(type(m), "set_attn_implementation", boom),
                             hf.configure_lsh_attention(m, num_hashes=2)),
         lambda m, tmp: hf.configure_lsh_attention(m, num_hashes=2), error=RuntimeError),
]


def _patched_reformer():
    model = lsh_reformer()
    hf.apply_lsh_attention(model)
    return model


# ------------------------------------------------------------------------------------ the test


@pytest.mark.parametrize("case", CASES, ids=[f"{c.function}: {c.name}" for c in CASES])
def test_failed_call_leaves_the_model_unchanged(case, tmp_path, monkeypatch):
    model = case.build(tmp_path)
    output = case.output(model)
    before = fingerprint(model)
    with monkeypatch.context() as patches:
        with pytest.raises(case.error, match=case.match) as raised:
            case.fail(model, tmp_path, patches)
    if case.error is not RuntimeError:
        assert "injected" not in str(raised.value)
    assert_same_state(before, fingerprint(model))
    assert torch.equal(case.output(model), output), "outputs changed"
    if case.retry is not None:
        case.retry(model, tmp_path)
        case.output(model)


MODEL_CHANGING = {
    "add_adapter", "remove_adapter", "set_active_adapters", "train_adapter", "load_adapter", "add_adapter_fusion",
    "train_adapter_fusion", "remove_adapter_fusion", "load_adapter_fusion", "apply_mask_tuning", "freeze_masks",
    "load_masks", "set_row_masks", "side_tune", "load_side", "apply_prefix_tuning", "remove_prefix_tuning",
    "load_prefix", "apply_prompt_tuning", "remove_prompt_tuning", "set_trainable_modules", "load_peft_prefix",
    "load_peft_prompt", "apply_lsh_attention", "remove_lsh_attention", "configure_lsh_attention", "set_row_tasks",
}


def test_every_model_changing_function_has_fault_cases():
    covered = {case.function for case in CASES}
    assert MODEL_CHANGING <= covered, sorted(MODEL_CHANGING - covered)
    for name in MODEL_CHANGING:
        function = getattr(hf, name, None) or getattr(prefix_module, name)
        assert hasattr(function, "__wrapped__"), f"{name} is not @transactional"
