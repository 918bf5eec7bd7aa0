"""AdapterFusion in transformers models, with AdapterHub's API, semantics and checkpoint layout.

Checkpoints: `adapter_fusion_config.json` ({"config": <fusion config>, "adapter_names": [...],
"name": "a,b,c", ...}) and the weights under AdapterHub's keys
("encoder.layer.0.output.adapter_fusion_layer.a,b,c.query.weight", ...): pefops writes
`model_adapter_fusion.safetensors`, and reads that or AdapterHub's `pytorch_model_adapter_fusion.bin`
(only through torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
import logging
import os

import torch

import pefops
from pefops.hf.adapters import Fuse, adapter_layers, adapter_registry, fusion_registry, hidden_size_of, train_only
from pefops.hf.architectures import architecture_of
from pefops.hf.checkpoint import read_config, read_weights, strip_model_prefix
from pefops.hf.checkpoint_io import check_names, check_tensor, field
from pefops.hf.sharding import CHANGES_PARAMETERS, host_copy, model_class_name, refuse_sharded, writes_files
from pefops.hf.task_io import base_fields
from pefops.hf.transaction import copy_into, transactional
from pefops.nn.adapter_fusion import AdapterFusion, resolve_fusion_config

logger = logging.getLogger("pefops.hf")
CONFIG_FILE = "adapter_fusion_config.json"
SAFETENSORS_FILE = "model_adapter_fusion.safetensors"
PICKLE_FILE = "pytorch_model_adapter_fusion.bin"


def _as_fuse(names) -> Fuse:
    if isinstance(names, Fuse):
        return names
    if isinstance(names, str):
        return Fuse(*names.split(","))
    return Fuse(*names)


def _fusion_prefix(site) -> str:
    return site.adapterhub_prefix.removesuffix("adapters") + "adapter_fusion_layer"


@transactional
def add_adapter_fusion(model, names, config="dynamic", set_active: bool = False) -> Fuse:
    """Add a fusion layer over the adapters `names` (a Fuse, a list, or "a,b,c") at every site
    where all of them are present. The adapters must exist already."""
    refuse_sharded(model, "add_adapter_fusion", CHANGES_PARAMETERS)
    fuse = _as_fuse(names)
    fusion_config = resolve_fusion_config(config)
    if len(set(fuse.names)) != len(fuse.names):
        raise ValueError(f"a fusion fuses distinct adapters; got {list(fuse.names)}")
    registry = adapter_registry(model)
    missing = [n for n in fuse.names if n not in registry]
    if missing:
        raise ValueError(f"cannot fuse unknown adapters {missing}; the model has {sorted(registry)}")
    if fuse.name in fusion_registry(model):
        raise ValueError(f"the model already has a fusion {fuse.name!r}")
    parallel = [n for n in fuse.names if registry[n].is_parallel]
    if parallel:
        raise ValueError(f"AdapterFusion over parallel (par_bn) adapters is not supported; {parallel} are parallel")
    hidden = hidden_size_of(model)
    # AdapterHub: `dropout_prob or the model's attention dropout`, so 0.0 also falls back to the model's
    dropout = fusion_config.dropout_prob or getattr(model.config, "attention_probs_dropout_prob", 0.0) or 0.0
    reference = next(model.parameters())
    added = 0
    for _, _, adapter_layer in adapter_layers(model):
        if all(n in adapter_layer.adapters for n in fuse.names):
            layer = AdapterFusion(hidden, fusion_config, dropout_prob=dropout)
            layer.train(model.training)  # a layer added to a model in eval mode must not run dropout
            adapter_layer.fusions[fuse.name] = layer.to(device=reference.device, dtype=reference.dtype)
            added += 1
    if added == 0:
        raise ValueError(f"no site holds all of {list(fuse.names)}: nothing to fuse")
    fusion_registry(model)[fuse.name] = (fusion_config, fuse)
    if set_active:
        from pefops.hf.adapters import set_active_adapters

        set_active_adapters(model, fuse)
    return fuse


def fusion_parameters(model, names) -> dict[str, torch.nn.Parameter]:
    fuse = _as_fuse(names)
    if fuse.name not in fusion_registry(model):
        raise ValueError(f"no fusion {fuse.name!r}; add it with add_adapter_fusion")
    marker = f".fusions.{fuse.name}."
    return {n: p for n, p in model.named_parameters() if marker in n}


@transactional
def train_adapter_fusion(model, names) -> int:
    """Freeze everything but the fusion layers of `names` (the fused adapters stay frozen),
    activate the fusion, put the model in training mode; returns the trainable parameter count."""
    fuse = _as_fuse(names)
    trainable = train_only(model, fusion_parameters(model, fuse), fuse)
    logger.info("training fusion %r: %d trainable parameters", fuse.name, trainable)
    return trainable


def fusion_regularization_loss(model):
    """AdapterHub's get_fusion_regularization_loss: Σ 0.01·‖I − W_v‖² over every fusion layer whose
    value matrix trains (None when there is none). As there, the config's `regularization` flag is
    not consulted: the caller adds this loss when it wants the regulariser."""
    total = None
    for _, _, adapter_layer in adapter_layers(model):
        for layer in adapter_layer.fusions.values():
            if layer.value is not None and layer.value.weight.requires_grad:
                loss = layer.regularization_loss()
                total = loss if total is None else total + loss
    return total


def save_adapter_fusion(model, directory: str, names) -> None:
    """Write fusion `names` to `directory` (AdapterHub's layout). A sharded (FSDP2) model: every rank
    calls it, rank 0 writes."""
    from safetensors.torch import save_file

    fuse = _as_fuse(names)
    if fuse.name not in fusion_registry(model):
        raise ValueError(f"no fusion {fuse.name!r}")
    fusion_config, _ = fusion_registry(model)[fuse.name]
    layers_path = architecture_of(model).layers
    tensors = {}
    for index, site, adapter_layer in adapter_layers(model):
        if fuse.name in adapter_layer.fusions:
            prefix = f"{layers_path}.{index}.{_fusion_prefix(site)}.{fuse.name}."
            for key, tensor in adapter_layer.fusions[fuse.name].state_dict().items():
                tensors[prefix + key] = host_copy(tensor)
    if not writes_files(model):
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
    meta = {**base_fields(model, "adapter_fusion"), "config": fusion_config.to_dict(), "adapter_names": list(fuse.names),
            "name": fuse.name, "hidden_size": hidden_size_of(model), "model_type": model.config.model_type,
            "model_class": model_class_name(model), "version": f"pefops.{pefops.__version__}"}
    with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


@transactional
def remove_adapter_fusion(model, names) -> None:
    """Delete the fusion layers of `names` (the fused adapters stay). If that fusion is active, the
    model falls back to the base (no active adapter)."""
    refuse_sharded(model, "remove_adapter_fusion", CHANGES_PARAMETERS)
    from pefops.hf.adapters import active_adapter, set_active_adapters

    fuse = _as_fuse(names)
    if fuse.name not in fusion_registry(model):
        raise ValueError(f"no fusion {fuse.name!r}; the model has {sorted(fusion_registry(model)) or 'none'}")
    for _, _, adapter_layer in adapter_layers(model):
        if fuse.name in adapter_layer.fusions:
            del adapter_layer.fusions[fuse.name]
    del fusion_registry(model)[fuse.name]
    if active_adapter(model) == fuse:
        set_active_adapters(model, None)


@transactional
def load_adapter_fusion(model, directory: str, set_active: bool = False) -> Fuse:
    """Load a pefops or AdapterHub fusion directory; the fused adapters must be loaded already.
    The config and every tensor (names, exact shapes, dtypes) are checked before the model changes."""
    refuse_sharded(model, "load_adapter_fusion", CHANGES_PARAMETERS)
    directory, config_path, meta = read_config(directory, CONFIG_FILE, "an adapter fusion directory")
    names = meta.get("adapter_names")
    if names is None:
        name = field(meta, "name", config_path, str)
        names = name.split(",")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{config_path}: 'adapter_names' must be a non-empty list of adapter names; got {names!r}")
    fuse = _as_fuse(names)
    file_name = field(meta, "name", config_path, str, required=False) or fuse.name
    config = meta.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: field 'config' must be an object; got {config!r}")
    try:
        fusion_config = resolve_fusion_config(dict(config))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_path}: {error}") from None
    if meta.get("model_type") not in (None, model.config.model_type):
        raise ValueError(f"{config_path}: fusion was trained for model type {meta['model_type']!r}; this model is "
                         f"{model.config.model_type!r}")
    hidden = hidden_size_of(model)
    if meta.get("hidden_size") not in (None, hidden):
        raise ValueError(f"{config_path}: fusion hidden size {meta['hidden_size']} does not match the model's {hidden}")
    registry = adapter_registry(model)
    missing = [n for n in fuse.names if n not in registry]
    if missing:
        raise ValueError(f"{config_path} fuses adapters {missing} the model does not have (load them first); the model "
                         f"has {sorted(registry) or 'none'}")
    if fuse.name in fusion_registry(model):
        raise ValueError(f"the model already has a fusion {fuse.name!r}")
    weights, weights_path = read_weights(directory, SAFETENSORS_FILE, PICKLE_FILE)

    layers_path = architecture_of(model).layers
    with torch.device("meta"):
        probe = AdapterFusion(hidden, fusion_config)
    shapes = {key: tuple(t.shape) for key, t in probe.state_dict().items()}
    expected = {}
    for index, site, adapter_layer in adapter_layers(model):
        if all(n in adapter_layer.adapters for n in fuse.names):
            prefix = f"{layers_path}.{index}.{_fusion_prefix(site)}.{file_name}."
            for key, shape in shapes.items():
                expected[prefix + key] = (index, site.location, key, shape)
    found = {}
    for key, tensor in weights.items():
        local = strip_model_prefix(key, layers_path)
        if local not in expected:
            raise ValueError(f"{weights_path}: unexpected key {key!r}: not a parameter of fusion {file_name!r} at a "
                             "site of this model that holds all its adapters")
        check_tensor(weights_path, key, tensor, expected[local][3])
        found[local] = tensor
    check_names(weights_path, found, expected, "fusion")

    add_adapter_fusion(model, fuse, fusion_config)  # validated: the commit
    pairs = []
    for index, site, adapter_layer in adapter_layers(model):
        if fuse.name in adapter_layer.fusions:
            state = adapter_layer.fusions[fuse.name].state_dict(keep_vars=True)
            prefix = f"{layers_path}.{index}.{_fusion_prefix(site)}.{file_name}."
            pairs.extend((state[key], found[prefix + key]) for key in shapes)
    copy_into(pairs)
    if set_active:
        from pefops.hf.adapters import set_active_adapters

        set_active_adapters(model, fuse)
    return fuse
