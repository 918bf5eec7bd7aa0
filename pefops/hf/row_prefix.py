"""Prefix-tuning rows of a mixed-task batch (issue 15): row b attends to the prefix of its own task
(none for rows of other methods and of the base), through one prefix_attention call per layer.

At each attention site, every prefix task's key/values are computed once per forward (one
PrefixEncoder.layer call per task, never per row; in inference once, reused by every forward,
decoding step and later routing until one of that task's parameters changes), padded with zero slots to the longest prefix of
the batch and gathered per row into [B, Hkv, P_max, D]. The slots that are not a row's own are
hidden by a mask over the prefix columns ([B, P_max] bool, built once in set_row_tasks), which
prefix_attention takes in front of the sequence mask. A hidden slot has softmax weight exactly 0,
so row b computes what its task computes alone, and its gradient reaches only its own task.

A task loaded from PEFT (peft_compatible_positions) shifts the positions of its rows by its P, as
its own hook does alone; other rows keep theirs. The KV cache holds real tokens only, as with a
single prefix, so generate() runs unchanged.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from pefops.hf.prefix_tuning import (
    BASE_IMPLEMENTATIONS,
    ROW_SITE_ATTRIBUTE,
    PrefixTuning,
    _base,
    _position_hook,
    _set_implementation,
    implementation_name,
    register_attention_functions,
)

STATE = "_pefops_row_prefix"  # in model.__dict__: (RowPrefix, base implementation, hooks) while routed


def task_slots(tunings: list, row_task: torch.Tensor) -> tuple[list, torch.Tensor]:
    """(the distinct modules of `tunings`, [B] slot of each row: 0 for a row whose entry is None, i + 1 for
    distinct[i]), the slots on the modules' device. A task named twice is one slot."""
    distinct = list({id(t): t for t in tunings if t is not None}.values())
    slot_of_name = torch.tensor([0 if t is None else 1 + [id(d) for d in distinct].index(id(t)) for t in tunings])
    device = next(distinct[0].parameters()).device
    return distinct, slot_of_name.to(device)[row_task.to(device)]


class RowPrefix:
    """The per-row prefix of one routing: `tunings[i]` is the PrefixTuning of names[i] (None: no prefix)."""

    def __init__(self, tunings: list[Optional[PrefixTuning]], row_task: torch.Tensor):
        distinct, self.row_slot = task_slots(tunings, row_task)
        device = self.row_slot.device
        self.encoders = [tuning.encoder for tuning in distinct]
        lengths = [0] + [tuning.num_virtual_tokens for tuning in distinct]
        shifts = [0] + [tuning.num_virtual_tokens if tuning.peft_compatible_positions else 0 for tuning in distinct]
        self.batch = row_task.numel()
        self.width = max(lengths)
        self.slot_keep = torch.arange(self.width, device=device)[None, :] < torch.tensor(lengths, device=device)[
            self.row_slot][:, None]  # [B, P_max]
        row_shift = torch.tensor(shifts, device=device)[self.row_slot]
        self.position_shift = row_shift[:, None] if any(shifts) else None  # [B, 1]
        self._cache: dict = {}  # site index -> (parameter versions, (prefix_k, prefix_v)), inference only


    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v) [B, Hkv, P_max, D] of site `index`: each task's computed once per
        forward; without autograd (inference, every step of generate()) each task's kept until one of
        its parameters changes (version or storage), across routings too (a serving loop routes every
        batch anew), and the rows' gather kept for this routing."""
        if torch.is_grad_enabled():
            return self._gather([encoder.layer(index) for encoder in self.encoders])
        versions = tuple(_parameter_versions(encoder) for encoder in self.encoders)
        cached = self._cache.get(index)
        if cached is None or cached[0] != versions:
            pairs = [_inference_layer(encoder, index) for encoder in self.encoders]
            cached = self._cache[index] = (versions, self._gather(pairs))
        return cached[1]

    def _gather(self, pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's (prefix_k, prefix_v) [Hkv, P_t, D] padded to P_max and gathered per row."""
        keys, values = [], []
        for prefix_k, prefix_v in pairs:
            missing = self.width - prefix_k.shape[1]
            keys.append(F.pad(prefix_k, (0, 0, 0, missing)))
            values.append(F.pad(prefix_v, (0, 0, 0, missing)))
        keys.insert(0, torch.zeros_like(keys[0]))  # the empty slot of rows without a prefix (all hidden)
        values.insert(0, torch.zeros_like(values[0]))
        return torch.stack(keys)[self.row_slot], torch.stack(values)[self.row_slot]

    def attention_mask(self, attention_mask: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor):
        """The mask over [prefix ; keys] for prefix_attention: each row's own slots visible, then the
        sequence mask (None, [B, Sk] key padding or 4-D bool / additive) as it was."""
        batch, sk = query.shape[0], key.shape[2]
        check_routed_batch(self.batch, batch)
        if attention_mask is None:
            sequence = torch.ones((1, 1, 1, sk), dtype=torch.bool, device=query.device)
        elif attention_mask.dim() == 2:
            sequence = (attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0)[:, None, None]
        else:
            sequence = attention_mask if attention_mask.dim() == 4 else attention_mask.unsqueeze(0)
        front = self.slot_keep.to(query.device)
        if sequence.dtype != torch.bool:
            front = torch.zeros(front.shape, dtype=sequence.dtype, device=query.device).masked_fill(~front,
                                                                                                  float("-inf"))
        shape = (batch, sequence.shape[1], sequence.shape[2])
        return torch.cat([front[:, None, None, :].expand(*shape, -1), sequence.expand(*shape, -1)], dim=-1)


# encoder -> {site index: (its parameters' versions and storage, (prefix_k, prefix_v))}, inference only
_ENCODER_KEY_VALUES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _parameter_versions(encoder) -> tuple:
    """What changes when one of the encoder's parameters does: its version, storage or dtype."""
    return tuple((p._version, p.data_ptr(), p.dtype) for p in encoder.parameters())


def _inference_layer(encoder, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """encoder.layer(index) without autograd, kept per encoder and site until one of the encoder's
    parameters changes (an optimizer step, load_state_dict, a move to another device or dtype)."""
    versions = _parameter_versions(encoder)
    per_site = _ENCODER_KEY_VALUES.setdefault(encoder, {})
    cached = per_site.get(index)
    if cached is None or cached[0] != versions:
        cached = per_site[index] = (versions, encoder.layer(index))
    return cached[1]


def check_routed_batch(routed: int, batch: int) -> None:
    if batch != routed:
        raise ValueError(f"set_row_tasks routed {routed} rows; this forward has {batch} (call set_row_tasks again "
                         "with one task index per row)")


def refuse_own_virtual_tokens(model, tasks: str) -> None:
    """Routed prefix / prompt rows replace the model's own: a model with either applied is refused."""
    from pefops.hf import prefix_tuning, prompt_tuning

    if getattr(model, prefix_tuning.ATTRIBUTE, None) is not None or getattr(model, prompt_tuning.ATTRIBUTE, None):
        raise ValueError(f"the model has prefix-tuning or prompt tuning applied itself: remove it before routing "
                         f"{tasks} tasks per row")


def check_row_prefix(model, tunings: list[Optional[PrefixTuning]]) -> None:
    """Every prefix task must serve the same attention sites; the model must carry no prefix itself."""
    present = [t for t in tunings if t is not None]
    if not present:
        return
    refuse_own_virtual_tokens(model, "prefix")
    if any(t.sites != present[0].sites for t in present):
        raise ValueError("the prefix tasks of one batch must prefix the same attention layers (a T5 task with "
                         "cross_attention=True cannot share a batch with one without)")
    implementation = model.config._attn_implementation
    if implementation not in BASE_IMPLEMENTATIONS + tuple(implementation_name(b) for b in BASE_IMPLEMENTATIONS):
        raise ValueError(f"prefix rows wrap the 'sdpa' or 'eager' attention implementation; the model uses "
                         f"{implementation!r}")


def clear_row_prefix(model) -> None:
    """Take the per-row prefix off the model (sites, position hook, attention implementation)."""
    state = model.__dict__.pop(STATE, None)
    if state is None:
        return
    _, base_implementation, hooks = state
    for module in model.modules():
        module.__dict__.pop(ROW_SITE_ATTRIBUTE, None)
    for hook in hooks:
        hook.remove()
    _set_implementation(model, base_implementation)


def install_row_prefix(model, tunings: list[Optional[PrefixTuning]], row_task: torch.Tensor) -> None:
    """Route the prefix tasks in `tunings` per row (after check_row_prefix; replaces any earlier routing)."""
    clear_row_prefix(model)
    present = [t for t in tunings if t is not None]
    if not present:
        return
    row_prefix = RowPrefix(tunings, row_task)
    for index, site in enumerate(present[0].sites):
        model.get_submodule(site).__dict__[ROW_SITE_ATTRIBUTE] = (row_prefix, index)
    base_implementation = model.config._attn_implementation
    register_attention_functions()
    _set_implementation(model, implementation_name(base_implementation))
    hooks = []
    if row_prefix.position_shift is not None:
        hooks.append(_base(model).register_forward_pre_hook(_position_hook(row_prefix.position_shift),
                                                            with_kwargs=True))
    model.__dict__[STATE] = (row_prefix, base_implementation, hooks)
