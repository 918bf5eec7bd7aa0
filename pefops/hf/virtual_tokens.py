"""What prefix-tuning and prompt tuning share (both prepend trainable virtual tokens): the trainable
task-head modules (PEFT's modules_to_save) and switching the virtual tokens off for a block.

Both method modules import this one and neither imports the other's internals for these, so the
import graph has no cycle (prefix_tuning's save/load imports prompt_tuning, one way)."""

from __future__ import annotations

import contextlib

from torch import nn

from pefops.hf.transaction import transactional


def check_trainable_modules(model, names) -> tuple[str, ...]:
    """The names of `trainable_modules`, checked (each a submodule of `model` with parameters); the model
    is not changed."""
    if isinstance(names, str):
        names = (names,)
    if names is None:
        names = ()
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(f"trainable_modules must be a list of submodule names; got {names!r}") from None
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"trainable_modules: names must be non-empty strings; got {name!r}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            children = [child for child, _ in model.named_children()]
            raise ValueError(f"trainable_modules: the model has no submodule {name!r} (top-level modules: "
                             f"{children})") from None
        if not any(True for _ in module.parameters()):
            raise ValueError(f"trainable_modules: {name!r} has no parameters")
    return names


@transactional
def set_trainable_modules(model, names) -> tuple[str, ...]:
    """Make the named submodules of `model` (e.g. a task head: "classifier", "score") trainable after
    the base was frozen; save_prefix writes them with the prefix (PEFT's modules_to_save). All names
    are checked before any changes."""
    names = check_trainable_modules(model, names)
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    return names


def trainable_module_parameters(model, names) -> dict[str, nn.Parameter]:
    """{"model.<module>.<parameter>": parameter} of the trainable modules (the keys save_prefix uses)."""
    return {f"model.{name}.{key}": parameter for name in names
            for key, parameter in model.get_submodule(name).named_parameters()}


@contextlib.contextmanager
def tokens_disabled(owner: nn.Module):
    """Inside the block the PrefixTuning / PromptTuning `owner` is switched off (its `enabled` flag),
    so the model computes exactly what its base computes; the previous setting comes back after."""
    previous, owner.enabled = owner.enabled, False
    try:
        yield
    finally:
        owner.enabled = previous
