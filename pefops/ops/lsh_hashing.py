"""LSH hashing and sorting for Reformer attention (pefops.ops.lsh_attention), as transformers does it.

transformers' LSHSelfAttention (models/reformer/modeling_reformer.py, `_hash_vectors`,
`_get_sorted_bucket_idx_and_undo_sorted_bucket_idx`):

  rotations  randn(heads, head_dim, num_hashes, sum(factors) // 2), after torch.manual_seed(hash_seed)
             when a seed is set (the global generator is reseeded, as transformers does)
  rotated    einsum("bmtd,mdhr->bmhtr", vectors, rotations)          [B, H, nh, S, R/2]
  bucket     argmax([xR, -xR]) per factor (first index on ties), factors combined mixed-radix
             (bucket = b0 + f0 * b1 + f0 * f1 * b2 ...)
  padding    when any attention_mask entry is 0, padded tokens get the extra bucket `num_buckets`
             and every round spans num_buckets + 1 buckets
  offsets    round r adds r * (buckets per round); the rounds are concatenated: [B, H, nh * S]
  sort       stable over the nh * S offset buckets (round, bucket, position), per (batch, head)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from pefops.ops import counting_sort
from pefops.ops.lsh_rounds import bucket_ids

BucketSpec = Union[int, Sequence[int]]


def bucket_factors(num_buckets: BucketSpec) -> list[int]:
    """num_buckets as a list of factors ([n] for an int); ValueError unless every factor is even
    and positive (argmax over [xR, -xR] gives an even number of buckets per factor)."""
    if isinstance(num_buckets, bool):
        raise ValueError(f"num_buckets must be an even int or a list of even ints; got {num_buckets!r}")
    if isinstance(num_buckets, int):
        factors = [num_buckets]
    elif isinstance(num_buckets, (list, tuple)) and num_buckets and all(
            isinstance(f, int) and not isinstance(f, bool) for f in num_buckets):
        factors = list(num_buckets)
    else:
        raise ValueError(f"num_buckets must be an even int or a non-empty list of even ints; got {num_buckets!r}")
    for factor in factors:
        if factor < 2 or factor % 2:
            what = "num_buckets" if isinstance(num_buckets, int) else f"every factor of num_buckets {factors}"
            raise ValueError(f"{what} must be even and >= 2 (buckets come in +/- pairs); got {factor}")
    return factors


def lsh_rotations(num_heads: int, head_dim: int, num_hashes: int, num_buckets: BucketSpec, *,
                  hash_seed: Optional[int] = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Random rotations [heads, head_dim, num_hashes, sum(factors) // 2] drawn as transformers draws
    them: torch.manual_seed(hash_seed) first when hash_seed is set, then one torch.randn."""
    factors = bucket_factors(num_buckets)
    if hash_seed is not None:
        torch.manual_seed(hash_seed)
    shape = (num_heads, head_dim, num_hashes, sum(factors) // 2)
    return torch.randn(shape, device=device, dtype=dtype)


def _padding_keep(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if attention_mask is None else attention_mask.to(torch.bool)


def lsh_hash(vectors: torch.Tensor, rotations: torch.Tensor, num_buckets: BucketSpec,
             attention_mask: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """Offset bucket ids int64 [B, H, nh * S] of vectors [B, H, S, D] (no gradient), exactly as
    transformers' `_hash_vectors`; attention_mask [B, S] (0 = padding) or None.

    The argmax / mixed radix / padding / offsets step runs on the selected backend
    (pefops.ops.lsh_rounds.bucket_ids: torch, or the Triton kernel on CUDA tensors)."""
    factors = bucket_factors(num_buckets)
    batch, heads, seq, dim = vectors.shape
    if rotations.dim() != 4 or rotations.shape[0] != heads or rotations.shape[1] != dim \
            or rotations.shape[3] != sum(factors) // 2:
        raise ValueError(f"rotations must have shape [heads={heads}, head_dim={dim}, num_hashes, "
                         f"{sum(factors) // 2}] (sum of bucket factors / 2); got {tuple(rotations.shape)}")
    # the same einsum as transformers, so that argmax ties resolve bit for bit alike
    rotated = torch.einsum("bmtd,mdhr->bmhtr", vectors.detach(), rotations)
    return bucket_ids(rotated, factors, _padding_keep(attention_mask), backend)


def stable_sort_indices(offset_buckets: torch.Tensor, num_keys: Optional[int] = None) -> torch.Tensor:
    """lsh_sort's sorted_idx alone (what lsh_attention needs): no undo index is made. With num_keys,
    CUDA tensors use the counting sort (without its inverse permutation) where it serves them;
    torch.sort otherwise."""
    if offset_buckets.is_cuda and num_keys is not None and not torch.compiler.is_compiling():
        if not counting_sort.unavailable_reasons(offset_buckets, num_keys):
            try:
                return counting_sort.lsh_counting_sort(offset_buckets.contiguous(), num_keys, with_undo=False)[0]
            except RuntimeError:
                pass  # the first JIT build failed (remembered: later calls skip it); torch sorts instead
    return torch.sort(offset_buckets, dim=-1, stable=True).indices


def lsh_sort(offset_buckets: torch.Tensor, num_keys: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_idx, undo_idx) int64 [B, H, N] of offset buckets [B, H, N]: the stable sort by
    (bucket, index), which is transformers' `_stable_argsort` (its keys bucket * N + index are
    unique, so its order is exactly the stable order); undo_idx[sorted_idx[i]] = i.

    num_keys (an upper bound of the ids, e.g. num_hashes * (num_buckets + 1)) lets CUDA tensors use
    the counting sort of pefops.ops.counting_sort (csrc) when it can serve them; torch.sort otherwise."""
    if offset_buckets.is_cuda and num_keys is not None and not torch.compiler.is_compiling():
        if not counting_sort.unavailable_reasons(offset_buckets, num_keys):
            try:
                return counting_sort.lsh_counting_sort(offset_buckets.contiguous(), num_keys)
            except RuntimeError:
                pass  # the first JIT build failed (remembered: later calls skip it); torch sorts instead
    sorted_idx = stable_sort_indices(offset_buckets)
    positions = torch.arange(sorted_idx.shape[-1], device=sorted_idx.device).expand_as(sorted_idx)
    undo_idx = torch.empty_like(sorted_idx).scatter_(-1, sorted_idx, positions)
    return sorted_idx, undo_idx
