"""LSH self-attention (Reformer, Kitaev et al., ICLR 2020) as a drop-in module on pefops.ops.lsh_attention.

`LSHSelfAttention` has transformers' parameter names (`query_key`, `value`; both without bias) so a
transformers `LSHSelfAttention` state dict loads into it. Like transformers' layer it stops at the
merged heads: the output projection lives outside (transformers' `ReformerSelfOutput.dense`).

Random rotations are drawn exactly where and how transformers draws them: from the global RNG, with
`torch.randn(heads, head_dim, num_hashes, sum(bucket factors) // 2)` in the dtype of the shared
query/key vectors, right after `torch.manual_seed(hash_seed)` when a hash seed is set, and only when
the sequence is longer than one chunk. Reformer's reversible backward re-seeds the global RNG before
recomputing a layer and hands back the buckets of its forward pass; like transformers, the recompute
then draws nothing from the global RNG (so dropout masks match transformers' too): it redraws the
forward's rotations under a forked RNG, checks that they give those buckets again, and attends with
them.

`shared_qk_lsh_attention` is the functional form used by both this module and
`pefops.hf.apply_lsh_attention` (which patches transformers' own layers).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from pefops.ops.lsh_attention import lsh_attention, lsh_hash, lsh_rotations
from pefops.ops.lsh_hashing import bucket_factors

NumBuckets = Union[int, Sequence[int]]


def check_num_buckets(num_buckets: NumBuckets) -> NumBuckets:
    """An even int, or a list of even ints (factorised buckets, combined mixed-radix); ValueError
    otherwise. Returns it as transformers stores it (a tuple becomes a list)."""
    factors = bucket_factors(num_buckets)
    return num_buckets if isinstance(num_buckets, int) else factors


def default_num_buckets(sequence_length: int, chunk_length: int, max_position_embeddings: int) -> NumBuckets:
    """transformers' `LSHSelfAttention._set_num_buckets` rule (used when num_buckets is None): about
    2 * sequence_length / chunk_length, rounded down to a power of two, factorised in two when it
    exceeds 2 * max(sqrt(max_position_embeddings / chunk_length), chunk_length)."""
    power = (2 * (sequence_length // chunk_length)).bit_length() - 1
    num_buckets = 2**power
    limit = 2 * max(int((max_position_embeddings // chunk_length) ** 0.5), chunk_length)
    if num_buckets > limit:
        return [2 ** (power // 2), 2 ** (power - power // 2)]
    return num_buckets


def split_heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]"""
    return x.view(*x.shape[:2], num_heads, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class BucketsMismatch(RuntimeError):
    """Raised by shared_qk_lsh_attention when the given buckets do not come from the redrawn rotations
    on these inputs (the op takes rotations, not buckets): the caller falls back to an
    implementation that takes buckets."""


def _redraw_rotations(heads, head_dim, num_hashes, num_buckets, hash_seed, device, dtype):
    """The rotations the forward drew, drawn again without moving the global RNG: Reformer's
    backward recompute re-seeds the RNG to the state of the forward before calling the layer, and
    transformers' recompute draws nothing (it reuses the buckets), so neither may we."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return lsh_rotations(heads, head_dim, num_hashes, num_buckets, hash_seed=hash_seed, device=device, dtype=dtype)


def shared_qk_lsh_attention(
    query_key: torch.Tensor,
    value: torch.Tensor,
    *,
    num_hashes: int,
    num_buckets: NumBuckets,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    attention_mask: Optional[torch.Tensor],
    hash_seed: Optional[int],
    dropout_p: float,
    buckets: Optional[torch.Tensor] = None,
    return_buckets: bool = False,
):
    """Shared-QK LSH attention on per-head vectors query_key, value [B, H, S, D] (already projected).

    Without `buckets`: draws the rotations as transformers does (see the module docstring). With
    `buckets` ([B, H, num_hashes, S] or flat, from the forward pass of Reformer's reversible
    backward recompute): leaves the global RNG where it is, redraws the forward's rotations under a
    forked RNG and attends with exactly those buckets (BucketsMismatch if the rotations do not give
    them on these inputs). Returns (out [B, H, S, D], buckets [B, H, num_hashes, S]
    when return_buckets, else None; None too when the sequence fits in one chunk: no hashing then)."""
    batch, heads, seq, head_dim = query_key.shape
    options = dict(
        num_hashes=num_hashes, num_buckets=num_buckets, chunk_length=chunk_length,
        num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after, causal=causal,
        attention_mask=attention_mask, dropout_p=dropout_p,
    )
    if seq <= chunk_length:
        # full attention, no hashing: transformers draws no rotations here, and neither do we
        return lsh_attention(query_key, value, **options), buckets
    if buckets is None:
        rotations = lsh_rotations(heads, head_dim, num_hashes, num_buckets, hash_seed=hash_seed,
                                  device=query_key.device, dtype=query_key.dtype)
        out = lsh_attention(query_key, value, rotations=rotations, **options)
        if not return_buckets:
            return out, None
        # the op hashed internally; hash again (cheap next to the attention) to hand the buckets out
        flat = lsh_hash(query_key.detach(), rotations, num_buckets, attention_mask)
        return out, flat.view(batch, heads, num_hashes, seq)
    flat = buckets.reshape(batch, heads, -1)
    if flat.shape[-1] != num_hashes * seq:
        raise ValueError(f"buckets must hold num_hashes * seq = {num_hashes * seq} entries per (batch, head); got "
                         f"{flat.shape[-1]}")
    # Redraw the forward's rotations and check that they give these buckets again: the recompute's
    # inputs are reconstructed by the reversible network, equal up to rounding.
    rotations = _redraw_rotations(heads, head_dim, num_hashes, num_buckets, hash_seed, query_key.device,
                                  query_key.dtype)
    if not torch.equal(lsh_hash(query_key.detach(), rotations, num_buckets, attention_mask), flat):
        raise BucketsMismatch("the given buckets do not come from this layer's rotations on these inputs")
    out = lsh_attention(query_key, value, rotations=rotations, **options)
    return out, (flat.view(batch, heads, num_hashes, seq) if return_buckets else None)


class LSHSelfAttention(nn.Module):
    """Reformer's shared-QK LSH self-attention: forward(hidden_states [B, S, hidden_size],
    attention_mask [B, S] of 1 (keep) / 0 (padding) or None) -> [B, S, num_heads * head_dim].

    Outputs, gradients and random-number use equal transformers' `LSHSelfAttention` with the same
    configuration (`from_transformers(layer)` copies one). Sequences that are not a multiple of
    chunk_length are padded by the op (zeros, masked out); transformers' layer requires the multiple
    and ReformerModel pads the input itself. num_buckets=None picks transformers' automatic value
    (see default_num_buckets) on the first sequence longer than one chunk and keeps it, as
    transformers does.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_hashes: int,
                 num_buckets: Optional[NumBuckets], chunk_length: int, num_chunks_before: int = 1,
                 num_chunks_after: int = 0, causal: bool = False, hash_seed: Optional[int] = None,
                 dropout: float = 0.0, *, max_position_embeddings: int = 4096):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim),
                            ("num_hashes", num_hashes), ("chunk_length", chunk_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for name, value in (("num_chunks_before", num_chunks_before), ("num_chunks_after", num_chunks_after)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_hashes = num_hashes
        self.num_buckets = None if num_buckets is None else check_num_buckets(num_buckets)
        self.chunk_length = chunk_length
        self.num_chunks_before = num_chunks_before
        self.num_chunks_after = num_chunks_after
        self.causal = causal
        self.hash_seed = hash_seed
        self.dropout = dropout
        self.max_position_embeddings = max_position_embeddings
        # transformers' names and layout: [heads * head_dim, hidden], no bias
        self.query_key = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * head_dim, bias=False)

    @classmethod
    def from_transformers(cls, layer: nn.Module) -> "LSHSelfAttention":
        """A copy of a transformers `LSHSelfAttention` (configuration and weights, same device/dtype)."""
        module = cls(
            hidden_size=layer.hidden_size, num_heads=layer.num_attention_heads, head_dim=layer.attention_head_size,
            num_hashes=layer.num_hashes, num_buckets=layer.num_buckets, chunk_length=layer.chunk_length,
            num_chunks_before=layer.num_chunks_before, num_chunks_after=layer.num_chunks_after,
            causal=bool(layer.is_decoder), hash_seed=layer.hash_seed, dropout=layer.dropout,
            max_position_embeddings=layer.max_position_embeddings,
        )
        weight = layer.query_key.weight
        module.to(device=weight.device, dtype=weight.dtype)
        module.load_state_dict(layer.state_dict())
        return module

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [batch, seq, hidden_size={self.hidden_size}]; got {tuple(hidden_states.shape)}"
            )
        batch, seq = hidden_states.shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask must be [batch, seq] = {(batch, seq)}; got {tuple(attention_mask.shape)}")
        if self.num_buckets is None and seq > self.chunk_length:
            self.num_buckets = default_num_buckets(seq, self.chunk_length, self.max_position_embeddings)
        query_key = split_heads(self.query_key(hidden_states), self.num_heads, self.head_dim)
        value = split_heads(self.value(hidden_states), self.num_heads, self.head_dim)
        out, _ = shared_qk_lsh_attention(
            query_key, value, num_hashes=self.num_hashes, num_buckets=self.num_buckets or 2,
            chunk_length=self.chunk_length, num_chunks_before=self.num_chunks_before,
            num_chunks_after=self.num_chunks_after, causal=self.causal, attention_mask=attention_mask,
            hash_seed=self.hash_seed, dropout_p=self.dropout if self.training else 0.0,
        )
        return merge_heads(out)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_hashes={self.num_hashes}, num_buckets={self.num_buckets}, chunk_length={self.chunk_length}, "
            f"num_chunks_before={self.num_chunks_before}, num_chunks_after={self.num_chunks_after}, "
            f"causal={self.causal}, hash_seed={self.hash_seed}, dropout={self.dropout}"
        )
