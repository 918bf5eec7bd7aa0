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
from pefops.hf.adapters import (
    AdapterLayer,
    adapter_layers,
    adapter_registry,
    add_adapter,
    hidden_size_of,
    model_layers,
    set_active_adapters,
)
from pefops.hf.architectures import architecture_of
from pefops.hf.checkpoint_io import check_tensor, field, read_json_object, read_pickled_tensors, read_safetensors
from pefops.hf.config import resolve_config
from pefops.hf.sharding import CHANGES_PARAMETERS, host_copy, model_class_name, refuse_sharded, writes_files
from pefops.hf.task_io import base_fields
from pefops.hf.transaction import copy_into, transactional

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
    """Write adapter `name` (config + weights as safetensors) to `directory`. A sharded (FSDP2) model:
    every rank calls it, the parameters are gathered and rank 0 writes one unsharded checkpoint."""
    from safetensors.torch import save_file

    registry = adapter_registry(model)
    if name not in registry:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(registry) or 'none'}")
    config = registry[name]
    layers_path = architecture_of(model).layers
    tensors = {}
    for index, site, adapter_layer in adapter_layers(model):
        if name not in adapter_layer.adapters:
            continue
        prefix = f"{layers_path}.{index}.{site.adapterhub_prefix}.{name}."
        for parameter, tensor in adapter_layer.adapters[name].state_dict().items():
            for key in _to_adapterhub_names(parameter, config.ln_before):
                tensors[prefix + key] = host_copy(tensor)
    if not writes_files(model):
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
    meta = {
        **base_fields(model, "bottleneck_adapter"),
        "config": config.to_dict(),
        "hidden_size": hidden_size_of(model),
        "model_class": model_class_name(model),
        "model_name": getattr(model.config, "name_or_path", "") or "",
        "model_type": model.config.model_type,
        "name": name,
        "version": f"pefops.{pefops.__version__}",
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def read_config(directory, config_file: str, what: str) -> tuple[str, str, dict]:
    """(directory, config path, the JSON object) of an AdapterHub-layout directory; `what` names the
    kind of directory in the error when the config file is missing."""
    directory = str(directory)
    config_path = os.path.join(directory, config_file)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: not {what}")
    return directory, config_path, read_json_object(config_path)


def read_weights(directory: str, safetensors_file: str = SAFETENSORS_FILE,
                 pickle_file: str = PICKLE_FILE) -> tuple[dict, str]:
    """(tensors, path) of the weights in `directory`: the safetensors file, else AdapterHub's pickle
    (read with torch.load(weights_only=True) only)."""
    safetensors_path = os.path.join(directory, safetensors_file)
    pickle_path = os.path.join(directory, pickle_file)
    if os.path.exists(safetensors_path):
        return read_safetensors(safetensors_path), safetensors_path
    if os.path.exists(pickle_path):
        return read_pickled_tensors(pickle_path), pickle_path
    raise FileNotFoundError(f"{directory} has neither {safetensors_file} nor {pickle_file}")


def strip_model_prefix(key: str, layers_path: str) -> str:
    """AdapterHub prefixes keys with the base model's name ("bert.", "transformer.") when the model
    has a head; drop whatever precedes the layers path."""
    if key.startswith(layers_path + "."):
        return key
    position = key.find("." + layers_path + ".")
    return key[position + 1:] if position >= 0 else key


def _expected_shapes(model, config, hidden_size: int) -> dict:
    """{(layer index, site): {parameter: shape}} of the adapter `config` places, without touching the model."""
    _, architecture, layers = model_layers(model)
    shapes = {}
    for index in range(len(layers)):
        for site in architecture.sites:
            wanted = config.mh_adapter if site.location == "mh_adapter" else config.output_adapter
            if wanted and index not in config.leave_out:
                with torch.device("meta"):
                    probe = AdapterLayer(site)
                    probe.add("probe", config, hidden_size, index, torch.empty(0, device="meta"))
                shapes[(index, site)] = {k: tuple(v.shape) for k, v in probe.adapters["probe"].state_dict().items()}
    return shapes


@transactional
def load_adapter(model, directory: str, load_as: str | None = None, set_active: bool = False) -> str:
    """Load a pefops or AdapterHub adapter directory into `model`; returns the adapter's name.
    The config and every tensor (names, exact shapes, dtypes) are checked before the model changes;
    errors name the file and the key."""
    refuse_sharded(model, "load_adapter", CHANGES_PARAMETERS)
    directory, config_path, meta = read_config(directory, CONFIG_FILE, "an adapter directory")
    config_data = meta.get("config")
    if not isinstance(config_data, dict):
        raise ValueError(f"{config_path}: field 'config' must be an object of adapter settings; got {config_data!r}")
    config_data = dict(config_data)
    if "version" not in meta and config_data.get("non_linearity") == "gelu":
        config_data["non_linearity"] = "gelu_new"  # AdapterHub: legacy configs meant the tanh GELU
    try:
        config = resolve_config(config_data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_path}: {error}") from None
    model_type = model.config.model_type
    if meta.get("model_type") not in (None, model_type):
        raise ValueError(f"{config_path}: adapter was trained for model type {meta['model_type']!r}; this model is "
                         f"{model_type!r}")
    hidden_size = hidden_size_of(model)
    if meta.get("hidden_size") not in (None, hidden_size):
        raise ValueError(f"{config_path}: adapter hidden size {meta['hidden_size']} does not match the model's "
                         f"{hidden_size}")
    file_name = field(meta, "name", config_path, str, required=False)
    if file_name is not None and (not file_name or "." in file_name):
        raise ValueError(f"{config_path}: field 'name' must be a non-empty adapter name; got {file_name!r}")
    if load_as is not None and (not isinstance(load_as, str) or not load_as):
        raise ValueError(f"load_as must be a non-empty adapter name or None; got {load_as!r}")
    name = load_as or file_name
    if not name:
        raise ValueError(f"{config_path} names no adapter: pass load_as=")
    if name in adapter_registry(model):
        raise ValueError(f"model already has an adapter named {name!r}; remove it first or pass load_as=")
    try:
        shapes = _expected_shapes(model, config, hidden_size)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    if not shapes:
        raise ValueError(f"{config_path}: the config places no adapter in this model")
    weights, weights_path = read_weights(directory)

    layers_path = architecture_of(model).layers
    prefixes = {f"{layers_path}.{index}.{site.adapterhub_prefix}.{file_name or name}.": (index, site)
                for (index, site) in shapes}
    loaded = {}
    for key, tensor in weights.items():
        local_key = strip_model_prefix(key, layers_path)
        prefix = next((p for p in prefixes if local_key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{weights_path}: unexpected key {key!r}: not a parameter of adapter "
                             f"{file_name or name!r} at a site its config places in this model")
        try:
            parameter = _from_adapterhub_name(local_key[len(prefix):], config.ln_before)
        except ValueError as error:
            raise ValueError(f"{weights_path}: {error}") from None
        site_key = prefixes[prefix]
        if parameter not in shapes[site_key]:
            raise ValueError(f"{weights_path}: unexpected key {key!r}: adapter {file_name or name!r} with this config "
                             f"has no parameter {parameter!r}")
        check_tensor(weights_path, key, tensor, shapes[site_key][parameter])
        loaded[(site_key, parameter)] = tensor
    missing = [prefix + parameter for prefix, site_key in prefixes.items() for parameter in shapes[site_key]
               if (site_key, parameter) not in loaded]
    if missing:
        raise ValueError(f"{weights_path} lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")

    add_adapter(model, name, config)  # validated: the commit
    pairs = []
    for index, site, adapter_layer in adapter_layers(model):
        if (index, site) in shapes:
            state = adapter_layer.adapters[name].state_dict(keep_vars=True)
            pairs.extend((state[parameter], loaded[((index, site), parameter)]) for parameter in shapes[(index, site)])
    copy_into(pairs)
    if set_active:
        set_active_adapters(model, name)
    return name
