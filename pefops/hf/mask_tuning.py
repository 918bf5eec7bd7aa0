"""Mask-tuning in transformers models: every Linear (and GPT-2 Conv1D) of the transformer layers
becomes a MaskedLinear sharing the base weight; a task is its 1-bit masks plus the dense head.

A saved task (`save_masks`) holds the packed masks and the trainable head only (safetensors), about
1/8 byte per masked weight; `load_masks` switches a model to a task by swapping bit tensors.
"""

from __future__ import annotations

import json
from typing import Iterable, Optional

import torch
from torch import nn

from pefops.hf.architectures import architecture_of, get_submodule
from pefops.ops.common import check_index_tensor, describe
from pefops.nn.masked_linear import MaskedLinear

FORMAT = "pefops-masks-1"


def _is_maskable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _base(model):
    return getattr(model, "base_model", model)


def _layer_modules(model):
    """(full name, module) of every module inside the transformer layers."""
    base = _base(model)
    layers_path = architecture_of(model).layers
    prefix = _prefix_of(model, base)
    for name, module in get_submodule(base, layers_path).named_modules():
        yield f"{prefix}{layers_path}.{name}" if name else f"{prefix}{layers_path}", module


def _prefix_of(model, base) -> str:
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return f"{name}."
    return ""


def masked_modules(model) -> dict[str, MaskedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MaskedLinear)}


def apply_mask_tuning(model, threshold: float = 1e-2, init_sparsity: float = 0.5,
                      targets: Optional[Iterable[str]] = None, train_bias: bool = False) -> list[str]:
    """Replace the Linear / Conv1D layers of the transformer layers (BERT, RoBERTa, GPT-2, LLaMA) by
    MaskedLinear, freeze the base model, keep the head (everything outside the base model) dense
    and trainable. `targets`: names or name suffixes to restrict to (e.g. ["query", "value"]).
    Returns the replaced modules' names."""
    targets = list(targets) if targets is not None else None
    replaced = []
    for name, module in list(_layer_modules(model)):
        if not _is_maskable(module) or isinstance(module, MaskedLinear):
            continue
        if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MaskedLinear.from_linear(module, threshold, init_sparsity, train_bias=train_bias))
        replaced.append(name)
    if not replaced:
        raise ValueError(f"no Linear layer matched targets={targets} in the transformer layers")
    base = _base(model)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    for module in masked_modules(model).values():
        if module.scores is not None:
            module.scores.requires_grad_(True)
        if train_bias and module.bias is not None:
            module.bias.requires_grad_(True)
    for parameter in _head_parameters(model).values():
        parameter.requires_grad_(True)
    return replaced


def _head_parameters(model) -> dict[str, nn.Parameter]:
    base = _base(model)
    if base is model:
        return {}
    base_ids = {id(p) for p in base.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) not in base_ids}


def freeze_masks(model) -> None:
    """Pack every mask and drop the scores (inference form)."""
    for module in masked_modules(model).values():
        module.freeze()


def save_masks(model, path: str) -> None:
    """Write the task: packed masks ("<module>.mask", uint8) and the head's parameters
    ("<name>"), with the threshold and format in the metadata. Base weights are not written."""
    from safetensors.torch import save_file

    modules = masked_modules(model)
    if not modules:
        raise ValueError("the model has no MaskedLinear layers: call apply_mask_tuning first")
    tensors = {f"{name}.mask": module.packed_mask().cpu().contiguous() for name, module in modules.items()}
    for name, module in modules.items():
        if module.bias is not None and module.bias.requires_grad:
            tensors[f"{name}.bias"] = module.bias.detach().cpu().clone()
    for name, parameter in _head_parameters(model).items():
        tensors[name] = parameter.detach().cpu().clone()
    thresholds = sorted({module.threshold for module in modules.values()})
    metadata = {"format": FORMAT, "thresholds": json.dumps(thresholds),
                "in_features": json.dumps({name: m.in_features for name, m in modules.items()})}
    save_file(tensors, path, metadata=metadata)


def load_masks(model, path: str) -> None:
    """Switch the model to the task saved in `path`: masks (inference form) and head. If the model
    has no MaskedLinear layers yet, they are created where the file has masks."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a pefops mask file (format {metadata.get('format')!r})")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    mask_names = {key[: -len(".mask")] for key in tensors if key.endswith(".mask")}
    modules = masked_modules(model)
    if not modules:
        thresholds = json.loads(metadata.get("thresholds", "[0.01]"))
        apply_mask_tuning(model, threshold=thresholds[0], targets=sorted(mask_names))
        modules = masked_modules(model)
    missing = set(modules) - mask_names
    extra = mask_names - set(modules)
    if missing or extra:
        raise ValueError(f"mask file does not match the model: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name, module in modules.items():
            module.set_mask(tensors[f"{name}.mask"])
        for key, tensor in tensors.items():
            if key.endswith(".mask"):
                continue
            if key not in state:
                raise ValueError(f"{path} has a tensor {key!r} the model does not have")
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} in the file, {tuple(state[key].shape)} in the model")
            state[key].copy_(tensor.to(state[key].dtype))


def set_row_masks(model, paths: Optional[list] = None, row_task: Optional[torch.Tensor] = None) -> None:
    """Mixed-task batch for mask-tuning: sequence b of the next batches runs every masked layer with
    the mask of task paths[row_task[b]] (files written by save_masks) over the one shared base
    weight. The tasks' heads are not routed (apply each row's head yourself). paths=None clears."""
    modules = masked_modules(model)
    if not modules:
        raise ValueError("the model has no MaskedLinear layers: call apply_mask_tuning (or load_masks) first")
    if paths is None:
        for module in modules.values():
            module.set_row_masks(None)
        return
    check_index_tensor(row_task, "row_task", "[batch] of indices into paths (int64)")
    if row_task.dim() != 1:
        raise ValueError(f"row_task must be a 1-D integer tensor [batch] of indices into paths; got {describe(row_task)}")
    from safetensors import safe_open

    per_task = []
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"{path} is not a pefops mask file")
            keys = set(handle.keys())
            missing = [name for name in modules if f"{name}.mask" not in keys]
            if missing:
                raise ValueError(f"{path} has no mask for {missing[:3]}")
            per_task.append({name: handle.get_tensor(f"{name}.mask") for name in modules})
    if row_task is None or row_task.dim() != 1:
        raise ValueError("row_task must be an integer tensor [batch] of indices into paths")
    for name, module in modules.items():
        module.set_row_masks(torch.stack([task[name] for task in per_task]), row_task)
