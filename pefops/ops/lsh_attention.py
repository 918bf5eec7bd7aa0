"""LSH bucketed attention (Reformer, Kitaev et al. ICLR 2020), exactly transformers' LSHSelfAttention.

    out = lsh_attention(qk, v, num_hashes=4, num_buckets=32, chunk_length=64, causal=True)

qk, v: [B, H, S, D] (shared query/key projection and value projection per head). The call
  1. pads S to a multiple of chunk_length with zeros and attention mask 0 (as ReformerModel does),
     unless S <= chunk_length, which takes the full-attention path (no hashing, one "round");
  2. hashes qk with random rotations into buckets (pefops.ops.lsh_hashing, no gradient) and sorts
     the nh * S (round, bucket, position) entries stably;
  3. runs the chunked-attention core: sorted queries in chunks of chunk_length attend to their chunk
     and num_chunks_before / num_chunks_after neighbours (wrapping around over all nh * S / L chunks,
     across round boundaries; a step as many chunks away as there are chunks, or more, is the
     query's own chunk, as transformers' _look_adjacent builds the window); keys are `len_and_dim_norm(qk)`; masked scores (padding of the key,
     causal on original positions) := mask_value, then the self mask q_pos == k_pos :=
     self_mask_value; constants (-1e4, -1e3) for fp16 inputs, (-1e9, -1e5) otherwise;
  4. combines the rounds: out = sum_r softmax_r(lse_r) * out_r (the gradient flows through lse).
Step 1 and the key normalisation are plain differentiable torch; the bucket ids of step 2 and the
combine of step 4 have torch and Triton backends (pefops/ops/lsh_rounds.py); step 3 is a
torch.library custom op with a backend per device (so the gradient of qk arrives through both its
roles, query and key). lsh_attention_qkv is the variant with separate q and k (for attention
interfaces of other architectures): q and k hashed with the same rotations, sorted apart, no key
normalisation, scores * scale, no self mask.

Backends of the core (pefops.backend):
  torch   pefops/ops/lsh_chunked.py, vectorised: one gather each of the sorted queries, keys and
          values (windows are overlapping strided views), batched matmuls over all chunks of all
          rounds, masks from positions by broadcasting, the self mask written sparsely, in-place
          softmax, no index_add_. Eager autograd calls save the probabilities (no recomputation);
          the custom-op backward recomputes them. Serves dropout through the eager autograd function
          only (torch's dropout mask cannot be redrawn by the custom op's backward).
  triton  kernels/lsh_attention.py (fused, rows gathered inside the kernel, recomputing backward).
          Dropout in the kernels: a Philox keep mask from a seed drawn from torch's default
          generator (torch.manual_seed makes runs reproducible) as an int64 CPU tensor passed
          through the custom ops (graph-safe under torch.compile), redrawn by the backward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pefops import backend as backends
from pefops.ops.common import FLOAT_DTYPES, check_float_dtype, check_like, describe, once_differentiable
from pefops.ops.lsh_hashing import bucket_factors, lsh_hash, lsh_rotations, lsh_sort, stable_sort_indices
from pefops.ops.lsh_chunked import EagerChunkedAttention, chunked_backward_torch, chunked_forward_torch
from pefops.ops.lsh_rounds import combine_rounds
from pefops.ops.lsh_reference import len_and_dim_norm, lsh_attention_ref, mask_constants

OP = "lsh_attention"

__all__ = ["lsh_rotations", "lsh_hash", "lsh_sort", "lsh_attention", "lsh_attention_qkv", "lsh_attention_ref"]


# ------------------------------------------------------------------------------------ custom ops


def _problem(q, v, mode, dropout_p=0.0):
    return backends.Problem(device=q.device, dtype=q.dtype, mode=mode, sizes={
        "head_dim": q.shape[-1], "value_dim": v.shape[-1], "dropout": int(dropout_p > 0.0)})


def _config_kwargs(chunk_length, chunks_before, chunks_after, causal, self_mask, scale, mask_value, self_mask_value):
    return dict(chunk_length=chunk_length, chunks_before=chunks_before, chunks_after=chunks_after, causal=causal,
                self_mask=self_mask, scale=scale, mask_value=mask_value, self_mask_value=self_mask_value)


@torch.library.custom_op("pefops::lsh_chunked_fwd", mutates_args=())
def _lsh_chunked_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                     key_mask: Optional[torch.Tensor], chunk_length: int, chunks_before: int, chunks_after: int,
                     causal: bool, self_mask: bool, scale: float, mask_value: float, self_mask_value: float,
                     dropout_p: float, seed: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # seed: None without dropout, else an int64 CPU tensor [1] (a tensor, not an int, so torch.compile
    # traces its drawing instead of breaking the graph on .item())
    implementation = backends.select(OP, _problem(q, v, "forward", dropout_p), backend or None)
    out_rounds, lse_rounds = implementation.functions["forward"](
        q, k, v, q_idx, k_idx, key_mask, dropout_p=dropout_p, seed=seed,
        **_config_kwargs(chunk_length, chunks_before, chunks_after, causal, self_mask, scale, mask_value,
                         self_mask_value))
    return out_rounds.to(v.dtype), lse_rounds.to(_lse_dtype(q))


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_lsh_chunked_fwd.register_fake
def _(q, k, v, q_idx, k_idx, key_mask, chunk_length, chunks_before, chunks_after, causal, self_mask, scale,
      mask_value, self_mask_value, dropout_p, seed, backend):
    batch, heads, seq = q.shape[:3]
    rounds = q_idx.shape[-1] // seq
    return (v.new_empty((batch, heads, rounds, seq, v.shape[-1])),
            q.new_empty((batch, heads, rounds, seq), dtype=_lse_dtype(q)))


@torch.library.custom_op("pefops::lsh_chunked_bwd", mutates_args=())
def _lsh_chunked_bwd(grad_out_rounds: torch.Tensor, grad_lse_rounds: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, key_mask: Optional[torch.Tensor],
                     out_rounds: torch.Tensor, lse_rounds: torch.Tensor, chunk_length: int, chunks_before: int,
                     chunks_after: int, causal: bool, self_mask: bool, scale: float, mask_value: float,
                     self_mask_value: float, dropout_p: float, seed: Optional[torch.Tensor],
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    implementation = backends.select(OP, _problem(q, v, "backward", dropout_p), backend or None)
    grads = implementation.functions["backward"](
        grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, lse_rounds,
        dropout_p=dropout_p, seed=seed, **_config_kwargs(chunk_length, chunks_before, chunks_after, causal, self_mask,
                                                         scale, mask_value, self_mask_value))
    return tuple(grad.to(like.dtype).reshape(like.shape) for grad, like in zip(grads, (q, k, v)))


@_lsh_chunked_bwd.register_fake
def _(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, lse_rounds, chunk_length,
      chunks_before, chunks_after, causal, self_mask, scale, mask_value, self_mask_value, dropout_p, seed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, q_idx, k_idx, key_mask = inputs[:6]
    config, (dropout_p, seed, backend) = inputs[6:14], inputs[14:]
    ctx.save_for_backward(q, k, v, q_idx, k_idx, key_mask, seed, *output)
    ctx.config = (*config, dropout_p)
    ctx.backend = backend


@once_differentiable("lsh_attention")
def _backward(ctx, grad_out_rounds, grad_lse_rounds):
    q, k, v, q_idx, k_idx, key_mask, seed, out_rounds, lse_rounds = ctx.saved_tensors
    if grad_lse_rounds is None:
        grad_lse_rounds = torch.zeros_like(lse_rounds)
    dq, dk, dv = _lsh_chunked_bwd(grad_out_rounds.contiguous(), grad_lse_rounds.contiguous(), q, k, v, q_idx, k_idx,
                                  key_mask, out_rounds, lse_rounds, *ctx.config, seed, ctx.backend)
    return (dq, dk, dv) + (None,) * 14


_lsh_chunked_fwd.register_autograd(_backward, setup_context=_setup_context)


def _chunked_attention(q, k, v, q_idx, k_idx, key_mask, config, dropout_p, backend):
    """The core through the eager autograd function (automatic torch choice, torch's dropout) or
    the custom op (compiled graphs, forced or non-torch backends, the kernels' dropout)."""
    if dropout_p > 0.0:
        if backends.select(OP, _problem(q, v, "forward", dropout_p), backend).backend == "torch":
            # torch's dropout mask cannot be redrawn by the custom op's backward: plain autograd serves it
            return EagerChunkedAttention.apply(q, k, v, q_idx, k_idx, key_mask, config, dropout_p)
        # the kernels redraw their mask from this seed in the backward; drawn from torch's default CPU
        # generator, so torch.manual_seed makes a run reproducible
        seed = torch.randint(2**31 - 1, (1,), dtype=torch.int64)
        return _lsh_chunked_fwd(q, k, v, q_idx, k_idx, key_mask, *config, dropout_p, seed, backend or "")
    if backends.eager_torch(OP, _problem(q, v, "forward"), backend):
        return EagerChunkedAttention.apply(q, k, v, q_idx, k_idx, key_mask, config, 0.0)
    return _lsh_chunked_fwd(q, k, v, q_idx, k_idx, key_mask, *config, 0.0, None, backend or "")


# ------------------------------------------------------------------------------------ validation


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_inputs(names, tensors, v, *, num_hashes, num_buckets, chunk_length, num_chunks_before, num_chunks_after,
                  attention_mask, rotations, dropout_p):
    """ValueError (what was wrong, what was expected) for every malformed argument."""
    first = tensors[0]
    for name, tensor in zip(names + ("v",), tensors + (v,)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a tensor [batch, heads, seq, head_dim]; got {describe(tensor)}")
        check_float_dtype(name, tensor.dtype)
        check_like(name, tensor, names[0], first)
        if tuple(tensor.shape[:3]) != tuple(first.shape[:3]):
            raise ValueError(f"{name} must have [batch, heads, seq] = {tuple(first.shape[:3])} like {names[0]}; "
                             f"got {tuple(tensor.shape)}")
        if tensor.shape[3] != first.shape[3]:
            raise ValueError(f"head_dim mismatch: {name} has head_dim {tensor.shape[3]} but {names[0]} has "
                             f"{first.shape[3]} (LSHSelfAttention uses one attention_head_size)")
    batch, heads, seq, dim = first.shape
    if dim == 0:
        raise ValueError(f"head_dim must be >= 1: LSH hashing rotates the head vectors and a 0-dim vector has no "
                         f"bucket; got {names[0]} of shape {tuple(first.shape)}")
    _check_int("num_hashes", num_hashes, 1)
    _check_int("chunk_length", chunk_length, 1)
    _check_int("num_chunks_before", num_chunks_before, 0)
    _check_int("num_chunks_after", num_chunks_after, 0)
    factors = bucket_factors(num_buckets)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask must be a tensor [batch, seq] = {(batch, seq)} (1 = token, "
                             f"0 = padding); got {describe(attention_mask)}")
        if attention_mask.device != first.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, the inputs on {first.device}")
    if rotations is not None:
        expected = (heads, dim, num_hashes, sum(factors) // 2)
        if not isinstance(rotations, torch.Tensor) or tuple(rotations.shape) != expected:
            raise ValueError(f"rotations must have shape [heads, head_dim, num_hashes, sum(bucket factors) // 2] = "
                             f"{expected}; got {describe(rotations)}")
        if rotations.dtype != first.dtype or rotations.device != first.device:
            raise ValueError(f"rotations must have the inputs' dtype and device ({first.dtype}, {first.device}); "
                             f"got {rotations.dtype}, {rotations.device}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")


# ------------------------------------------------------------------------------------ public ops


def _pad_seq(tensor, length):
    return torch.nn.functional.pad(tensor, (0, 0, 0, length - tensor.shape[2]))


def _sorted_positions(offset_buckets, num_keys, seq):
    """Original position of every entry of the stable sort of the nh * S offset buckets."""
    # the counting sort where it serves (CUDA), without the undo index nobody here reads
    return stable_sort_indices(offset_buckets, num_keys) % seq


def _lsh_forward(q, k, v, shared, *, num_hashes, num_buckets, chunk_length, num_chunks_before, num_chunks_after,
                 causal, attention_mask, rotations, hash_seed, dropout_p, return_lse, scale, backend):
    """Both public ops after validation. q is qk in shared-QK mode (k is None then)."""
    batch, heads, seq, dim = q.shape
    if batch * heads * seq == 0:
        return _empty_result(q, k, v, num_hashes if seq > chunk_length else 1, return_lse)
    if seq > chunk_length and seq % chunk_length:
        # pad as ReformerModel does: up to a multiple of the chunk, the padding masked out (mask 0)
        padded = (seq + chunk_length - 1) // chunk_length * chunk_length
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
        attention_mask = torch.nn.functional.pad(attention_mask.to(torch.bool), (0, padded - seq), value=False)
        q, v = _pad_seq(q, padded), _pad_seq(v, padded)
        k = None if k is None else _pad_seq(k, padded)
    full_seq = q.shape[2]
    key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
    mask_value, self_mask_value = mask_constants(q.dtype)
    keys = len_and_dim_norm(q) if shared else k
    if full_seq <= chunk_length:
        # full attention: every query sees every key, one round, no hashing
        positions = torch.arange(full_seq, device=q.device).expand(batch, heads, full_seq)
        q_idx = k_idx = positions
        config = (full_seq, 0, 0, causal, shared, scale, mask_value, self_mask_value)
    else:
        if rotations is None:
            rotations = lsh_rotations(heads, dim, num_hashes, num_buckets, hash_seed=hash_seed, device=q.device,
                                      dtype=q.dtype)
        num_keys = num_hashes * (math.prod(bucket_factors(num_buckets)) + 1)  # ids < this, padding bucket included
        q_idx = _sorted_positions(lsh_hash(q, rotations, num_buckets, key_mask, backend=backend), num_keys, full_seq)
        if shared:
            k_idx = q_idx
        else:
            k_buckets = lsh_hash(k, rotations, num_buckets, key_mask, backend=backend)
            k_idx = _sorted_positions(k_buckets, num_keys, full_seq)
        config = (chunk_length, num_chunks_before, num_chunks_after, causal, shared, scale, mask_value,
                  self_mask_value)
    out_rounds, lse_rounds = _chunked_attention(q, keys, v, q_idx, k_idx, key_mask, config, float(dropout_p), backend)
    if out_rounds.shape[2] == 1:
        out = out_rounds[:, :, 0]
    else:
        # rounds combined by their log-sum-exp; the gradient flows through lse_rounds too. Written
        # as transformers writes it, exp(lse - logsumexp(lse)), not softmax: the rounding differs
        # for rounds whose lse are all at a mask constant (fp32 rounds -1e5 + log(nh)).
        out = combine_rounds(out_rounds, lse_rounds, backend)
    out = out[:, :, :seq]
    if return_lse:
        return out, lse_rounds[..., :seq]
    return out


def _empty_result(q, k, v, rounds, return_lse):
    """No batch, heads or positions: nothing to hash or attend. The empty output (and lse), tied to
    every input through autograd, so their gradients are empty tensors of their shapes, not None."""
    anchor = q.sum(-1, keepdim=True) if k is None else q.sum(-1, keepdim=True) + k.sum(-1, keepdim=True)
    out = (v + anchor.to(v.dtype)) * 0
    if not return_lse:
        return out
    batch, heads, seq = q.shape[:3]
    return out, q.new_zeros((batch, heads, rounds, seq), dtype=_lse_dtype(q))


def lsh_attention(qk, v, *, num_hashes, num_buckets, chunk_length, num_chunks_before=1, num_chunks_after=0,
                  causal=False, attention_mask=None, rotations=None, hash_seed=None, dropout_p=0.0,
                  return_lse=False, backend=None):
    """Reformer LSH self-attention with shared query/key, exactly transformers' LSHSelfAttention.

    qk, v: [B, H, S, D] (the query_key and value projections split into heads), one dtype;
    num_buckets: even int or list of even factors; attention_mask: [B, S] (1 token, 0 padding) or
    None; rotations: [H, D, num_hashes, sum(factors) // 2] in qk's dtype, else drawn as transformers
    does (torch.manual_seed(hash_seed) first when hash_seed is set); dropout_p applies to the
    attention probabilities (pass 0 outside training; mask drawn from torch's default generator);
    backend: None/"auto", "triton" or "torch".
    Returns out [B, H, S, D] in v's dtype, and with return_lse=True also lse_rounds [B, H, nh, S]
    float32 (nh = 1 on the full-attention path, S <= chunk_length).
    """
    _check_inputs(("qk",), (qk,), v, num_hashes=num_hashes, num_buckets=num_buckets, chunk_length=chunk_length,
                  num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after,
                  attention_mask=attention_mask, rotations=rotations, dropout_p=dropout_p)
    backends.forced_backend(backend)  # a misspelt backend fails before any work
    return _lsh_forward(qk, None, v, True, num_hashes=num_hashes, num_buckets=num_buckets, chunk_length=chunk_length,
                        num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after, causal=causal,
                        attention_mask=attention_mask, rotations=rotations, hash_seed=hash_seed, dropout_p=dropout_p,
                        return_lse=return_lse, scale=1.0, backend=backend)


def lsh_attention_qkv(q, k, v, *, num_hashes, num_buckets, chunk_length, num_chunks_before=1, num_chunks_after=0,
                      causal=False, attention_mask=None, rotations=None, hash_seed=None, dropout_p=0.0,
                      return_lse=False, scale=None, backend=None):
    """LSH attention with separate queries and keys (attention interfaces of other architectures):
    q and k hashed with the same rotations and sorted apart, no key normalisation, scores * scale
    (default 1/sqrt(D)), no self mask; masks, chunks, padding and the round combine as lsh_attention."""
    _check_inputs(("q", "k"), (q, k), v, num_hashes=num_hashes, num_buckets=num_buckets, chunk_length=chunk_length,
                  num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after,
                  attention_mask=attention_mask, rotations=rotations, dropout_p=dropout_p)
    backends.forced_backend(backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _lsh_forward(q, k, v, False, num_hashes=num_hashes, num_buckets=num_buckets, chunk_length=chunk_length,
                        num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after, causal=causal,
                        attention_mask=attention_mask, rotations=rotations, hash_seed=hash_seed, dropout_p=dropout_p,
                        return_lse=return_lse, scale=scale, backend=backend)


# ------------------------------------------------------------------------------------ backends


def _triton_kernels():
    return backends.import_kernels("lsh_attention")


def _triton_limits(problem: backends.Problem) -> list[str]:
    reasons = []
    for name in ("head_dim", "value_dim"):
        if problem.sizes.get(name, 0) > 128:
            reasons.append(f"{name} {problem.sizes[name]} > 128")
    return reasons


def _seed_value(dropout_p, seed) -> int:
    if dropout_p > 0.0 and (seed is None or seed.numel() != 1):
        raise ValueError("dropout_p > 0 needs a seed tensor (int64 [1]) for the Triton kernels' dropout mask; got "
                         f"{seed!r}")
    return int(seed.item()) if dropout_p > 0.0 else 0


def _triton_forward(q, k, v, q_idx, k_idx, key_mask, *, dropout_p=0.0, seed=None, **config):
    return _triton_kernels().lsh_chunked_forward(q.contiguous(), k.contiguous(), v.contiguous(), q_idx.contiguous(),
                                                 k_idx.contiguous(), key_mask, dropout_p=float(dropout_p),
                                                 seed=_seed_value(dropout_p, seed), **config)


def _triton_backward(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, lse_rounds, *,
                     dropout_p=0.0, seed=None, **config):
    return _triton_kernels().lsh_chunked_backward(
        grad_out_rounds.contiguous(), grad_lse_rounds.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
        q_idx.contiguous(), k_idx.contiguous(), key_mask, out_rounds, lse_rounds, dropout_p=float(dropout_p),
        seed=_seed_value(dropout_p, seed), out_dtypes=(q.dtype, k.dtype, v.dtype), **config)


def _refuse_torch_dropout(dropout_p):
    if dropout_p > 0.0:
        raise ValueError(f"the torch backend of pefops::lsh_chunked_fwd/bwd takes no dropout (got dropout_p="
                         f"{dropout_p}): its backward cannot redraw torch's dropout mask; lsh_attention runs the torch "
                         "backend's dropout under plain autograd (the eager function) instead")


def _torch_op_forward(q, k, v, q_idx, k_idx, key_mask, *, dropout_p=0.0, seed=None, **config):
    _refuse_torch_dropout(dropout_p)
    return chunked_forward_torch(q, k, v, q_idx, k_idx, key_mask, **config)


def _torch_op_backward(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds, lse_rounds, *,
                       dropout_p=0.0, seed=None, **config):
    _refuse_torch_dropout(dropout_p)
    return chunked_backward_torch(grad_out_rounds, grad_lse_rounds, q, k, v, q_idx, k_idx, key_mask, out_rounds,
                                   lse_rounds, **config)


backends.register_torch_and_triton(
    OP, dtypes=FLOAT_DTYPES, torch_functions={"forward": _torch_op_forward, "backward": _torch_op_backward},
    triton_functions={"forward": _triton_forward, "backward": _triton_backward}, triton_limits=_triton_limits,
)
