"""Training pefops-tuned models with transformers' Trainer: checkpoints that hold the task, not the base.

`PefopsTrainer` is transformers' `Trainer` with one change: what it saves as "the model" (every
checkpoint-N/ and save_model()) is a training checkpoint of the task only, and resume_from_checkpoint /
load_best_model_at_end read it back. Optimizer, scheduler, RNG and trainer state are Trainer's own files,
untouched. Users with their own Trainer subclass mix `TrainingCheckpointMixin` in front of it.

A training checkpoint is a directory:
  pefops_training.json    {"format", "trainable": {name: shape}, "exports": {method: relative path}}
  trainable.safetensors   every parameter that requires grad, under its name in the model: the method's
                          parameters and trainable heads (mask-tuning's real-valued scores included),
                          which is what resuming needs, exactly
  adapters/<name>/  fusions/<name>/  masks.safetensors  side.safetensors  prefix/
                          the same task in each method's own format, loadable by hf.load_adapter,
                          load_adapter_fusion, load_masks, load_side and load_prefix (masks are binarised
                          there, which is why resuming reads trainable.safetensors)
The frozen base is never written: rebuild it (from_pretrained + the same pefops calls) before loading.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from pefops.hf.checkpoint_io import check_names, check_tensor, read_json_object, read_safetensors
from pefops.hf.sharding import host_copy, is_sharded
from pefops.hf.transaction import copy_into, transactional

FORMAT = "pefops-training-1"
CONFIG_FILE = "pefops_training.json"
WEIGHTS_FILE = "trainable.safetensors"
TRAINING_ARGS_FILE = "training_args.bin"  # transformers' TRAINING_ARGS_NAME


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of `model` that requires grad, by name: what an optimizer should see."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _exports(model: nn.Module) -> dict:
    """{method: (relative path, save function)} for every pefops method the model trains."""
    from pefops.hf.adapters import adapter_parameters
    from pefops.hf.checkpoint import save_adapter
    from pefops.hf.fusion import fusion_parameters, save_adapter_fusion
    from pefops.hf.mask_tuning import masked_modules, save_masks
    from pefops.hf.prefix_tuning import save_prefix
    from pefops.hf.side_tuning import SideTunedModel, save_side

    exports = {}  # the registries are read with getattr: asking the helpers would create empty ones
    for name in getattr(model, "_pefops_adapters", {}):
        if any(p.requires_grad for p in adapter_parameters(model, name).values()):
            exports[f"adapter:{name}"] = (f"adapters/{name}", lambda d, n=name: save_adapter(model, d, n))
    for name, (_, fuse) in getattr(model, "_pefops_fusions", {}).items():
        if any(p.requires_grad for p in fusion_parameters(model, fuse).values()):
            exports[f"fusion:{name}"] = (f"fusions/{name}", lambda d, f=fuse: save_adapter_fusion(model, d, f))
    if masked_modules(model):
        exports["masks"] = ("masks.safetensors", lambda path: save_masks(model, path))
    sides = [module for module in model.modules() if isinstance(module, SideTunedModel)]
    if len(sides) > 1:
        raise ValueError(f"the model holds {len(sides)} side-tuned models; a training checkpoint exports one")
    if sides:
        exports["side"] = ("side.safetensors", lambda path: save_side(sides[0], path))
    if getattr(model, "prefix_tuning", None) is not None or getattr(model, "prompt_tuning", None) is not None:
        exports["prefix"] = ("prefix", lambda directory: save_prefix(model, directory))
    return exports


def save_training_checkpoint(model: nn.Module, directory, *, is_main_process: bool = True) -> None:
    """Write the task of `model` (see the module docstring) to `directory`. Under FSDP2 every rank must
    call it (sharded parameters are gathered, by the method's own save_* too); only the main process
    writes."""
    from safetensors.torch import save_file

    parameters = trainable_parameters(model)
    if not parameters:
        raise ValueError("the model has no parameter that requires grad: nothing to save (apply a pefops method "
                         "or unfreeze what should train)")
    tensors = {name: host_copy(p) for name, p in parameters.items()}  # a collective when sharded
    exports = _exports(model)
    directory = str(directory)
    if is_main_process:
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": FORMAT})
    if is_main_process or is_sharded(model):  # sharded: every rank gathers in save_*, rank 0 writes
        for relative, save in exports.values():
            save(os.path.join(directory, relative))
    if not is_main_process:
        return
    config = {"format": FORMAT, "trainable": {name: list(t.shape) for name, t in tensors.items()},
              "exports": {method: relative for method, (relative, _) in exports.items()}}
    with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def is_training_checkpoint(directory) -> bool:
    return os.path.isfile(os.path.join(str(directory), CONFIG_FILE))


@transactional
def load_training_checkpoint(model: nn.Module, directory) -> None:
    """Copy the trainable parameters saved by save_training_checkpoint into `model`, which must be
    prepared as when it was saved (same base, same pefops calls, the same parameters requiring grad).
    Names and exact shapes are checked before anything is written; sharded (DTensor) parameters
    receive their own shard (every rank calls it)."""
    directory = str(directory)
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    config = read_json_object(config_path)
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}; expected {FORMAT!r}")
    tensors = read_safetensors(weights_path)
    parameters = trainable_parameters(model)
    check_names(weights_path, tensors, parameters, "trainable-parameter")
    for name, tensor in tensors.items():
        check_tensor(weights_path, name, tensor, parameters[name].shape)
    copy_into((parameters[name], tensor) for name, tensor in tensors.items())


class TrainingCheckpointMixin:
    """Put in front of transformers' Trainer (or a subclass of it): checkpoints hold the task only."""

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_training_checkpoint(self.model, output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not is_training_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_training_checkpoint(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self):
        if not is_training_checkpoint(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_training_checkpoint(self.model, self.state.best_model_checkpoint)


_TRAINER_CLASS = []  # built on first use: importing pefops.hf must not import transformers


def __getattr__(name):
    if name != "PefopsTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _TRAINER_CLASS:
        from transformers import Trainer

        _TRAINER_CLASS.append(type("PefopsTrainer", (TrainingCheckpointMixin, Trainer), {
            "__module__": __name__,
            "__doc__": "transformers.Trainer whose checkpoints hold the pefops task only (TrainingCheckpointMixin).",
        }))
    return _TRAINER_CLASS[0]
