"""Saving and loading bottleneck adapters, in AdapterHub's checkpoint layout.

A directory holds `adapter_config.json` ({"config": <BnConfig fields>, "hidden_size", "model_class",
"model_name", "model_type", "name", "version"}) and the weights, under AdapterHub's own key names
("encoder.layer.0.output.adapters.NAME.adapter_down.0.weight", ...). pefops writes
`adapter.safetensors`; it reads that or AdapterHub's `pytorch_adapter.bin`, the latter only through
`torch.load(weights_only=True)` (no arbitrary pickles).
"""

from __future__ import annotations

import json
import os
import re

import torch

import pefops
from pefops.hf.adapters import _adapter_layers, _adapter_registry, _hidden_size, add_adapter, set_active_adapters
from pefops.hf.architectures import architecture_of
from pefops.hf.config import resolve_config

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"


def _to_adapterhub_names(parameter: str, ln_before: bool) -> list[str]:
    """Our module's parameter name → AdapterHub's (a list: AdapterHub stores ln_before twice)."""
    module, _, leaf = parameter.partition(".")
    down_index = 1 if ln_before else 0
    if module == "down_proj":
        return [f"adapter_down.{down_index}.{leaf}"]
    if module == "up_proj":
        return [f"adapter_up.{leaf}"]
    if module == "adapter_norm_before":
        return [f"adapter_norm_before.{leaf}", f"adapter_down.0.{leaf}"]
    return [parameter]  # adapter_norm_after.*, gate.*, scaling


def _from_adapterhub_name(name: str, ln_before: bool) -> str:
    match = re.fullmatch(r"adapter_down\.(\d)\.(weight|bias)", name)
    if match:
        index, leaf = int(match.group(1)), match.group(2)
        if ln_before and index == 0:
            return f"adapter_norm_before.{leaf}"
        if index == (1 if ln_before else 0):
            return f"down_proj.{leaf}"
        raise ValueError(f"unexpected adapter_down index in {name!r}")
    if name.startswith("adapter_up."):
        return "up_proj." + name[len("adapter_up."):]
    return name


def save_adapter(model, directory: str, name: str) -> None:
    """Write adapter `name` (config + weights as safetensors) to `directory`."""
    from safetensors.torch import save_file

    registry = _adapter_registry(model)
    if name not in registry:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(registry) or 'none'}")
    config = registry[name]
    layers_path = architecture_of(model).layers
    tensors = {}
    for index, site, adapter_layer in _adapter_layers(model):
        if name not in adapter_layer.adapters:
            continue
        prefix = f"{layers_path}.{index}.{site.adapterhub_prefix}.{name}."
        for parameter, tensor in adapter_layer.adapters[name].state_dict().items():
            for key in _to_adapterhub_names(parameter, config.ln_before):
                tensors[prefix + key] = tensor.detach().to("cpu").clone().contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
    meta = {
        "config": config.to_dict(),
        "hidden_size": _hidden_size(model),
        "model_class": type(model).__name__,
        "model_name": getattr(model.config, "name_or_path", "") or "",
        "model_type": model.config.model_type,
        "name": name,
        "version": f"pefops.{pefops.__version__}",
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(directory, SAFETENSORS_FILE)
    pickle_path = os.path.join(directory, PICKLE_FILE)
    if os.path.exists(safetensors_path):
        from safetensors.torch import load_file

        return load_file(safetensors_path)
    if os.path.exists(pickle_path):
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")


def _strip_model_prefix(key: str, layers_path: str) -> str:
    """AdapterHub prefixes keys with the base model's name ("bert.", "transformer.") when the model
    has a head; drop whatever precedes the layers path."""
    if key.startswith(layers_path + "."):
        return key
    position = key.find("." + layers_path + ".")
    return key[position + 1:] if position >= 0 else key


def load_adapter(model, directory: str, load_as: str | None = None, set_active: bool = False) -> str:
    """Load a pefops or AdapterHub adapter directory into `model`; returns the adapter's name."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: not an adapter directory")
    with open(config_path) as handle:
        meta = json.load(handle)
    config_data = dict(meta.get("config") or {})
    if "version" not in meta and config_data.get("non_linearity") == "gelu":
        config_data["non_linearity"] = "gelu_new"  # AdapterHub: legacy configs meant the tanh GELU
    config = resolve_config(config_data)
    model_type = model.config.model_type
    if meta.get("model_type") not in (None, model_type):
        raise ValueError(f"adapter was trained for model type {meta['model_type']!r}; this model is {model_type!r}")
    if meta.get("hidden_size") not in (None, _hidden_size(model)):
        raise ValueError(f"adapter hidden size {meta['hidden_size']} does not match the model's {_hidden_size(model)}")
    file_name = meta.get("name")
    name = load_as or file_name
    if not name:
        raise ValueError("the adapter config names no adapter: pass load_as=")
    weights = _read_weights(directory)

    layers_path = architecture_of(model).layers
    add_adapter(model, name, config)
    try:
        expected = {}
        for index, site, adapter_layer in _adapter_layers(model):
            if name in adapter_layer.adapters:
                prefix = f"{layers_path}.{index}.{site.adapterhub_prefix}.{file_name or name}."
                for parameter in adapter_layer.adapters[name].state_dict():
                    expected[(prefix, parameter)] = (adapter_layer.adapters[name], parameter)
        prefixes = {prefix for prefix, _ in expected}
        loaded = {}
        for key, tensor in weights.items():
            local_key = _strip_model_prefix(key, layers_path)
            prefix = next((p for p in prefixes if local_key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"unexpected key {key!r} in {directory}: not an adapter parameter of this model")
            loaded[(prefix, _from_adapterhub_name(local_key[len(prefix):], config.ln_before))] = tensor
        missing = [prefix + parameter for (prefix, parameter) in expected if (prefix, parameter) not in loaded]
        if missing:
            raise ValueError(f"{directory} lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for (prefix, parameter), (module, _) in expected.items():
                target = module.state_dict()[parameter]
                source = loaded[(prefix, parameter)]
                if tuple(source.shape) != tuple(target.shape):
                    raise ValueError(f"{prefix}{parameter}: shape {tuple(source.shape)} in the file, "
                                     f"{tuple(target.shape)} in the model")
                target.copy_(source.to(target.dtype))
    except Exception:
        from pefops.hf.adapters import remove_adapter

        remove_adapter(model, name)
        raise
    if set_active:
        set_active_adapters(model, name)
    return name
