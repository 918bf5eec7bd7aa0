"""One checkpoint convention for every pefops.hf method, as transformers' save_pretrained: a directory
holding a small JSON config and safetensors weights. Every config carries the same base fields,

    {"method": ..., "pefops_version": ..., "model_type": ..., "architecture": ..., "hidden_size": ...}

(architecture: the class of the model it was saved from, for the reader; the loaders check model_type
and hidden_size, since an adapter trained on BertModel loads into BertForSequenceClassification).
The older single-file forms of save_masks / save_side ("<name>.safetensors") are still read, and
still written when the path given ends in ".safetensors"."""

from __future__ import annotations

import json
import os

import pefops
from pefops.hf.sharding import model_class_name

METHODS = ("bottleneck_adapter", "adapter_fusion", "mask_tuning", "side_tuning", "prefix_tuning", "prompt_tuning")
BASE_FIELDS = ("method", "pefops_version", "model_type", "architecture", "hidden_size")


def hidden_size_of(model) -> int | None:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def base_fields(model, method: str) -> dict:
    """The fields every pefops checkpoint config holds."""
    if method not in METHODS:
        raise ValueError(f"internal: unknown method {method!r}")
    base = getattr(model, "base", model)  # a SideTunedModel names the model it wraps
    return {"method": method, "pefops_version": pefops.__version__,
            "model_type": getattr(model.config, "model_type", None), "architecture": model_class_name(base),
            "hidden_size": hidden_size_of(model)}


def check_base_fields(model, config: dict, path) -> None:
    """The checkpoint's model_type and hidden size (when it records them) must be the model's; the
    error names the file."""
    model_type = getattr(model.config, "model_type", None)
    if config.get("model_type") not in (None, model_type):
        raise ValueError(f"{path}: saved from a {config['model_type']!r} model; this model is {model_type!r}")
    hidden = hidden_size_of(model)
    if config.get("hidden_size") not in (None, hidden):
        raise ValueError(f"{path}: saved from a model of hidden size {config['hidden_size']}; this model's is "
                         f"{hidden}")


def is_single_file(path) -> bool:
    """The older single-file form: a path ending in .safetensors that is not a directory."""
    return str(path).endswith(".safetensors") and not os.path.isdir(path)


def write_checkpoint(directory, config_name: str, config: dict, weights_name: str, tensors: dict,
                     metadata: dict) -> None:
    """Write `config` as JSON and `tensors` as safetensors into `directory` (created if needed). A path
    that is an existing file is refused (it would be a half-written checkpoint)."""
    from safetensors.torch import save_file

    directory = str(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory} is a file; a checkpoint is a directory (pass a directory path)")
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, weights_name), metadata=metadata)
    with open(os.path.join(directory, config_name), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def weights_path(model, path, method: str, file_format: str, config_name: str, weights_name: str) -> str:
    """The safetensors file of a checkpoint: `path` itself when it is a file (the older single-file
    form), else the weights of the directory, whose config is checked against the model first."""
    from pefops.hf.checkpoint_io import read_json_object

    path = str(path)
    if not os.path.isdir(path):
        return path
    config_path = os.path.join(path, config_name)
    config = read_json_object(config_path)
    if config.get("method") != method or config.get("format") != file_format:
        raise ValueError(f"{config_path} is not a pefops {method} checkpoint (method {config.get('method')!r}, "
                         f"format {config.get('format')!r})")
    check_base_fields(model, config, config_path)
    return os.path.join(path, weights_name)
