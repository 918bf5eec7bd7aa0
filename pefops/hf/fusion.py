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
from pefops.hf.adapters import Fuse, _adapter_layers, _adapter_registry, _fusion_registry, _hidden_size
from pefops.hf.architectures import architecture_of
from pefops.hf.checkpoint import _strip_model_prefix
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


def add_adapter_fusion(model, names, config="dynamic", set_active: bool = False) -> Fuse:
    """Add a fusion layer over the adapters `names` (a Fuse, a list, or "a,b,c") at every site
    where all of them are present. The adapters must exist already."""
    fuse = _as_fuse(names)
    fusion_config = resolve_fusion_config(config)
    registry = _adapter_registry(model)
    missing = [n for n in fuse.names if n not in registry]
    if missing:
        raise ValueError(f"cannot fuse unknown adapters {missing}; the model has {sorted(registry)}")
    if fuse.name in _fusion_registry(model):
        raise ValueError(f"the model already has a fusion {fuse.name!r}")
    hidden = _hidden_size(model)
    # AdapterHub: `dropout_prob or the model's attention dropout`, so 0.0 also falls back to the model's
    dropout = fusion_config.dropout_prob or getattr(model.config, "attention_probs_dropout_prob", 0.0) or 0.0
    reference = next(model.parameters())
    added = 0
    for _, _, adapter_layer in _adapter_layers(model):
        if all(n in adapter_layer.adapters for n in fuse.names):
            layer = AdapterFusion(hidden, fusion_config, dropout_prob=dropout)
            layer.train(model.training)  # a layer added to a model in eval mode must not run dropout
            adapter_layer.fusions[fuse.name] = layer.to(device=reference.device, dtype=reference.dtype)
            added += 1
    if added == 0:
        raise ValueError(f"no site holds all of {list(fuse.names)}: nothing to fuse")
    _fusion_registry(model)[fuse.name] = (fusion_config, fuse)
    if set_active:
        from pefops.hf.adapters import set_active_adapters

        set_active_adapters(model, fuse)
    return fuse


def fusion_parameters(model, names) -> dict[str, torch.nn.Parameter]:
    fuse = _as_fuse(names)
    if fuse.name not in _fusion_registry(model):
        raise ValueError(f"no fusion {fuse.name!r}; add it with add_adapter_fusion")
    marker = f".fusions.{fuse.name}."
    return {n: p for n, p in model.named_parameters() if marker in n}


def train_adapter_fusion(model, names) -> int:
    """Freeze everything but the fusion layers of `names` (the fused adapters stay frozen),
    activate the fusion, put the model in training mode; returns the trainable parameter count."""
    from pefops.hf.adapters import set_active_adapters

    fuse = _as_fuse(names)
    parameters = fusion_parameters(model, fuse)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    set_active_adapters(model, fuse)
    model.train()
    trainable = sum(p.numel() for p in parameters.values())
    logger.info("training fusion %r: %d trainable parameters", fuse.name, trainable)
    return trainable


def fusion_regularization_loss(model):
    """AdapterHub's get_fusion_regularization_loss: Σ 0.01·‖I − W_v‖² over every fusion layer whose
    value matrix trains (None when there is none). As there, the config's `regularization` flag is
    not consulted: the caller adds this loss when it wants the regulariser."""
    total = None
    for _, _, adapter_layer in _adapter_layers(model):
        for layer in adapter_layer.fusions.values():
            if layer.value is not None and layer.value.weight.requires_grad:
                loss = layer.regularization_loss()
                total = loss if total is None else total + loss
    return total


def save_adapter_fusion(model, directory: str, names) -> None:
    from safetensors.torch import save_file

    fuse = _as_fuse(names)
    if fuse.name not in _fusion_registry(model):
        raise ValueError(f"no fusion {fuse.name!r}")
    fusion_config, _ = _fusion_registry(model)[fuse.name]
    layers_path = architecture_of(model).layers
    tensors = {}
    for index, site, adapter_layer in _adapter_layers(model):
        if fuse.name in adapter_layer.fusions:
            prefix = f"{layers_path}.{index}.{_fusion_prefix(site)}.{fuse.name}."
            for key, tensor in adapter_layer.fusions[fuse.name].state_dict().items():
                tensors[prefix + key] = tensor.detach().cpu().clone().contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
    meta = {"config": fusion_config.to_dict(), "adapter_names": list(fuse.names), "name": fuse.name,
            "hidden_size": _hidden_size(model), "model_type": model.config.model_type,
            "model_class": type(model).__name__, "version": f"pefops.{pefops.__version__}"}
    with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def load_adapter_fusion(model, directory: str, set_active: bool = False) -> Fuse:
    """Load a pefops or AdapterHub fusion directory; the fused adapters must be loaded already."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: not an adapter fusion directory")
    with open(config_path) as handle:
        meta = json.load(handle)
    names = meta.get("adapter_names") or meta.get("name", "").split(",")
    fuse = _as_fuse(names)
    if os.path.exists(os.path.join(directory, SAFETENSORS_FILE)):
        from safetensors.torch import load_file

        weights = load_file(os.path.join(directory, SAFETENSORS_FILE))
    elif os.path.exists(os.path.join(directory, PICKLE_FILE)):
        weights = torch.load(os.path.join(directory, PICKLE_FILE), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")
    config = dict(meta.get("config") or {})
    add_adapter_fusion(model, fuse, config)
    layers_path = architecture_of(model).layers
    file_name = meta.get("name") or fuse.name
    expected = {}
    for index, site, adapter_layer in _adapter_layers(model):
        if fuse.name in adapter_layer.fusions:
            prefix = f"{layers_path}.{index}.{_fusion_prefix(site)}.{file_name}."
            for key, tensor in adapter_layer.fusions[fuse.name].state_dict().items():
                expected[prefix + key] = tensor
    found = {}
    for key, tensor in weights.items():
        local = _strip_model_prefix(key, layers_path)
        if local not in expected:
            raise ValueError(f"unexpected key {key!r} in {directory}")
        found[local] = tensor
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{directory} lacks {len(missing)} fusion tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key].to(target.dtype))
    if set_active:
        from pefops.hf.adapters import set_active_adapters

        set_active_adapters(model, fuse)
    return fuse
