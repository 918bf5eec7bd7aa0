"""All-or-nothing changes to a model: the one mechanism every model-changing `pefops.hf` function uses.

`model_transaction(model)` snapshots what a pefops function may change and, if the block raises,
puts it back before the exception propagates:
- every module's attribute dictionary (a shallow copy) and, one level down, the containers in it:
  `_modules` (the module tree), `_parameters` and `_buffers` (which tensor objects are registered),
  the forward hook dictionaries, an instance `forward` (a patched forward), `training`, pefops'
  registries and markers (`_pefops_adapters`, AdapterLayer.configs / .active, prefix sites, ...);
- every parameter's `requires_grad`;
- the attribute dictionary of every `config` object a module holds (the attention implementation,
  `pefops_lsh`, ...);
- the old contents of tensors written in place through `copy_into` (a loader's commit step), which
  clones only what is about to be overwritten.
Nothing is deep-copied: the cost is a dictionary copy per module, not a copy of the weights.

Loaders validate the whole checkpoint first and commit with `copy_into`; the transaction is the
safety net for whatever still fails (a file that looked right, a bug, a KeyboardInterrupt).
`transactional` wraps a function whose first argument is the model. Transactions nest: each call
restores its own changes when it fails (so a caller that catches an inner failure and goes on
still sees an unchanged model), and the outermost one restores everything.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
from torch import nn

_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("pefops_transactions", default=())


def _copy_container(value):
    """A one-level copy of a mutable container (restored into the same object), or None."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, set):
        return set(value)
    return None


_CONTAINERS = (dict, list, set)


def _snapshot_object(obj) -> tuple:
    state = dict(obj.__dict__)
    # one isinstance per attribute: most are not containers, and set_row_tasks (per batch) pays this
    inner = {key: (value, _copy_container(value)) for key, value in state.items() if isinstance(value, _CONTAINERS)}
    return obj, state, inner


def _restore_object(snapshot: tuple) -> None:
    obj, state, inner = snapshot
    for value, contents in inner.values():
        if isinstance(value, dict):
            value.clear()
            value.update(contents)
        elif isinstance(value, list):
            value[:] = contents
        else:
            value.clear()
            value.update(contents)
    obj.__dict__.clear()
    obj.__dict__.update(state)


class Transaction:
    def __init__(self, root: nn.Module):
        self.root = root
        modules = list(root.modules())
        self._modules = [_snapshot_object(module) for module in modules]
        configs = {}
        for module in modules:
            config = module.__dict__.get("config")
            if config is not None and hasattr(config, "__dict__") and not isinstance(config, type):
                configs[id(config)] = config
        self._configs = [_snapshot_object(config) for config in configs.values()]
        self._grad_flags = [(p, p.requires_grad) for module in modules for p in module._parameters.values()
                            if p is not None]
        self._writes: list = []  # (tensor, its old contents), in write order

    def record_write(self, tensor: torch.Tensor) -> None:
        self._writes.append((tensor, tensor.detach().clone()))

    def rollback(self) -> None:
        with torch.no_grad():
            for tensor, old in reversed(self._writes):
                tensor.copy_(old)
        for snapshot in self._configs:
            _restore_object(snapshot)
        for snapshot in self._modules:
            _restore_object(snapshot)
        for parameter, flag in self._grad_flags:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def model_transaction(model):
    """Run the block as one change to `model`: if it raises, the model is exactly as before."""
    active = _ACTIVE.get()
    if not isinstance(model, nn.Module):
        yield None  # not a model: the function raises its own error, there is nothing to restore
        return
    transaction = Transaction(model)
    token = _ACTIVE.set(active + (transaction,))
    try:
        yield transaction
    except BaseException:
        transaction.rollback()
        raise
    finally:
        _ACTIVE.reset(token)


def transactional(function):
    """Decorator: `function(model, ...)` changes the model all-or-nothing."""

    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with model_transaction(model):
            return function(model, *args, **kwargs)

    return wrapper


@torch.no_grad()
def copy_into(pairs) -> None:
    """The commit step of a loader: copy each (target, source) in place, recording the old contents
    in the active transactions so a later failure restores them. Shapes must match exactly (the
    caller validated them; a broadcast here is a bug). A sharded (DTensor) target receives this rank's
    shard of the source, so every loader works on an FSDP2 model when every rank calls it."""
    from pefops.hf.sharding import local_pair

    pairs = list(pairs)
    for target, source in pairs:
        if tuple(target.shape) != tuple(source.shape):
            raise ValueError(f"internal: copy of shape {tuple(source.shape)} into {tuple(target.shape)}")
    for target, source in [local_pair(target, source) for target, source in pairs]:
        for transaction in _ACTIVE.get():
            transaction.record_write(target)
        target.copy_(source.to(device=target.device, dtype=target.dtype))
