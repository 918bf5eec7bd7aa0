"""The two small LSH steps around the chunked core, each with a torch and a Triton backend:

  bucket ids   argmax([xR, -xR]) per bucket factor of the rotated vectors (transformers' einsum
               output), mixed-radix, padding bucket, round offsets -> int64 [B, H, nh * S]
  round combine  out = sum_r exp(lse_r - lse) * out_r with lse = logsumexp_r(lse_r) (fp32), as
               transformers writes it (not a re-normalised softmax: where every round's lse is a
               mask constant, its fp32 rounding shows, as there); differentiable in out_r and lse_r.

Op families "lsh_bucket_ids" and "lsh_combine" in pefops.backend; Triton serves CUDA tensors (or CPU
tensors under TRITON_INTERPRET=1 when forced). Both Triton kernels are in kernels/lsh_attention_rounds.py.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from pefops import backend as backends
from pefops.ops.common import FLOAT_DTYPES, compute_dtype, once_differentiable

BUCKET_OP = "lsh_bucket_ids"
COMBINE_OP = "lsh_combine"


# ------------------------------------------------------------------------------------ bucket ids


def _argmax_plus_minus(rotated: torch.Tensor) -> torch.Tensor:
    """argmax(cat([x, -x], -1), -1) without building the concatenation: the first maximum of x
    (index i) unless -x has a strictly larger maximum, -min(x), at the first minimum j (index
    R/2 + j). Ties resolve as argmax does (the first index): max and min return first indices."""
    high, high_index = rotated.max(dim=-1)
    low, low_index = rotated.min(dim=-1)
    return torch.where(high >= -low, high_index, low_index + rotated.shape[-1])


def _bucket_ids_torch(rotated: torch.Tensor, factors: Sequence[int], keep: Optional[torch.Tensor]) -> torch.Tensor:
    """No host synchronisation: the padding bucket exists iff some mask entry is 0, so the per-round
    bucket count num_buckets + any(mask == 0) is a tensor."""
    num_hashes = rotated.shape[2]
    buckets = None
    start, radix = 0, 1
    for factor in factors:
        part_buckets = _argmax_plus_minus(rotated[..., start:start + factor // 2])
        start += factor // 2
        buckets = part_buckets if buckets is None else buckets + radix * part_buckets
        radix *= factor
    total = math.prod(factors)
    per_round = total
    if keep is not None:
        buckets = torch.where(keep[:, None, None, :], buckets, torch.full_like(buckets, total))
        per_round = total + (~keep).any().to(torch.int64)
    offsets = torch.arange(num_hashes, device=rotated.device, dtype=torch.int64) * per_round
    return (buckets + offsets.view(1, 1, -1, 1)).flatten(2, 3)


def _bucket_ids_triton(rotated, factors, keep):
    # the padding bucket is there only when something is padded (transformers' rule): a device flag
    # the kernel reads, so the host never waits for it
    extra_bucket = (~keep).any() if keep is not None else False
    return backends.import_kernels("lsh_attention").lsh_bucket_ids(rotated.contiguous(), tuple(factors), keep,
                                                                  extra_bucket)


def bucket_ids(rotated: torch.Tensor, factors: Sequence[int], keep: Optional[torch.Tensor],
               backend: Optional[str] = None) -> torch.Tensor:
    """Offset bucket ids int64 [B, H, nh * S] of rotated [B, H, nh, S, sum(factors) / 2]; keep [B, S]
    bool (False = padding) or None. No gradient (ids)."""
    if backends.compiling():
        # the Triton path reads one flag on the host (is anything padded?); traced graphs stay on torch
        return _bucket_ids_torch(rotated, factors, keep)
    problem = backends.Problem(device=rotated.device, dtype=rotated.dtype, mode="forward")
    implementation = backends.select(BUCKET_OP, problem, backend)
    return implementation.functions["forward"](rotated, factors, keep)


# ------------------------------------------------------------------------------------ round combine


def _combine_forward_torch(out_rounds, lse_rounds):
    lse = torch.logsumexp(lse_rounds, dim=2)
    weights = torch.exp(lse_rounds - lse.unsqueeze(2)).unsqueeze(-1)
    return (out_rounds.to(compute_dtype(out_rounds.dtype)) * weights).sum(2).to(out_rounds.dtype), lse


def _combine_backward_torch(grad_out, grad_lse, out_rounds, lse_rounds, out):
    compute = compute_dtype(out_rounds.dtype)
    lse = torch.logsumexp(lse_rounds, dim=2, keepdim=True)
    weights = torch.exp(lse_rounds - lse)  # [B, H, nh, S]
    grad = grad_out.to(compute).unsqueeze(2)
    shift = -(grad_out.to(compute) * out.to(compute)).sum(-1, keepdim=True).unsqueeze(2)  # -g . out
    if grad_lse is not None:
        shift = shift + grad_lse.unsqueeze(2).unsqueeze(-1)
    grad_lse_rounds = weights * ((grad * out_rounds.to(compute)).sum(-1, keepdim=True) + shift).squeeze(-1)
    return (weights.unsqueeze(-1) * grad).to(out_rounds.dtype), grad_lse_rounds


def _combine_forward_triton(out_rounds, lse_rounds):
    return backends.import_kernels("lsh_attention").lsh_combine_rounds(out_rounds.contiguous(),
                                                                      lse_rounds.contiguous())


def _combine_backward_triton(grad_out, grad_lse, out_rounds, lse_rounds, out):
    return backends.import_kernels("lsh_attention").lsh_combine_rounds_backward(
        grad_out.contiguous(), None if grad_lse is None else grad_lse.contiguous(), out_rounds.contiguous(),
        lse_rounds.contiguous(), out.contiguous())


def _combine_problem(out_rounds, mode):
    return backends.Problem(device=out_rounds.device, dtype=out_rounds.dtype, mode=mode)


@torch.library.custom_op("pefops::lsh_combine_fwd", mutates_args=())
def _lsh_combine_fwd(out_rounds: torch.Tensor, lse_rounds: torch.Tensor, backend: str) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    implementation = backends.select(COMBINE_OP, _combine_problem(out_rounds, "forward"), backend or None)
    return implementation.functions["forward"](out_rounds, lse_rounds)


@_lsh_combine_fwd.register_fake
def _(out_rounds, lse_rounds, backend):
    batch, heads, _, seq, value_dim = out_rounds.shape
    return out_rounds.new_empty((batch, heads, seq, value_dim)), lse_rounds.new_empty((batch, heads, seq))


@torch.library.custom_op("pefops::lsh_combine_bwd", mutates_args=())
def _lsh_combine_bwd(grad_out: torch.Tensor, grad_lse: torch.Tensor, out_rounds: torch.Tensor,
                     lse_rounds: torch.Tensor, out: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    implementation = backends.select(COMBINE_OP, _combine_problem(out_rounds, "backward"), backend or None)
    grad_out_rounds, grad_lse_rounds = implementation.functions["backward"](grad_out, grad_lse, out_rounds,
                                                                            lse_rounds, out)
    return grad_out_rounds.to(out_rounds.dtype), grad_lse_rounds.to(lse_rounds.dtype)


@_lsh_combine_bwd.register_fake
def _(grad_out, grad_lse, out_rounds, lse_rounds, out, backend):
    return out_rounds.new_empty(out_rounds.shape), lse_rounds.new_empty(lse_rounds.shape)


def _setup_context(ctx, inputs, output):
    out_rounds, lse_rounds, backend = inputs
    ctx.save_for_backward(out_rounds, lse_rounds, output[0])
    ctx.backend = backend


@once_differentiable("lsh_attention (round combine)")
def _backward(ctx, grad_out, grad_lse):
    out_rounds, lse_rounds, out = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = torch.zeros(out.shape[:3], dtype=lse_rounds.dtype, device=out.device)
    grad_out_rounds, grad_lse_rounds = _lsh_combine_bwd(grad_out, grad_lse, out_rounds, lse_rounds, out, ctx.backend)
    return grad_out_rounds, grad_lse_rounds, None


_lsh_combine_fwd.register_autograd(_backward, setup_context=_setup_context)


def combine_rounds(out_rounds: torch.Tensor, lse_rounds: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """out [B, H, S, Dv] of out_rounds [B, H, nh, S, Dv] and lse_rounds [B, H, nh, S] float32."""
    forced = backends.forced_backend(backend)
    implementation = backends.select(COMBINE_OP, _combine_problem(out_rounds, "forward"), forced)
    if implementation.backend == "torch" and not backends.compiling():
        # eager torch: the plain differentiable expression (autograd through it equals the custom op's)
        weights = torch.exp(lse_rounds - torch.logsumexp(lse_rounds, dim=2, keepdim=True)).unsqueeze(-1)
        return (out_rounds * weights.to(out_rounds.dtype)).sum(2)
    return _lsh_combine_fwd(out_rounds, lse_rounds, forced or "")[0]


# ------------------------------------------------------------------------------------ registration


def _triton_reasons() -> list[str]:
    return backends.triton_environment_reasons()


backends.register(backends.Implementation(
    op=BUCKET_OP, backend="torch", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES + (torch.float64,),
    has_backward=False, functions={"forward": _bucket_ids_torch}))
backends.register(backends.Implementation(
    op=BUCKET_OP, backend="triton", devices=("cuda",), dtypes=FLOAT_DTYPES, has_backward=False,
    functions={"forward": _bucket_ids_triton}, environment_reasons=_triton_reasons))
backends.register(backends.Implementation(
    op=COMBINE_OP, backend="torch", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES + (torch.float64,),
    has_backward=True, functions={"forward": _combine_forward_torch, "backward": _combine_backward_torch}))
backends.register(backends.Implementation(
    op=COMBINE_OP, backend="triton", devices=("cuda",), dtypes=FLOAT_DTYPES, has_backward=True,
    functions={"forward": _combine_forward_triton, "backward": _combine_backward_triton},
    environment_reasons=_triton_reasons))
