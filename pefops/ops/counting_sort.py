"""Stable sort of LSH bucket ids by a CUDA counting sort (csrc/lsh_sort.cu), with its torch reference.

LSH attention sorts, for every (batch, head), the nh * S offset buckets of all hash rounds
(key = round * num_buckets_total + bucket) stably by key. The keys are small integers
(num_keys = nh * (num_buckets + 1), a few thousand), so a counting sort (histogram, scan, stable
scatter) does it in O(n) work and also writes the inverse permutation in the same pass, where
``torch.argsort(stable=True)`` runs a general radix sort over 64-bit keys and the undo permutation
costs a separate scatter.

Public functions:

* ``lsh_counting_sort(buckets, num_keys, *, check_range=False, with_undo=True) -> (sorted_idx, undo_idx)``: the CUDA
  extension. ``buckets`` is an int64 or int32 CUDA tensor [..., n] (e.g. [B, H, nh * S]) with values
  in [0, num_keys); it sorts along the last dimension. Both results are int64 [..., n] with
  ``sorted_idx == torch.argsort(buckets, dim=-1, stable=True)`` and
  ``undo_idx.gather(-1, sorted_idx) == arange(n)`` (``undo_idx[..., sorted_idx[..., i]] = i``).
  Values outside [0, num_keys) are a caller error; the kernels stay in bounds and sort them after
  every valid key (in order), and ``check_range=True`` raises a ValueError for them instead (costs a
  device synchronisation). Not differentiable (integer outputs).
* ``unavailable_reasons(buckets, num_keys) -> list[str]``: why the extension cannot sort this tensor
  (a CPU tensor, no nvcc / GPU, a build that failed, too many keys for shared memory, too many rows).
  Empty list: ``lsh_counting_sort`` will serve it (after a one-time JIT build of the extension).
  Cheap: no build, no synchronisation. Callers use it to choose between the counting sort and
  ``lsh_counting_sort_ref``.
* ``lsh_counting_sort_ref(buckets, num_keys=None)``: the same results with ``torch.argsort(stable=True)``
  and a scatter, on any device (the fallback and the test oracle).

Limits of the CUDA path: num_keys + 1 int32 counters must fit one block's shared memory (~56k keys on
sm_90, ~41k on sm_80), at most 65535 rows (product of the leading dimensions), n < 2^31.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lsh_counting_sort", "lsh_counting_sort_ref", "unavailable_reasons"]

_MAX_ROWS = 65535  # grid y of the kernels
_MAX_N = 2**31 - 2  # positions are int32 inside the kernels


def _check_inputs(buckets: torch.Tensor, num_keys: int) -> None:
    if not isinstance(buckets, torch.Tensor):
        raise ValueError(f"buckets must be a tensor, got {type(buckets).__name__}")
    if buckets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"buckets must be int64 or int32, got {buckets.dtype}")
    if buckets.dim() < 1:
        raise ValueError("buckets must have at least one dimension [..., n] (the sorted one last)")
    if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
        raise ValueError(f"num_keys must be a positive int (keys lie in [0, num_keys)), got {num_keys!r}")


def unavailable_reasons(buckets: torch.Tensor, num_keys: int) -> list[str]:
    """Why ``lsh_counting_sort`` cannot sort ``buckets`` here; an empty list when it can."""
    reasons: list[str] = []
    try:
        _check_inputs(buckets, num_keys)
    except ValueError as error:
        return [str(error)]
    from pefops import csrc

    reasons += csrc.unavailable_reasons(buckets.device)
    if reasons:
        return reasons
    n = buckets.shape[-1]
    rows = math.prod(buckets.shape[:-1])
    if rows > _MAX_ROWS:
        reasons.append(f"{rows} rows (product of the leading dimensions), the kernel takes at most {_MAX_ROWS}")
    if n > _MAX_N:
        reasons.append(f"rows of {n} elements, the kernel takes at most {_MAX_N}")
    props = torch.cuda.get_device_properties(buckets.device)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if smem is not None and 4 * (num_keys + 1) > smem:
        reasons.append(f"num_keys = {num_keys} needs {4 * (num_keys + 1)} bytes of shared memory per block, "
                       f"{props.name} allows {smem}")
    return reasons


def lsh_counting_sort(buckets: torch.Tensor, num_keys: int, *, check_range: bool = False, with_undo: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stable sort of ``buckets`` [..., n] (int64/int32, CUDA, values in [0, num_keys)) along the
    last dimension by the CUDA counting sort. Returns (sorted_idx, undo_idx), int64 [..., n]:
    ``sorted_idx`` equals ``torch.argsort(buckets, dim=-1, stable=True)`` and ``undo_idx`` is its
    inverse (``undo_idx[..., sorted_idx[..., i]] = i``). Raises RuntimeError listing the reasons when
    the extension cannot serve (see ``unavailable_reasons``), ValueError for bad arguments, and, with
    ``check_range``, for values outside [0, num_keys). ``with_undo=False``: undo_idx is None, and the
    kernel neither allocates nor writes it (8 of the ~48 bytes per element; LSH attention needs only
    sorted_idx).
    """
    _check_inputs(buckets, num_keys)
    reasons = unavailable_reasons(buckets, num_keys)
    if reasons:
        raise RuntimeError("lsh_counting_sort (CUDA extension) cannot sort this tensor: " + "; ".join(reasons))
    if check_range and buckets.numel():
        low, high = int(buckets.min()), int(buckets.max())
        if low < 0 or high >= num_keys:
            raise ValueError(f"buckets hold values in [{low}, {high}], expected all in [0, {num_keys})")
    from pefops import csrc

    shape = buckets.shape
    rows = buckets.reshape(math.prod(shape[:-1]), shape[-1]).contiguous()  # [rows, n]
    sorted_idx, undo_idx = csrc.load().lsh_counting_sort(rows, int(num_keys), bool(with_undo))
    return sorted_idx.view(shape), (undo_idx.view(shape) if with_undo else None)


def lsh_counting_sort_ref(buckets: torch.Tensor, num_keys: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``torch.argsort(stable=True)`` along the last dimension and the inverse by a scatter
    (the same results as ``lsh_counting_sort`` for keys in range; any device). ``num_keys`` is unused
    (accepted for a common signature)."""
    if buckets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"buckets must be int64 or int32, got {buckets.dtype}")
    sorted_idx = torch.argsort(buckets, dim=-1, stable=True)
    positions = torch.arange(buckets.shape[-1], device=buckets.device).expand_as(sorted_idx)
    undo_idx = torch.empty_like(sorted_idx).scatter_(-1, sorted_idx, positions)
    return sorted_idx, undo_idx
