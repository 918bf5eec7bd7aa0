"""One frozen base, many tasks (issue 15): load any pefops-readable checkpoint as a named, inactive
task (`load_task`), list them (`list_tasks`), and route every row of a batch through its own task
(`set_row_tasks`).

A task is one of: a bottleneck adapter (pefops or AdapterHub directory; adapters added with
add_adapter are tasks under their own names), an AdapterFusion (its directory, with the fused
adapters in sub-directories named after them unless the model has them already), a mask set
(save_masks directory or file), or a prefix / prompt (save_prefix directory, PEFT PREFIX_TUNING /
PROMPT_TUNING directory). Mask tasks keep their packed masks here, outside the model; prefix and
prompt tasks keep their modules in `model.pefops_task_modules`. Side-tuning changes the whole
network and LSH attention the attention of every row: neither can be a task of a shared batch.

Routing: set_row_tasks builds one RowRouting for the adapter sites (adapters by name, fusions as
Fuse, every other row passes through) and one stack of the distinct packed masks per masked layer
(rows of non-mask tasks use the base weight unmasked, in one dense GEMM), so one call per site
serves every row.
Prefix tasks: every row attends to its own task's prefix slots only, one prefix_attention call per
layer (hf/row_prefix.py). Prompt tasks: one front block of max(P_t) input slots, each row's own
virtual tokens in its last P slots, the rest hidden, positions renumbered per row (hf/row_prompt.py);
outputs then have max(P_t) + S positions, the tokens last.
Task heads are not routed per row: checkpoints that carry a head are refused as tasks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pefops.hf.adapters import Fuse, RowRouting, adapter_layers, adapter_registry, fusion_registry
from pefops.hf.sharding import CHANGES_PARAMETERS, refuse_sharded
from pefops.hf.transaction import transactional

ATTRIBUTE = "pefops_task_modules"  # nn.ModuleDict of prefix / prompt task modules on the model
REGISTRY = "_pefops_tasks"  # {name: Task} of tasks load_task registered


@dataclass
class Task:
    method: str  # "bottleneck_adapter", "adapter_fusion", "mask_tuning", "prefix_tuning", "prompt_tuning"
    path: Optional[str] = None  # where it was loaded from (bytes on disk)
    fuse: Optional[Fuse] = None  # adapter_fusion: the composition
    masks: dict = field(default_factory=dict)  # mask_tuning: {masked layer name: packed uint8 mask}


def _registry(model) -> dict:
    if REGISTRY not in model.__dict__:
        model.__dict__[REGISTRY] = {}
    return model.__dict__[REGISTRY]


def _bytes_on_disk(path: Optional[str]) -> Optional[int]:
    if path is None:
        return None
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _all_tasks(model) -> dict:
    """Every task of the model: loaded ones, adapters and fusions added directly, by name."""
    loaded = _registry(model)
    tasks = {name: Task("bottleneck_adapter") for name in adapter_registry(model)}
    named_fusions = {task.fuse for task in loaded.values() if task.fuse is not None}
    for fusion_name, (_, fuse) in fusion_registry(model).items():
        if fuse not in named_fusions:  # a fusion loaded as a task is listed under the task's name only
            tasks[fusion_name] = Task("adapter_fusion", fuse=fuse)
    tasks.update(loaded)
    return tasks


# ------------------------------------------------------------------------------------ load_task


def detect_method(path) -> str:
    """The method of the checkpoint at `path`, from its files."""
    from pefops.hf.task_io import is_single_file
    from pefops.hf.checkpoint_io import read_json_object

    path = str(path)
    if is_single_file(path) and os.path.isfile(path):
        return "mask_tuning"  # the only single-file task checkpoint (a side file is refused by its loader)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is neither a checkpoint directory nor a mask file")
    files = set(os.listdir(path))
    if "masks_config.json" in files:
        return "mask_tuning"
    if "side_config.json" in files:
        return "side_tuning"
    if "adapter_fusion_config.json" in files:
        return "adapter_fusion"
    if "prefix_config.json" in files:
        method = read_json_object(os.path.join(path, "prefix_config.json")).get("method")
        return method if method in ("prefix_tuning", "prompt_tuning") else "unknown"
    if "adapter_config.json" in files:
        config = read_json_object(os.path.join(path, "adapter_config.json"))
        peft_type = config.get("peft_type")
        if peft_type is not None:
            return {"PREFIX_TUNING": "peft_prefix_tuning", "PROMPT_TUNING": "peft_prompt_tuning"}.get(peft_type,
                                                                                                  f"peft {peft_type}")
        return "bottleneck_adapter"
    raise ValueError(f"{path} holds no checkpoint pefops reads (adapter_config.json, adapter_fusion_config.json, "
                     f"masks_config.json, prefix_config.json); it has {sorted(files)[:8]}")


def _check_name(model, name) -> None:
    if not isinstance(name, str) or not name or "." in name or "," in name:
        raise ValueError(f"task name must be a non-empty string without dots or commas; got {name!r}")
    if name in _all_tasks(model):
        raise ValueError(f"the model already has a task named {name!r}")


@transactional
def load_task(model, name: str, path, **options) -> str:
    """Load the checkpoint at `path` as the inactive task `name` (method detected from the files) and
    return its method. Everything (model type, hidden size, names, shapes) is checked before the model
    changes; on any error the model is as before. options: `adapters` ({name: directory}) for a
    fusion whose adapters are neither loaded nor in sub-directories of its directory."""
    refuse_sharded(model, "load_task", CHANGES_PARAMETERS)
    _check_name(model, name)
    path = str(path)
    method = detect_method(path)
    unknown = sorted(set(options) - ({"adapters"} if method == "adapter_fusion" else set()))
    if unknown:
        raise ValueError(f"load_task: unknown options {unknown} for a {method} checkpoint")
    loaders = {"bottleneck_adapter": _load_adapter_task, "adapter_fusion": _load_fusion_task,
               "mask_tuning": _load_mask_task, "prefix_tuning": _load_prefix_task, "prompt_tuning": _load_prefix_task,
               "peft_prefix_tuning": _load_prefix_task, "peft_prompt_tuning": _load_prefix_task}
    if method == "side_tuning":
        raise ValueError(f"{path} holds a side network: side-tuning changes the whole network, so it cannot be a "
                         "task of a shared base (use hf.side_tune / hf.load_side)")
    if method not in loaders:
        raise ValueError(f"{path}: {method} checkpoints cannot be loaded as tasks")
    task = loaders[method](model, name, path, **options)
    task.path = path
    _registry(model)[name] = task
    return task.method


def _load_adapter_task(model, name, path) -> Task:
    from pefops.hf.checkpoint import load_adapter

    load_adapter(model, path, load_as=name)
    return Task("bottleneck_adapter")


def _load_fusion_task(model, name, path, adapters=None) -> Task:
    from pefops.hf.checkpoint import load_adapter
    from pefops.hf.checkpoint_io import read_json_object
    from pefops.hf.fusion import CONFIG_FILE, load_adapter_fusion

    meta = read_json_object(os.path.join(path, CONFIG_FILE))
    names = meta.get("adapter_names") or str(meta.get("name", "")).split(",")
    adapters = dict(adapters or {})
    for adapter in names:
        if adapter in adapter_registry(model):
            continue
        directory = adapters.get(adapter, os.path.join(path, str(adapter)))
        if not os.path.isdir(directory):
            raise ValueError(f"{path} fuses adapter {adapter!r}, which the model does not have and which is not in "
                             f"{directory}: load it first or pass adapters={{{adapter!r}: directory}}")
        load_adapter(model, directory, load_as=adapter)
    return Task("adapter_fusion", fuse=load_adapter_fusion(model, path))


def _all_ones_mask(module) -> torch.Tensor:
    from pefops.ops.masked_linear import pack_mask

    return pack_mask(torch.ones(module.out_features, module.in_features, dtype=torch.bool,
                                device=module.weight.device))


def _same_tensor(parameter, handle, key) -> bool:
    if parameter is None or tuple(handle.get_slice(key).get_shape()) != tuple(parameter.shape):
        return False
    return torch.equal(handle.get_tensor(key).to(parameter.device, parameter.dtype), parameter.detach())


def _load_mask_task(model, name, path) -> Task:
    """load_masks validates the file and creates the masked layers where needed; the task's masks are
    then taken out and the layers put back to their previous masks (all ones for new layers: the base)."""
    from pefops.hf.mask_tuning import load_masks, mask_weights_path, masked_modules
    from safetensors import safe_open

    own = dict(model.named_parameters())
    with safe_open(mask_weights_path(model, path), framework="pt") as handle:
        # a head saved untouched (a language model's lm_head, frozen) equals the model's own: nothing to route
        heads = [key for key in handle.keys() if not key.endswith(".mask") and not _same_tensor(own.get(key),
                                                                                                 handle, key)]
    if heads:
        raise ValueError(f"{path} carries head or bias tensors that differ from the model's ({heads[:3]}): heads are "
                         "not routed per row, so it cannot be a task of a shared batch (load it with hf.load_masks)")
    modules = masked_modules(model)
    training = [layer for layer, module in modules.items() if not module.frozen]
    if training:
        raise ValueError(f"the model's masked layers are in training form ({training[:2]}): freeze_masks first")
    previous = {layer: module.mask for layer, module in modules.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    load_masks(model, path)
    for parameter, flag in flags:  # load_masks freezes the base and trains the head: a task changes neither
        parameter.requires_grad_(flag)
    masks = {}
    for layer, module in masked_modules(model).items():
        module.weight.requires_grad_(False)  # a masked layer's weight is the frozen shared base (ops refuse others)
        masks[layer] = module.mask
        module.set_mask(previous[layer] if layer in previous else _all_ones_mask(module))
    return Task("mask_tuning", masks=masks)


def _task_modules(model) -> nn.ModuleDict:
    if not isinstance(getattr(model, ATTRIBUTE, None), nn.ModuleDict):
        setattr(model, ATTRIBUTE, nn.ModuleDict())
    return getattr(model, ATTRIBUTE)


def _load_prefix_task(model, name, path) -> Task:
    """The method's own loader applies the prefix / prompt; it is then taken off the model (attention
    implementation, hooks and requires_grad as before) and kept as the task's module."""
    from pefops.hf import peft_import, prefix_tuning, prompt_tuning

    if getattr(model, prefix_tuning.ATTRIBUTE, None) is not None or getattr(model, prompt_tuning.ATTRIBUTE, None):
        raise ValueError("the model has prefix-tuning or prompt tuning applied itself; load prefix and prompt tasks "
                         "into a model without them")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    method = detect_method(path)
    loader = {"prefix_tuning": prefix_tuning.load_prefix, "prompt_tuning": prefix_tuning.load_prefix,
              "peft_prefix_tuning": peft_import.load_peft_prefix,
              "peft_prompt_tuning": peft_import.load_peft_prompt}[method]
    tuning = loader(model, path)
    if tuning.trainable_modules:
        raise ValueError(f"{path} carries a task head ({list(tuning.trainable_modules)}): heads are not routed per "
                         "row, so it cannot be a task of a shared batch")
    if isinstance(tuning, prefix_tuning.PrefixTuning):
        prefix_tuning.remove_prefix_tuning(model)
    else:
        prompt_tuning.remove_prompt_tuning(model)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)
    for parameter in tuning.parameters():
        parameter.requires_grad_(False)  # an inactive task does not train until asked
    _task_modules(model)[name] = tuning
    return Task(tuning.config_dict()["method"])


# ------------------------------------------------------------------------------------ list_tasks


def _task_parameters(model, name: str, task: Task) -> list:
    from pefops.hf.adapters import adapter_parameters
    from pefops.hf.fusion import fusion_parameters

    if task.method == "bottleneck_adapter":
        return list(adapter_parameters(model, name).values())
    if task.method == "adapter_fusion":
        return list(fusion_parameters(model, task.fuse).values())
    if task.method in ("prefix_tuning", "prompt_tuning"):
        return list(getattr(model, ATTRIBUTE)[name].parameters())
    return []


def list_tasks(model) -> dict:
    """{name: {"method", "trainable_parameters", "stored_parameters", "bytes_on_disk"}} for every task.
    stored_parameters: the numbers a checkpoint holds (a mask set: one bit per masked weight);
    bytes_on_disk: the size of the checkpoint it was loaded from (None: added in memory)."""
    listing = {}
    for name, task in _all_tasks(model).items():
        parameters = _task_parameters(model, name, task)
        stored = sum(p.numel() for p in parameters)
        if task.method == "mask_tuning":
            from pefops.hf.mask_tuning import masked_modules

            modules = masked_modules(model)
            stored = sum(modules[layer].out_features * modules[layer].in_features for layer in task.masks)
        listing[name] = {"method": task.method,
                         "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
                         "stored_parameters": stored, "bytes_on_disk": _bytes_on_disk(task.path)}
    return listing


# ------------------------------------------------------------------------------------ set_row_tasks


def _tunings(model, names: list, tasks: dict, method: str) -> list:
    """Per entry of names: the task's module (PrefixTuning / PromptTuning) if it is a `method` task, else None."""
    return [getattr(model, ATTRIBUTE)[n] if n is not None and tasks[n].method == method else None for n in names]


def _check_shared_batch(model, names: list, tasks: dict) -> None:
    from pefops.hf.side_tuning import SideTunedModel

    if isinstance(model, SideTunedModel):
        raise ValueError("side-tuning changes the whole network: a side-tuned model cannot run a mixed-task batch")
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == "pefops_lsh" or any(getattr(m, "_pefops_lsh_patched", False) for m in model.modules()):
        raise ValueError("LSH attention changes the attention of every row: it cannot share a mixed-task batch "
                         "(remove_lsh_attention first)")
    unknown = [n for n in names if n is not None and n not in tasks]
    if unknown:
        raise ValueError(f"no tasks named {unknown}; the model has {sorted(tasks) or 'none'} (None: the base model)")


def _stacked_masks(module, masks: list) -> torch.Tensor:
    """The packed task masks of one masked layer stacked [tasks, out, ceil(in / 8)] on its weight's device.
    A serving loop calls set_row_tasks per batch with the same task list and a new row index: the stack
    is kept on the layer and reused while it is made of the same mask tensors at the same versions."""
    from pefops.ops.masked_linear import packed_columns

    device = module.weight.device
    key = (str(device), tuple((id(mask), mask._version) for mask in masks))
    cached = module.__dict__.get("_row_mask_stack")
    if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1], masks)):
        return cached[2]
    if masks:
        packed = torch.stack([mask.to(device) for mask in masks])
    else:  # no mask task at this layer: every row runs the dense GEMM
        packed = torch.empty((0, module.out_features, packed_columns(module.in_features)), dtype=torch.uint8,
                             device=device)
    module.__dict__["_row_mask_stack"] = (key, tuple(masks), packed)
    return packed


@transactional
def set_row_tasks(model, names: Optional[list], row_task: Optional[torch.Tensor] = None) -> None:
    """Route row b of every later forward through task names[row_task[b]] only (None in names: the base
    model). names=None clears the routing (adapters inactive, masked layers back to their own masks).
    Every name, index and method is checked before the model changes.

    With prompt tasks among names, every forward's inputs and outputs get a front block of P_max =
    max(P_t) slots over the routed tasks (as prompt tuning alone puts its P in front): outputs have
    P_max + S positions, the S tokens last. A prompt row's virtual-token outputs are the last P of
    its block; the other slots (all P_max of rows of other methods) are hidden and their outputs free.
    Each row's positions are its task's alone (virtual tokens 0..P-1, tokens P + their position; given
    position_ids are honoured, so left-padded rows in generate() equal their unpadded run)."""
    from pefops.hf.mask_tuning import masked_modules
    from pefops.hf.row_prefix import check_row_prefix, clear_row_prefix, install_row_prefix
    from pefops.hf.row_prompt import check_row_prompt, clear_row_prompt, install_row_prompt
    from pefops.ops.common import check_index_tensor, describe

    modules = masked_modules(model)
    if names is None:
        clear_row_prefix(model)
        clear_row_prompt(model)
        if adapter_registry(model):
            for _, _, adapter_layer in adapter_layers(model):
                adapter_layer.active = None
            model._pefops_active_adapter = None
        for module in modules.values():
            module.set_row_masks(None)
        return
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"names must be a non-empty list of task names (None for the base); got {names!r}")
    check_index_tensor(row_task, "row_task", "[batch] of indices into names (int64)")
    if row_task.dim() != 1:
        raise ValueError(f"row_task must be a 1-D integer tensor [batch] of indices into names; got "
                         f"{describe(row_task)}")
    if row_task.numel() and (int(row_task.min()) < 0 or int(row_task.max()) >= len(names)):
        raise ValueError(f"row_task values must be in [0, {len(names)}); got {int(row_task.min())}.."
                         f"{int(row_task.max())}")
    tasks = _all_tasks(model)
    _check_shared_batch(model, list(names), tasks)
    tunings = _tunings(model, list(names), tasks, "prefix_tuning")
    check_row_prefix(model, tunings)
    prompts = _tunings(model, list(names), tasks, "prompt_tuning")
    check_row_prompt(model, prompts)
    unfrozen = [layer for layer, module in modules.items() if not module.frozen]
    if unfrozen:
        raise ValueError(f"masked layer {unfrozen[0]} is in training form: freeze_masks first (a mixed batch routes "
                         "packed masks)")

    def route_entry(name):
        task = tasks.get(name)
        if task is None or task.method not in ("bottleneck_adapter", "adapter_fusion"):
            return None  # passes through the adapter sites
        return task.fuse if task.method == "adapter_fusion" else name

    if adapter_registry(model):
        routing = RowRouting([route_entry(n) for n in names], row_task)
        for _, _, adapter_layer in adapter_layers(model):
            adapter_layer.active = routing
        model._pefops_active_adapter = routing
    install_row_prefix(model, tunings, row_task)
    install_row_prompt(model, prompts, row_task)
    for layer, module in modules.items():
        # only the distinct task masks of this layer are stacked; rows of every other task (and of mask
        # tasks without a mask here) get -1: the shared weight unmasked, one dense GEMM for all of them
        masked = [n for n in dict.fromkeys(names) if n is not None and tasks[n].method == "mask_tuning"
                  and layer in tasks[n].masks]
        slot = torch.tensor([masked.index(n) if n in masked else -1 for n in names], device=row_task.device)
        module.set_row_masks(_stacked_masks(module, [tasks[n].masks[layer] for n in masked]), slot[row_task])
