"""lsh_attention_ref: transformers' LSHSelfAttention attention math, transcribed step by step.

The oracle of pefops.ops.lsh_attention: the same gathers by expansion, `_look_adjacent` chunk
concatenation, materialised masks, logsumexp, reverse sort and round combine as
transformers/models/reformer/modeling_reformer.py, in the input dtype (as transformers computes),
plain autograd. Slow and memory hungry on purpose: it is what the fused paths are measured against.
"""

from __future__ import annotations

import math

import torch

from pefops.ops.lsh_hashing import lsh_hash, lsh_rotations


def mask_constants(dtype: torch.dtype) -> tuple[float, float]:
    """(mask_value, self_mask_value) of transformers' LSHSelfAttention for scores of `dtype`."""
    return (-1e4, -1e3) if dtype == torch.float16 else (-1e9, -1e5)


def len_and_dim_norm(vectors: torch.Tensor) -> torch.Tensor:
    """Keys of shared-QK attention: x * rsqrt(mean(x^2) + 1e-6) / sqrt(head_dim)."""
    variance = torch.mean(vectors**2, -1, keepdim=True)
    return vectors * torch.rsqrt(variance + 1e-6) / math.sqrt(vectors.shape[-1])


def _look_adjacent(vectors, before, after):
    # [B, H, chunks, L, ...] -> [B, H, chunks, (before + 1 + after) * L, ...], wrapping around
    if before == 0 and after == 0:
        return vectors
    slices = []
    for i in range(-before, after + 1):
        slices.append(vectors if i == 0 else torch.cat([vectors[:, :, i:], vectors[:, :, :i]], dim=2))
    return torch.cat(slices, dim=3)


def _attend(query, key, value, query_pos, key_pos, attention_mask, causal, self_mask, scale, chunked):
    """Scores, masks (padding of keys, causal, then the self mask), logsumexp, probs @ value."""
    dots = torch.matmul(query, key.transpose(-1, -2))
    if scale != 1.0:
        dots = dots * scale
    mask_value, self_mask_value = mask_constants(dots.dtype)
    mask = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)[:, None, :]
        if chunked:
            keep = keep[:, None, :].expand(query_pos.shape[:-1] + (-1,))
            keep = torch.gather(keep, -1, key_pos)
        mask = keep.unsqueeze(-2).expand(dots.shape)
    if causal:
        causal_mask = torch.ge(query_pos.unsqueeze(-1), key_pos.unsqueeze(-2))
        mask = causal_mask if mask is None else causal_mask * mask
    if mask is not None:
        dots = torch.where(mask, dots, torch.tensor(mask_value, dtype=dots.dtype))
    if self_mask:
        not_self = torch.ne(query_pos.unsqueeze(-1), key_pos.unsqueeze(-2))
        dots = torch.where(not_self, dots, torch.tensor(self_mask_value, dtype=dots.dtype))
    logits = torch.logsumexp(dots, dim=-1, keepdim=True)
    return torch.exp(dots - logits), logits


def _pad(tensor, length, value=0):
    extra = length - tensor.shape[-2 if tensor.dim() == 4 else -1]
    if tensor.dim() == 4:
        return torch.nn.functional.pad(tensor, (0, 0, 0, extra), value=value)
    return torch.nn.functional.pad(tensor, (0, extra), value=value)


def lsh_attention_ref(qk, v, *, num_hashes, num_buckets, chunk_length, num_chunks_before=1, num_chunks_after=0,
                      causal=False, attention_mask=None, rotations=None, hash_seed=None, dropout_p=0.0,
                      return_lse=False, k=None, scale=None):
    """The transformers computation of pefops.ops.lsh_attention (same arguments). With `k` given,
    the separate-q/k variant of lsh_attention_qkv (q = qk): no key normalisation, scores * scale
    (default 1/sqrt(D)), no self mask, q and k hashed with the same rotations and sorted apart."""
    batch, heads, seq, dim = qk.shape
    shared = k is None
    if scale is None:
        scale = 1.0 if shared else 1.0 / math.sqrt(dim)
    if seq > chunk_length and seq % chunk_length:
        # as ReformerModel pads: zeros (here) and attention mask 0 up to a multiple of the chunk
        padded = (seq + chunk_length - 1) // chunk_length * chunk_length
        mask = torch.ones(batch, seq, dtype=torch.long, device=qk.device) if attention_mask is None else attention_mask
        out = lsh_attention_ref(_pad(qk, padded), _pad(v, padded), num_hashes=num_hashes, num_buckets=num_buckets,
                                chunk_length=chunk_length, num_chunks_before=num_chunks_before,
                                num_chunks_after=num_chunks_after, causal=causal, attention_mask=_pad(mask, padded),
                                rotations=rotations, hash_seed=hash_seed, dropout_p=dropout_p,
                                return_lse=return_lse, k=None if shared else _pad(k, padded), scale=scale)
        if return_lse:
            return out[0][:, :, :seq], out[1][..., :seq]
        return out[:, :, :seq]
    key_source = qk if shared else k
    if seq <= chunk_length:
        positions = torch.arange(seq, device=qk.device).repeat(batch, heads, 1)
        key = len_and_dim_norm(key_source) if shared else key_source
        probs, logits = _attend(qk, key, v, positions, positions, attention_mask, causal, shared, scale, False)
        probs = torch.nn.functional.dropout(probs, p=dropout_p) if dropout_p else probs
        out = torch.matmul(probs, v)
        return (out, logits.squeeze(-1).unsqueeze(2).float()) if return_lse else out

    if rotations is None:
        rotations = lsh_rotations(heads, dim, num_hashes, num_buckets, hash_seed=hash_seed, device=qk.device,
                                  dtype=qk.dtype)

    def sort(vectors):
        buckets = lsh_hash(vectors, rotations, num_buckets, attention_mask)
        length = buckets.shape[-1]
        # transformers' _stable_argsort: unique keys bucket * length + index
        scaled = length * buckets + torch.arange(length, device=buckets.device).view(1, 1, -1)
        sorted_idx = torch.argsort(scaled, dim=-1)
        undo = torch.empty_like(sorted_idx).scatter_(
            -1, sorted_idx, torch.arange(length, device=buckets.device).view(1, 1, -1).expand_as(sorted_idx))
        return sorted_idx, undo

    def gather_by_expansion(vectors, idxs):
        expanded = idxs.unsqueeze(-1).expand(-1, -1, -1, vectors.shape[-1])
        return torch.gather(vectors.repeat(1, 1, num_hashes, 1), 2, expanded)

    def chunks(tensor):
        return tensor.reshape(batch, heads, -1, chunk_length, *tensor.shape[3:])

    q_sorted, q_undo = sort(qk)
    k_sorted, _ = (q_sorted, q_undo) if shared else sort(k)
    q_pos, k_pos = q_sorted % seq, k_sorted % seq
    query = chunks(gather_by_expansion(qk, q_pos))
    key = chunks(gather_by_expansion(key_source, k_pos))
    value = chunks(gather_by_expansion(v, k_pos))
    if shared:
        key = len_and_dim_norm(key)
    key = _look_adjacent(key, num_chunks_before, num_chunks_after)
    value = _look_adjacent(value, num_chunks_before, num_chunks_after)
    query_pos = chunks(q_pos)
    key_pos = _look_adjacent(chunks(k_pos), num_chunks_before, num_chunks_after)
    probs, logits = _attend(query, key, value, query_pos, key_pos, attention_mask, causal, shared, scale, True)
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, value).flatten(2, 3)
    logits = logits.flatten(2, 3).squeeze(-1)
    # reverse sort, then split the rounds
    out = torch.gather(out, 2, q_undo.unsqueeze(-1).expand(out.shape))
    logits = torch.gather(logits, 2, q_undo)
    out = out.reshape(batch, heads, num_hashes, seq, v.shape[-1])
    logits = logits.reshape(batch, heads, num_hashes, seq, 1)
    if num_hashes > 1:
        weights = torch.exp(logits - torch.logsumexp(logits, dim=2, keepdim=True))
        combined = torch.sum(out * weights, dim=2)
    else:
        combined = out[:, :, 0]
    return (combined, logits.squeeze(-1).float()) if return_lse else combined
