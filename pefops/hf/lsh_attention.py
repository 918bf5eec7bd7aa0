"""LSH attention (Reformer) in transformers models, two ways.

1. `apply_lsh_attention(model)`: every transformers `LSHSelfAttention` inside a Reformer model
   (ReformerModel, ReformerModelWithLMHead, ReformerForMaskedLM, ...; also mixed "local"/"lsh"
   layers) runs pefops' fused op. Which layers get which replacement forward is the `lsh_patches`
   field of the model type's entry in pefops.hf.architectures.ARCHITECTURES, not code per model.
   Same configuration and hash_seed: outputs, loss and every gradient equal the unpatched model
   (fp32 tolerance), including Reformer's reversible backward, which recomputes each layer with the
   buckets of its forward pass.
   transformers' own forward still serves what the fused op does not: a decoding step with cached
   buckets/states (`past_buckets_states` already holding this layer) and `output_attentions=True`
   (the op never materialises attention probabilities). num_buckets=None keeps transformers' rule
   (its `_set_num_buckets` runs on the first long sequence). Undo with the returned handle's
   `.remove()` or `remove_lsh_attention(model)`.

2. `attn_implementation="pefops_lsh"`: LSH attention for any model that dispatches through
   transformers' AttentionInterface (BERT, GPT-2, LLaMA, ...). Call `register_lsh_attention()` once
   (it also registers the mask format), then either load with
   `from_pretrained(..., attn_implementation="pefops_lsh")` and set `model.config.pefops_lsh`, or
   call `configure_lsh_attention(model, num_hashes=..., ...)`, which does both on a loaded model.
   Options (model.config.pefops_lsh, a dict saved with the config): num_hashes (4), num_buckets
   (None: transformers' rule, about 2 * seq / chunk_length rounded down to a power of two),
   chunk_length (64), num_chunks_before (1), num_chunks_after (0), hash_seed (None: rotations from
   the global RNG at every call, as Reformer; an int: from a private generator seeded with it, the
   same rotations at every call and layer, without touching the global RNG).
   Queries and keys are hashed with the same rotations and sorted separately (no shared-QK key
   normalisation, no self mask, scores scaled as the model asks). Sequences no longer than one
   chunk run exact full attention. Causal when the layer is (`is_causal`). The attention mask the
   model hands over must be key padding (+ causal): anything else (sliding windows, packed
   sequences, additive biases) raises a ValueError. Query and key lengths must match: a cached
   decoding step (one query against a longer cache) runs transformers' SDPA instead.
"""

from __future__ import annotations

import importlib
import types
import weakref
from typing import Optional

import torch

from pefops.hf.architectures import architecture_of, model_type_of
from pefops.hf.transaction import transactional
from pefops.nn.lsh_attention import (
    BucketsMismatch,
    check_num_buckets,
    default_num_buckets,
    merge_heads,
    shared_qk_lsh_attention,
    split_heads,
)
from pefops.ops.lsh_attention import lsh_attention_qkv

ATTN_IMPLEMENTATION = "pefops_lsh"


# ---------------------------------------------------------------------------------------------------
# 1. Reformer: patch transformers' LSHSelfAttention in place

def reformer_lsh_forward(self, hidden_states, attention_mask=None, num_hashes=None, buckets=None,
                         past_buckets_states=None, use_cache=False, output_attentions=False, **kwargs):
    """Replacement for transformers' `LSHSelfAttention.forward` (same signature and output)."""
    def transformers_forward():
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, num_hashes=num_hashes,
                                  buckets=buckets, past_buckets_states=past_buckets_states, use_cache=use_cache,
                                  output_attentions=output_attentions, **kwargs)

    decoding_step = past_buckets_states is not None and len(past_buckets_states) > self.layer_idx
    if decoding_step or output_attentions:
        return transformers_forward()
    output_class = importlib.import_module(type(self).__module__).LSHSelfAttentionOutput
    num_hashes = num_hashes if num_hashes is not None else self.num_hashes
    sequence_length = hidden_states.shape[1]
    if sequence_length > self.chunk_length and self.num_buckets is None:
        self._set_num_buckets(sequence_length)  # transformers' own rule, which also writes config.num_buckets
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    query_key = split_heads(self.query_key(hidden_states), heads, head_dim)
    value = split_heads(self.value(hidden_states), heads, head_dim)
    try:
        out, new_buckets = shared_qk_lsh_attention(
            query_key, value, num_hashes=num_hashes,
            num_buckets=self.num_buckets if self.num_buckets is not None else 2,  # unused within one chunk
            chunk_length=self.chunk_length, num_chunks_before=self.num_chunks_before,
            num_chunks_after=self.num_chunks_after, causal=self.is_decoder is True, attention_mask=attention_mask,
            hash_seed=self.hash_seed, dropout_p=self.dropout if self.training else 0.0, buckets=buckets,
            return_buckets=True,
        )
    except BucketsMismatch:
        # a recompute whose reconstructed inputs hash differently (rounding at a bucket boundary):
        # transformers' forward attends with the cached buckets, so it gives the exact result
        return transformers_forward()
    return output_class(hidden_states=merge_heads(out), attention_probs=(), buckets=new_buckets)


def _import_object(reference: str):
    """The object a "<python module>:<name>" reference names (the architecture table's LSH patches)."""
    module_name, name = reference.split(":")
    return getattr(importlib.import_module(module_name), name)


class LSHAttentionHandle:
    """What apply_lsh_attention patched; `.remove()` restores transformers' forwards."""

    def __init__(self, modules):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            if getattr(module, "_pefops_lsh_patched", False):
                del module.forward  # the instance attribute; the class's forward shows through again
                del module._pefops_lsh_patched
        self.modules = []

    def __len__(self):
        return len(self.modules)


@transactional
def apply_lsh_attention(model) -> LSHAttentionHandle:
    """Make every LSH attention layer of a transformers Reformer model run pefops' fused op.
    Returns a handle whose `.remove()` undoes it (as does `remove_lsh_attention(model)`)."""
    try:
        architecture = architecture_of(model, "lsh_patches")
    except ValueError as error:
        raise ValueError(f"{error} (other architectures: attn_implementation={ATTN_IMPLEMENTATION!r}, see "
                         "configure_lsh_attention)") from None
    patched = []
    for patch in architecture.lsh_patches:
        layer_class, forward = _import_object(patch.layer), _import_object(patch.forward)
        for module in model.modules():
            if type(module) is layer_class and not getattr(module, "_pefops_lsh_patched", False):
                module.forward = types.MethodType(forward, module)
                module._pefops_lsh_patched = True
                patched.append(module)
    if not patched and not any(getattr(m, "_pefops_lsh_patched", False) for m in model.modules()):
        raise ValueError(f"no LSH attention layer found in this {model_type_of(model)} model (config.attn_layers has "
                         "no 'lsh'?)")
    return LSHAttentionHandle(patched)


@transactional
def remove_lsh_attention(model) -> int:
    """Restore transformers' forward on every patched layer of `model`; returns how many."""
    modules = [m for m in model.modules() if getattr(m, "_pefops_lsh_patched", False)]
    LSHAttentionHandle(modules).remove()
    return len(modules)


# ---------------------------------------------------------------------------------------------------
# 2. attn_implementation="pefops_lsh" for models on transformers' AttentionInterface

DEFAULT_OPTIONS = dict(num_hashes=4, num_buckets=None, chunk_length=64, num_chunks_before=1, num_chunks_after=0,
                       hash_seed=None)


def _check_options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown pefops_lsh options {sorted(unknown)}; expected some of {sorted(DEFAULT_OPTIONS)}")
    merged = {**DEFAULT_OPTIONS, **options}
    for name in ("num_hashes", "chunk_length"):
        if not isinstance(merged[name], int) or merged[name] < 1:
            raise ValueError(f"pefops_lsh {name} must be a positive int; got {merged[name]!r}")
    for name in ("num_chunks_before", "num_chunks_after"):
        if not isinstance(merged[name], int) or merged[name] < 0:
            raise ValueError(f"pefops_lsh {name} must be an int >= 0; got {merged[name]!r}")
    if merged["num_buckets"] is not None:
        merged["num_buckets"] = check_num_buckets(merged["num_buckets"])
    if merged["hash_seed"] is not None and not isinstance(merged["hash_seed"], int):
        raise ValueError(f"pefops_lsh hash_seed must be an int or None; got {merged['hash_seed']!r}")
    return merged


def _rotations(options, heads, head_dim, num_buckets, device, dtype):
    factors = [num_buckets] if isinstance(num_buckets, int) else num_buckets
    shape = (heads, head_dim, options["num_hashes"], sum(factors) // 2)
    if options["hash_seed"] is None:
        return torch.randn(shape, device=device, dtype=dtype)  # the global RNG, as Reformer
    generator = torch.Generator().manual_seed(options["hash_seed"])  # CPU: the same rotations on every device
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


# The reading of the last mask: transformers builds one mask per forward and hands the same tensor to
# every attention layer, so its validation (host reads: is it key padding? causal? anything padded?)
# runs once per forward, not once per layer; a new mask object or an in-place change (its _version)
# is read again.
_MASK_READING: dict = {}


def key_padding_from_mask(mask: Optional[torch.Tensor], batch: int, q_len: int, k_len: int, causal: bool):
    """Turn the 4-D mask transformers hands to an attention function (bool, True = attend, or additive
    float, 0 = attend) into (key_keep [B, K] bool or None, causal). Raises ValueError when the mask is
    not key padding, optionally combined with the causal mask on positions. The host reads this
    takes happen once per mask object (see _MASK_READING)."""
    if mask is None:
        return None, causal
    key = (mask._version, batch, q_len, k_len, bool(causal))
    cached = _MASK_READING.get("last")
    if cached is not None and cached[0]() is mask and cached[1] == key:
        return cached[2]
    result = _read_mask(mask, batch, q_len, k_len, causal)
    _MASK_READING["last"] = (weakref.ref(mask), key, result)
    return result


def _read_mask(mask: torch.Tensor, batch: int, q_len: int, k_len: int, causal: bool):
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[-2:] != (q_len, k_len):
        raise ValueError(f"pefops_lsh expects a [batch, 1 or heads, {q_len}, {k_len}] attention mask; got "
                         f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        # an additive mask must only hold 0 (attend) or a large negative value (masked), not a bias
        if bool(((~keep) & (mask > -1e3)).any()):
            raise ValueError("pefops_lsh cannot apply an additive attention bias (float mask values other than 0 "
                             "and large negatives); only key padding (+ causal) masks are supported")
    keep = keep.expand(batch, -1, -1, -1)
    positions_q = torch.arange(q_len, device=mask.device)[:, None]
    positions_k = torch.arange(k_len, device=mask.device)[None, :]
    lower = positions_q >= positions_k
    for is_causal in (causal, not causal):
        # the last query row sees every key under the causal mask, any row does without it
        key_keep = keep[:, 0, -1 if is_causal else 0, :]
        expected = key_keep[:, None, None, :] & (lower if is_causal else True)
        if torch.equal(keep, expected.expand_as(keep)):
            return (None if bool(key_keep.all()) else key_keep), is_causal
    raise ValueError("pefops_lsh needs an attention mask that is key padding, optionally with the causal mask; this "
                     "one is neither (sliding window, packed sequences or a custom pattern?): use another "
                     "attn_implementation for it")


# a row whose lse is below half the op's mask value (-1e9; -1e4 for float16) saw masked keys only
_BLIND_LSE = {torch.float32: -5e8, torch.float64: -5e8, torch.bfloat16: -5e8, torch.float16: -5e3}


def lsh_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function (the AttentionInterface signature): query [B, H, Q, D],
    key/value [B, Hkv, K, D] -> (output [B, Q, H, D], None). Options from module.config.pefops_lsh."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    if q_len != k_len:
        # a decoding step against a cache: one chunk of queries, nothing to bucket
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    options = _check_options(dict(getattr(getattr(module, "config", None), "pefops_lsh", None) or {}))
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    key_keep, causal = key_padding_from_mask(attention_mask, batch, q_len, k_len, causal)
    groups = heads // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    chunk_length = options["chunk_length"]
    num_buckets = options["num_buckets"]
    if num_buckets is None:
        max_positions = getattr(getattr(module, "config", None), "max_position_embeddings", 4096) or 4096
        num_buckets = default_num_buckets(max(q_len, 2 * chunk_length), chunk_length, max_positions)
    rotations = None
    if q_len > chunk_length:  # longer sequences are hashed; shorter ones run full attention
        rotations = _rotations(options, heads, head_dim, num_buckets, query.device, query.dtype)
    out, lse_rounds = lsh_attention_qkv(
        query, key, value, num_hashes=options["num_hashes"], num_buckets=num_buckets, chunk_length=chunk_length,
        num_chunks_before=options["num_chunks_before"], num_chunks_after=options["num_chunks_after"], causal=causal,
        attention_mask=key_keep, rotations=rotations, dropout_p=dropout, scale=scaling, return_lse=True,
    )
    # Queries and keys are sorted apart, so a query may find no visible key in its window in any
    # round (all masked: a causal window of future keys only, or padding). Its softmax would then
    # spread over masked keys, in a decoder over future tokens. Such a query attends to its own
    # position instead, as Reformer's self mask makes a query with no other target do.
    blind = lse_rounds.amax(dim=2) < _BLIND_LSE[query.dtype]
    out = torch.where(blind.unsqueeze(-1), value, out)
    return out.transpose(1, 2).contiguous(), None


def register_lsh_attention() -> str:
    """Register "pefops_lsh" with transformers' AttentionInterface (and its mask format: the boolean
    4-D mask SDPA gets). Idempotent; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, lsh_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


@transactional
def configure_lsh_attention(model, *, set_implementation: bool = True, **options):
    """Set model.config.pefops_lsh (options: see the module docstring) and, unless
    set_implementation=False, switch the model to attn_implementation="pefops_lsh". Returns the
    options in force."""
    merged = _check_options(options)
    register_lsh_attention()
    model.config.pefops_lsh = dict(merged)
    if set_implementation:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} cannot switch its attention implementation at run time; load "
                             f"it with attn_implementation={ATTN_IMPLEMENTATION!r} after register_lsh_attention()")
    return merged
