"""Models sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`) or any other DTensor layout (#16).

Saving: every rank calls the `save_*` function, which gathers each sharded parameter it writes (a
collective, in the same order on every rank) and lets only rank 0 write, so the checkpoint is one
ordinary, unsharded checkpoint. Loading: every rank reads the same files and copies its own shard
(`copy_into` does it for every loader).

What cannot run on a sharded model, with the reason, is refused by `refuse_sharded`: a call that adds,
removes or replaces parameters (apply a method, add an adapter, freeze masks) would leave FSDP2
managing parameters the model no longer has, or training new ones that FSDP2 neither shards nor
reduces across ranks. Those calls belong before `fully_shard`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_dtensor(tensor) -> bool:
    return getattr(tensor, "device_mesh", None) is not None and hasattr(tensor, "to_local")


def is_sharded(model: nn.Module) -> bool:
    """True if `model` holds a DTensor parameter or an FSDP2 unit (whose parameters may be unsharded
    plain tensors between a forward and the next reshard)."""
    if any(is_dtensor(parameter) for parameter in model.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def refuse_sharded(model: nn.Module, what: str, why: str) -> None:
    if isinstance(model, nn.Module) and is_sharded(model):
        raise ValueError(f"{what} cannot run on a sharded (FSDP2 fully_shard / DTensor) model: {why}. Call it on the "
                         "unsharded model, then fully_shard it")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this process: a DTensor is gathered (a collective: every rank must call it),
    a plain tensor is returned as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached, as a contiguous CPU tensor of its own: what a checkpoint writes."""
    return full_tensor(tensor.detach()).cpu().clone().contiguous()


def writes_files(model: nn.Module) -> bool:
    """Whether this process writes a checkpoint of `model`: always, unless the model is sharded, in
    which case every rank gathers and rank 0 alone writes (the files would be identical)."""
    if not is_sharded(model):
        return True
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def local_pair(target: torch.Tensor, whole: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to write, what to write into it) for copying the whole tensor `whole` into `target`:
    a DTensor target receives this rank's shard of `whole` in its local tensor. Every rank holds
    `whole` (read from the same file), so the shard is cut locally, without communication."""
    if not is_dtensor(target):
        return target, whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=target.device, dtype=target.dtype)
    try:
        shard = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)
    except TypeError:  # a torch before src_data_rank: rank 0's copy is scattered (every rank loads, so it is the same)
        shard = distribute_tensor(whole, target.device_mesh, target.placements)
    return target.to_local(), shard.to_local()


CHANGES_PARAMETERS = ("it adds, removes or replaces parameters, and FSDP2 keeps managing the ones it sharded while "
                      "new ones would train unsharded, their gradients never reduced across ranks")


def model_class_name(model: nn.Module) -> str:
    """The model's own class name: fully_shard swaps a module's class for a generated FSDP<Name>
    subclass, which a checkpoint must not record (the model loading it is not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return type(model).__name__
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__
