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
from pefops.hf.checkpoint_io import check_tensor, read_safetensors
from pefops.hf.sharding import CHANGES_PARAMETERS, full_tensor, host_copy, refuse_sharded, writes_files
from pefops.hf.task_io import base_fields, is_single_file, weights_path, write_checkpoint
from pefops.hf.transaction import copy_into, transactional
from pefops.ops.common import check_index_tensor, describe
from pefops.nn.masked_linear import MaskedLinear
from pefops.ops.masked_linear import pack_mask, packed_columns

FORMAT = "pefops-masks-1"
CONFIG_NAME = "masks_config.json"
WEIGHTS_NAME = "masks.safetensors"


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


@transactional
def apply_mask_tuning(model, threshold: float = 1e-2, init_sparsity: float = 0.5,
                      targets: Optional[Iterable[str]] = None, train_bias: bool = False) -> list[str]:
    """Replace the Linear / Conv1D layers of the transformer layers (BERT, RoBERTa, GPT-2, LLaMA) by
    MaskedLinear, freeze the base model, keep the head (everything outside the base model) dense
    and trainable. `targets`: names or name suffixes to restrict to (e.g. ["query", "value"]).
    Returns the replaced modules' names."""
    refuse_sharded(model, "apply_mask_tuning", CHANGES_PARAMETERS)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
        raise ValueError(f"threshold must be a number; got {threshold!r}")
    if isinstance(init_sparsity, bool) or not isinstance(init_sparsity, (int, float)) or not 0 <= init_sparsity <= 1:
        raise ValueError(f"init_sparsity must be a number in [0, 1]; got {init_sparsity!r}")
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets) if targets is not None else None
    replaced = []
    for name, module in list(_layer_modules(model)):
        if not _is_maskable(module) or isinstance(module, MaskedLinear):
            continue
        if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        masked = MaskedLinear.from_linear(module, threshold, init_sparsity, train_bias=train_bias)
        _carry_hooks(module, masked)
        setattr(parent, child, masked)
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


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """The replaced layer's forward hooks go to its MaskedLinear: a pre-norm adapter site hooks the
    output projection (GPT-2 mlp.c_proj, LLaMA o_proj), and masking it must not drop the adapter."""
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(new, hooks).update(getattr(old, hooks, {}))


def _head_parameters(model) -> dict[str, nn.Parameter]:
    base = _base(model)
    if base is model:
        return {}
    base_ids = {id(p) for p in base.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) not in base_ids}


@transactional
def freeze_masks(model) -> None:
    """Pack every mask and drop the scores (inference form)."""
    refuse_sharded(model, "freeze_masks", CHANGES_PARAMETERS)
    for module in masked_modules(model).values():
        module.freeze()


def save_masks(model, path: str) -> None:
    """Write the task to the directory `path`: masks_config.json (method, version, base model type and
    hidden size) and masks.safetensors with the packed masks ("<module>.mask", uint8) and the head's
    parameters ("<name>"), the threshold and format in its metadata. Base weights are not written.
    A path ending in ".safetensors" writes the older single file instead. A sharded (FSDP2) model: every
    rank calls it, the scores are gathered and rank 0 writes."""
    from safetensors.torch import save_file

    modules = masked_modules(model)
    if not modules:
        raise ValueError("the model has no MaskedLinear layers: call apply_mask_tuning first")
    tensors = {f"{name}.mask": _whole_packed_mask(module) for name, module in modules.items()}
    for name, module in modules.items():
        if module.bias is not None and module.bias.requires_grad:
            tensors[f"{name}.bias"] = host_copy(module.bias)
    for name, parameter in _head_parameters(model).items():
        tensors[name] = host_copy(parameter)
    if not writes_files(model):
        return
    thresholds = sorted({module.threshold for module in modules.values()})
    metadata = {"format": FORMAT, "thresholds": json.dumps(thresholds),
                "in_features": json.dumps({name: m.in_features for name, m in modules.items()})}
    if is_single_file(path):
        save_file(tensors, str(path), metadata=metadata)
        return
    config = {**base_fields(model, "mask_tuning"), "format": FORMAT, "thresholds": thresholds}
    write_checkpoint(path, CONFIG_NAME, config, WEIGHTS_NAME, tensors, metadata)


def _whole_packed_mask(module: MaskedLinear) -> torch.Tensor:
    """The layer's packed mask as a CPU tensor; sharded scores are gathered first (packing works on
    whole rows of 8 columns, which a shard need not hold)."""
    if module.frozen:
        return module.mask.cpu().contiguous()
    return pack_mask(full_tensor(module.scores.detach()), module.threshold).cpu().contiguous()


def mask_weights_path(model, path) -> str:
    """The safetensors file of a mask checkpoint (a save_masks directory, checked, or a mask file)."""
    return weights_path(model, path, "mask_tuning", FORMAT, CONFIG_NAME, WEIGHTS_NAME)


def _mask_shape(module) -> tuple[int, int]:
    """The packed mask shape [out, ceil(in / 8)] of a Linear, a Conv1D (weight [in, out]) or a MaskedLinear."""
    if isinstance(module, MaskedLinear):
        out_features, in_features = module.out_features, module.in_features
    elif isinstance(module, nn.Linear):
        out_features, in_features = module.out_features, module.in_features
    else:
        in_features, out_features = module.weight.shape
    return out_features, packed_columns(in_features)


@transactional
def load_masks(model, path: str) -> None:
    """Switch the model to the task saved in `path`: masks (inference form) and head. If the model
    has no MaskedLinear layers yet, they are created where the file has masks. The whole file is
    checked first (names, shapes, dtypes); it may only hold masks, the masked layers' biases and
    the head's parameters (never other base weights). `path`: a save_masks directory or a mask file."""
    if not all(module.frozen for module in masked_modules(model).values()) or not masked_modules(model):
        refuse_sharded(model, "load_masks", "it replaces the masked layers' scores (or the Linear layers) by packed "
                       "mask buffers, parameters FSDP2 manages; to resume training use load_training_checkpoint, to "
                       "serve masks load them before fully_shard")
    path = mask_weights_path(model, path)
    tensors, metadata = read_safetensors(path, with_metadata=True)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pefops mask file (format {metadata.get('format')!r})")
    mask_names = {key[: -len(".mask")] for key in tensors if key.endswith(".mask")}
    if not mask_names:
        raise ValueError(f"{path} holds no masks")
    modules = masked_modules(model)
    if modules:
        targets = modules
        missing, extra = set(modules) - mask_names, mask_names - set(modules)
        if missing or extra:
            raise ValueError(f"{path} does not match the model's masked layers: missing {sorted(missing)[:3]}, "
                             f"extra {sorted(extra)[:3]}")
        threshold = None
    else:
        try:
            thresholds = json.loads(metadata.get("thresholds", "[0.01]"))
            threshold = float(thresholds[0])
        except (ValueError, TypeError, IndexError, KeyError):
            raise ValueError(f"{path}: metadata 'thresholds' must be a JSON list of numbers; got "
                             f"{metadata.get('thresholds')!r}") from None
        candidates = {name: module for name, module in _layer_modules(model) if _is_maskable(module)}
        unknown = sorted(mask_names - set(candidates))
        if unknown:
            raise ValueError(f"{path}: mask {unknown[0] + '.mask'!r} names no Linear layer in the transformer layers")
        targets = {name: candidates[name] for name in mask_names}
    for name, module in targets.items():
        check_tensor(path, f"{name}.mask", tensors[f"{name}.mask"], _mask_shape(module), dtype=torch.uint8)
    allowed = {name: p for name, p in _head_parameters(model).items()}
    for name, module in targets.items():
        if module.bias is not None:
            allowed[f"{name}.bias"] = module.bias
    for key, tensor in tensors.items():
        if key.endswith(".mask"):
            continue
        if key not in allowed:
            raise ValueError(f"{path}: tensor {key!r} is neither a mask, a masked layer's bias nor a parameter of the "
                             "model's head; a mask file may not write other weights")
        check_tensor(path, key, tensor, allowed[key].shape)

    if threshold is not None:  # validated: the commit
        apply_mask_tuning(model, threshold=threshold, targets=sorted(mask_names))
    modules = masked_modules(model)
    for name, module in modules.items():
        module.set_mask(tensors[f"{name}.mask"])
    state = {**_head_parameters(model), **{f"{name}.bias": m.bias for name, m in modules.items() if m.bias is not None}}
    copy_into((state[key], tensor) for key, tensor in tensors.items() if not key.endswith(".mask"))


@transactional
def set_row_masks(model, paths: Optional[list] = None, row_task: Optional[torch.Tensor] = None) -> None:
    """Mixed-task batch for mask-tuning: sequence b of the next batches runs every masked layer with
    the mask of task paths[row_task[b]] (directories or files written by save_masks) over the one shared base
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
        path = mask_weights_path(model, path)
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"{path} is not a pefops mask file")
            keys = set(handle.keys())
            missing = [name for name in modules if f"{name}.mask" not in keys]
            if missing:
                raise ValueError(f"{path} has no mask for {missing[:3]}")
            task = {name: handle.get_tensor(f"{name}.mask") for name in modules}
        for name, module in modules.items():
            check_tensor(path, f"{name}.mask", task[name], _mask_shape(module), dtype=torch.uint8)
        per_task.append(task)
    if not per_task:
        raise ValueError("set_row_masks needs at least one mask file (paths=None clears the routing)")
    if row_task.numel() and (int(row_task.min()) < 0 or int(row_task.max()) >= len(per_task)):
        # the layers read -1 as "no mask" (hf.set_row_tasks' base rows); here every row names a mask file
        raise ValueError(f"row_task values must be in [0, {len(per_task)}) (indices into paths); got "
                         f"{int(row_task.min())}..{int(row_task.max())}")
    for name, module in modules.items():
        module.set_row_masks(torch.stack([task[name] for task in per_task]), row_task)
