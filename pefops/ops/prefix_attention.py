"""Attention over learned prefix keys/values and the sequence (prefix-tuning), without concatenation.

    out[b, h] = softmax(scale * q[b, h] @ [pk[g] ; k[b, g]]^T + mask) @ [pv[g] ; v[b, g]]

with g = h // (Hq // Hkv) the kv head of query head h (grouped-query attention). The prefix pk / pv is
[Hkv, P, D] (shared by every row of the batch) or [B, Hkv, P, D] (one per row). Every prefix slot is
visible to every query, also under `causal`; `attention_mask` applies to the sequence keys only. A query
row whose sequence keys are all masked still attends to the prefix; with P = 0 such a row gives zeros
(as scaled_dot_product_attention does).

attention_mask forms:
  [B, Sk]            key padding, bool (True = keep) or integer 0/1 (transformers' 2-D masks)
  3-D or 4-D         broadcastable to [B, Hq, Sq, Sk]: bool (True = attend) or float additive
                     (0 / -inf or finfo.min), as transformers' attention functions receive it
  last size P + Sk   (3-D / 4-D, P > 0) the mask covers the prefix columns too, in front: rows of a
                     mixed-task batch with shorter or no prefixes hide the slots that are not theirs
                     (issue 15). causal still applies to the sequence columns only. Both backends
                     serve it (the Triton kernels read the prefix columns under a constexpr flag).
causal: bottom-right aligned, query i sees sequence keys j <= i + Sk - Sq (a decoding step with a KV
cache, Sq = 1, sees every cached key).

Gradients reach q, k, v, prefix_k and prefix_v (a shared prefix's gradient is summed over the batch);
the mask gets none.

The forward custom op returns (out, lse): lse [B, Hq, Sq] fp32 is the row log-sum-exp the Triton
backward recomputes from (the torch backend, whose backward does not need it, fills it with zeros, so
the op's output shapes never depend on the backend); the backward is a custom op too.

Backends:
  torch   scaled_dot_product_attention over [expanded prefix ; k] with the mask extended by visible
          columns, in fp32 (fp64 for fp64 inputs): the CPU path and the oracle `prefix_attention_ref`.
          Its dropout is SDPA's own, so with dropout_p > 0 it runs under plain autograd (its backward
          could not redraw SDPA's mask). The custom op's backward is the explicit softmax backward
          over the concatenated keys.
  triton  flash-attention-style kernels (kernels/prefix_attention.py) reading the two KV sources in
          place: no concatenation, no expansion over the batch or the query heads of a group.
          Dropout in the kernels: a Philox keep mask from a seed the op draws from torch's default
          generator (torch.manual_seed makes runs reproducible), redrawn by the backward from the
          same seed, so no mask is stored.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from pefops import backend as backends
from pefops.ops.common import FLOAT_DTYPES, check_float_dtype, compute_dtype, describe, once_differentiable

OP = "prefix_attention"
MAX_TRITON_HEAD_DIM = 256

# order of the gradients the backward op returns (and of its grad mask)
GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


# ------------------------------------------------------------------------------------ reference


def causal_keep(sq: int, sk: int, device) -> torch.Tensor:
    """[Sq, Sk] bool, bottom-right aligned: query i sees key j when j <= i + Sk - Sq."""
    rows = torch.arange(sq, device=device).unsqueeze(1)
    cols = torch.arange(sk, device=device).unsqueeze(0)
    return cols <= rows + (sk - sq)


def _sdpa_mask(mask: Optional[torch.Tensor], causal: bool, sq: int, sk: int, prefix_len: int, dtype, device):
    """The mask of SDPA over the P + Sk concatenated keys: the sequence mask (a normalised 4-D mask,
    bool or additive) combined with causal, with P visible columns in front (or the mask's own prefix
    columns when it covers P + Sk). None when nothing is masked."""
    if mask is None and not causal:
        return None
    covers_prefix = mask is not None and prefix_len > 0 and mask.shape[-1] == prefix_len + sk
    if mask is None:
        mask = causal_keep(sq, sk, device).view(1, 1, sq, sk)
    else:
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)
        if causal:
            keep = causal_keep(sq, sk, device)
            if covers_prefix:  # the prefix columns stay as the mask has them
                keep = torch.cat([keep.new_ones((sq, prefix_len)), keep], dim=-1)
            mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
    if prefix_len and not covers_prefix:
        front_shape = (*mask.shape[:-1], prefix_len)
        front = mask.new_ones(front_shape) if mask.dtype == torch.bool else mask.new_zeros(front_shape)
        mask = torch.cat([front, mask], dim=-1)
    return mask


def _concatenated_kv(k, v, prefix_k, prefix_v, batch, q_heads, cdt):
    """[prefix ; sequence] keys and values expanded over the batch and repeated over each group's
    query heads: [B, Hq, P + Sk, D / Dv] in the compute dtype (what the fused kernels avoid)."""
    keys = torch.cat([prefix_k.to(cdt).expand(batch, -1, -1, -1), k.to(cdt)], dim=2)
    values = torch.cat([prefix_v.to(cdt).expand(batch, -1, -1, -1), v.to(cdt)], dim=2)
    kv_heads = k.shape[1]
    if kv_heads != q_heads:
        # repeat_interleave rather than enable_gqa: every SDPA backend (and torch.compile) takes it
        keys = keys.repeat_interleave(q_heads // kv_heads, dim=1)
        values = values.repeat_interleave(q_heads // kv_heads, dim=1)
    return keys, values


def _torch_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale, dropout_p=0.0):
    """The reference forward (differentiable): SDPA over [prefix ; sequence] in fp32 (fp64 for fp64).
    q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D / Dv]; prefix_k, prefix_v [1 or B, Hkv, P, D / Dv];
    mask None or 4-D broadcastable to [B, Hq, Sq, Sk]. Returns (out in q's dtype, lse of zeros)."""
    cdt = compute_dtype(q.dtype)
    batch, q_heads, sq, _ = q.shape
    sk = k.shape[2]
    prefix_len = prefix_k.shape[2]
    keys, values = _concatenated_kv(k, v, prefix_k, prefix_v, batch, q_heads, cdt)
    attn_mask = _sdpa_mask(mask, causal, sq, sk, prefix_len, cdt, q.device)
    if keys.shape[2] == 0:  # no keys at all: every row is empty
        out = q.new_zeros((batch, q_heads, sq, v.shape[-1]), dtype=cdt) + 0.0 * q.to(cdt).sum()
    else:
        out = F.scaled_dot_product_attention(q.to(cdt), keys, values, attn_mask=attn_mask, dropout_p=dropout_p,
                                             scale=scale)
    # contiguous: the fake implementation promises it (inductor checks strides; SDPA may return another layout)
    return out.to(q.dtype).contiguous(), q.new_zeros((batch, q_heads, sq), dtype=torch.float32)


def _torch_op_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale, dropout_p, seed):
    """The torch backend of the forward custom op: no dropout there (see _refuse_torch_dropout)."""
    _refuse_torch_dropout(dropout_p)
    return _torch_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale)


def _torch_op_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, scale, dropout_p, seed,
                       grad_mask):
    _refuse_torch_dropout(dropout_p)
    return _torch_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, scale, grad_mask)


def _refuse_torch_dropout(dropout_p):
    if dropout_p > 0.0:
        raise ValueError(f"the torch backend of pefops::prefix_attention_fwd/bwd takes no dropout (got dropout_p="
                         f"{dropout_p}): its backward cannot redraw SDPA's dropout mask; prefix_attention runs the "
                         "torch backend's dropout under plain autograd instead")


def _torch_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, scale, grad_mask):
    """The explicit attention backward over the concatenated keys, in the compute dtype (a custom op
    runs below autograd, so it cannot differentiate the forward again):
        P = softmax(S), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q,
    then the key / value gradients split into prefix and sequence, summed over each group's query
    heads (and over the batch for a shared prefix). Returns grads in GRAD_NAMES order."""
    cdt = compute_dtype(q.dtype)
    batch, q_heads, sq, dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    prefix_len = prefix_k.shape[2]
    keys, values = _concatenated_kv(k, v, prefix_k, prefix_v, batch, q_heads, cdt)
    q_c, grad_c = q.to(cdt), grad_out.to(cdt)
    scores = torch.matmul(q_c, keys.transpose(-1, -2)) * scale
    attn_mask = _sdpa_mask(mask, causal, sq, sk, prefix_len, cdt, q.device)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    # a row without any visible key is all -inf: softmax gives NaN there, the output (and gradient) is 0
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    d_values = torch.matmul(probs.transpose(-1, -2), grad_c)
    d_probs = torch.matmul(grad_c, values.transpose(-1, -2))
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    dq = torch.matmul(d_scores, keys) * scale
    d_keys = torch.matmul(d_scores.transpose(-1, -2), q_c) * scale
    group = q_heads // kv_heads

    def fold(grad):  # [B, Hq, N, X] -> [B, Hkv, N, X]: sum over the query heads of each group
        return grad.view(batch, kv_heads, group, *grad.shape[2:]).sum(2)

    d_keys, d_values = fold(d_keys), fold(d_values)
    d_prefix_k, d_prefix_v = d_keys[:, :, :prefix_len], d_values[:, :, :prefix_len]
    if prefix_k.shape[0] != batch:  # shared prefix: every row contributed
        d_prefix_k, d_prefix_v = d_prefix_k.sum(0, keepdim=True), d_prefix_v.sum(0, keepdim=True)
    # slices of one tensor: copies, as a custom op's outputs must not alias each other
    grads = (dq, d_keys[:, :, prefix_len:].clone(), d_values[:, :, prefix_len:].clone(), d_prefix_k.clone(),
             d_prefix_v.clone())
    return tuple(grad if needed else None for grad, needed in zip(grads, grad_mask))


def prefix_attention_ref(q, k, v, prefix_k, prefix_v, *, attention_mask=None, causal=False, scale=None,
                         dropout_p=0.0):
    """The reference: same arguments as `prefix_attention`, plain autograd through
    scaled_dot_product_attention over the concatenated, expanded prefix, fp32 math (fp64 for fp64
    inputs), output in q's dtype. The CPU path, the test oracle and a benchmark baseline."""
    q, k, v, prefix_k, prefix_v, mask, scale = _normalise(q, k, v, prefix_k, prefix_v, attention_mask, causal,
                                                          scale, dropout_p)
    return _torch_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale, float(dropout_p))[0]


# ------------------------------------------------------------------------------------ validation


def _normalise_mask(mask, batch, q_heads, sq, sk, device, prefix_len=0):
    """The attention mask as None or a 4-D view broadcastable to [B, Hq, Sq, Sk] (or [.., P + Sk]: it
    covers the prefix columns too; bool or float additive); a [B, Sk] key-padding mask becomes
    [B, 1, 1, Sk] bool. No copies of 4-D masks."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor or None; got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"attention_mask must be on q's device {device}; got {mask.device}")
    if mask.is_complex():
        raise ValueError(f"attention_mask must be bool, integer 0/1 ([B, Sk] only) or float additive; got {mask.dtype}")
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, sk):
            raise ValueError(f"a 2-D attention_mask is key padding and must have shape [batch={batch}, keys={sk}]; "
                             f"got {tuple(mask.shape)} (pass other masks 4-D, broadcastable to "
                             f"[{batch}, {q_heads}, {sq}, {sk}])")
        if mask.is_floating_point():
            raise ValueError("a 2-D attention_mask is key padding and must be bool (True = keep) or integer 0/1; "
                             f"got {mask.dtype} (pass an additive mask 4-D, e.g. [{batch}, 1, 1, {sk}])")
        return (mask if mask.dtype == torch.bool else mask != 0)[:, None, None, :]
    if mask.dim() not in (3, 4):
        raise ValueError(f"attention_mask must be [batch, keys] key padding or 3-D/4-D broadcastable to "
                         f"[{batch}, {q_heads}, {sq}, {sk}]; got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"a {mask.dim()}-D attention_mask must be bool (True = attend) or float additive "
                         f"(0 / -inf); got {mask.dtype}")
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    covering = f" or every prefix slot and key (last size {prefix_len + sk})" if prefix_len else ""
    if prefix_len and mask.shape[-1] == prefix_len + sk:
        sk = prefix_len + sk  # it covers [prefix ; sequence]
    for size, full, name in zip(mask.shape, (batch, q_heads, sq, sk), ("batch", "heads", "queries", "keys")):
        if size not in (1, full):
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"[{batch}, {q_heads}, {sq}, {sk}] (its {name} size {size} must be 1 or {full}"
                             f"{covering if name == 'keys' else ''})")
    if mask.shape[-1] != sk:
        raise ValueError(f"attention_mask must cover every sequence key (last size {sk}){covering}; "
                         f"got shape {tuple(mask.shape)}")
    return mask


def _normalise_prefix(prefix, name, batch, kv_heads, dim, dim_name, dtype, device):
    if not isinstance(prefix, torch.Tensor) or prefix.dim() not in (3, 4):
        raise ValueError(f"{name} must be a tensor [kv_heads, P, {dim_name}] (shared) or [batch, kv_heads, P, "
                         f"{dim_name}] (per row); got {describe(prefix)}")
    if prefix.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {prefix.device}")
    if not prefix.is_floating_point():
        raise ValueError(f"{name} must be a float tensor; got {prefix.dtype}")
    given = tuple(prefix.shape)
    if prefix.dim() == 3:
        prefix = prefix.unsqueeze(0)
    if prefix.shape[0] not in (1, batch) or prefix.shape[1] != kv_heads or prefix.shape[3] != dim:
        raise ValueError(f"{name} must be [kv_heads={kv_heads}, P, {dim_name}={dim}] or [batch={batch}, "
                         f"kv_heads={kv_heads}, P, {dim_name}={dim}]; got shape {given}")
    # a prefix kept in another precision (fp32 parameters of a bf16 model) joins q's dtype; autograd
    # carries the gradient back through the cast
    return prefix.to(dtype)


def _normalise(q, k, v, prefix_k, prefix_v, attention_mask, causal, scale, dropout_p):
    """Check every argument (ValueError saying what was expected). Returns (q, k, v, prefix_k [1|B,
    Hkv, P, D], prefix_v [1|B, Hkv, P, Dv], mask (None or 4-D), scale)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a tensor [batch, q_heads, queries, head_dim]; got {describe(q)}")
    dtype, device = q.dtype, q.device
    check_float_dtype("q", dtype)
    batch, q_heads, sq, dim = q.shape
    for tensor, name in ((k, "k"), (v, "v")):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a tensor [batch, kv_heads, keys, dim]; got {describe(tensor)}")
        if tensor.dtype != dtype or tensor.device != device:
            raise ValueError(f"{name} must have q's dtype and device ({dtype}, {device}); got {describe(tensor)}")
    kv_heads, sk = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"k must be [batch={batch}, kv_heads, keys, head_dim={dim}] like q {tuple(q.shape)}; "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (batch, kv_heads, sk):
        raise ValueError(f"v must be [batch={batch}, kv_heads={kv_heads}, keys={sk}, value_dim] like k "
                         f"{tuple(k.shape)}; got {tuple(v.shape)}")
    if kv_heads == 0:
        raise ValueError(f"k and v must have at least one head (kv_heads >= 1); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q_heads % kv_heads:
        raise ValueError(f"q's heads ({q_heads}) must be a multiple of k/v's heads ({kv_heads}) (grouped-query "
                         "attention: query head h uses kv head h // (q_heads // kv_heads))")
    value_dim = v.shape[3]
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must both be given or both be None")
    if prefix_k is None:  # P = 0: plain attention
        prefix_k = q.new_zeros((1, kv_heads, 0, dim))
        prefix_v = q.new_zeros((1, kv_heads, 0, value_dim))
    prefix_k = _normalise_prefix(prefix_k, "prefix_k", batch, kv_heads, dim, "head_dim", dtype, device)
    prefix_v = _normalise_prefix(prefix_v, "prefix_v", batch, kv_heads, value_dim, "value_dim", dtype, device)
    if prefix_k.shape[:3] != prefix_v.shape[:3]:
        raise ValueError(f"prefix_k and prefix_v must have the same batch, kv_heads and length P; got "
                         f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    mask = _normalise_mask(attention_mask, batch, q_heads, sq, sk, device, prefix_k.shape[2])
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool; got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(dim) if dim else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None; got {type(scale).__name__}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")
    return q, k, v, prefix_k, prefix_v, mask, float(scale)


def _problem(q, v, mode, dropout=False):
    sizes = {"head_dim": q.shape[-1], "value_dim": v.shape[-1], "dropout": int(dropout)}
    return backends.Problem(q.device, q.dtype, mode, sizes)


def _triton_limits(problem: backends.Problem) -> list[str]:
    reasons = []
    for name in ("head_dim", "value_dim"):
        size = problem.sizes.get(name, 0)
        if size > MAX_TRITON_HEAD_DIM:
            reasons.append(f"{name} {size} exceeds the Triton kernel's limit of {MAX_TRITON_HEAD_DIM}")
    return reasons


# ------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("pefops::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    mask: Optional[torch.Tensor], causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    # seed: None without dropout, else an int64 CPU tensor [1] (a tensor, not an int, so torch.compile
    # traces its drawing instead of breaking the graph on .item())
    implementation = backends.select(OP, _problem(q, v, "forward"), backend or None)
    return implementation.functions["forward"](q, k, v, prefix_k, prefix_v, mask, causal, scale, dropout_p, seed)


@_prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, mask, causal, scale, dropout_p, seed, backend):
    batch, q_heads, sq, _ = q.shape
    out = q.new_empty((batch, q_heads, sq, v.shape[-1]))
    return out, q.new_empty((batch, q_heads, sq), dtype=torch.float32)


@torch.library.custom_op("pefops::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, causal: bool,
    scale: float, dropout_p: float, seed: Optional[torch.Tensor], grad_mask: Sequence[bool], backend: str,
) -> list[torch.Tensor]:
    implementation = backends.select(OP, _problem(q, v, "backward"), backend or None)
    grads = implementation.functions["backward"](grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal,
                                                 scale, dropout_p, seed, list(grad_mask))
    # custom ops return tensors only: an empty tensor stands for "not needed"
    inputs = (q, k, v, prefix_k, prefix_v)
    return [grad.to(reference.dtype).reshape(reference.shape) if needed else q.new_empty(0)
            for grad, reference, needed in zip(grads, inputs, grad_mask)]


@_prefix_attention_bwd.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, scale, dropout_p, seed, grad_mask, backend):
    inputs = (q, k, v, prefix_k, prefix_v)
    return [reference.new_empty(reference.shape) if needed else q.new_empty(0)
            for needed, reference in zip(grad_mask, inputs)]


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, mask, causal, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, mask, out, lse, seed)
    ctx.config = (causal, scale, dropout_p, backend)


@once_differentiable("prefix_attention")
def _backward(ctx, grad_out, _grad_lse):
    q, k, v, prefix_k, prefix_v, mask, out, lse, seed = ctx.saved_tensors
    causal, scale, dropout_p, backend = ctx.config
    grad_mask = list(ctx.needs_input_grad[:5])
    grads = [None] * 5
    if any(grad_mask):
        outputs = _prefix_attention_bwd(grad_out.contiguous(), q, k, v, prefix_k, prefix_v, mask, out, lse, causal,
                                        scale, dropout_p, seed, grad_mask, backend)
        grads = [grad if needed else None for grad, needed in zip(outputs, grad_mask)]
    return (*grads, None, None, None, None, None, None)


_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public op


def prefix_attention(q, k, v, prefix_k, prefix_v, *, attention_mask=None, causal=False, scale=None, dropout_p=0.0,
                     backend=None):
    """Attention over [prefix ; sequence] keys without concatenating or expanding them.

    q [B, Hq, Sq, D]; k [B, Hkv, Sk, D]; v [B, Hkv, Sk, Dv]; prefix_k [Hkv, P, D] (shared by the batch)
    or [B, Hkv, P, D] (per row), prefix_v likewise with Dv (None for both: P = 0). Hq must be a multiple
    of Hkv (query head h uses kv head h // (Hq // Hkv)). attention_mask (sequence keys only): [B, Sk]
    key padding (bool or 0/1), or a bool / float additive mask broadcastable to [B, Hq, Sq, Sk]; a 3-D
    / 4-D mask with last size P + Sk covers the prefix slots too.
    causal: bottom-right aligned, the prefix always visible. scale: default 1/sqrt(D). dropout_p: the
    attention probabilities' dropout (pass 0 outside training), its mask drawn from torch's default
    generator (the Triton kernels' Philox seed, or SDPA's dropout on the torch backend).
    backend: None/"auto", "triton" or "torch" (PEFOPS_BACKEND sets the default).
    Returns [B, Hq, Sq, Dv] in q's dtype.
    """
    q, k, v, prefix_k, prefix_v, mask, scale = _normalise(q, k, v, prefix_k, prefix_v, attention_mask, causal, scale,
                                                          dropout_p)
    backends.forced_backend(backend)  # rejects a misspelt backend before any work
    if dropout_p > 0.0:
        implementation = backends.select(OP, _problem(q, v, "forward", dropout=True), backend)
        if implementation.backend == "torch":
            # SDPA's dropout mask cannot be redrawn by a backward op: the reference under autograd serves it
            return _torch_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale, float(dropout_p))[0]
        # the kernels redraw their mask from this seed in the backward; drawn from torch's default CPU
        # generator, so torch.manual_seed makes a run reproducible
        seed = torch.randint(2**31 - 1, (1,), dtype=torch.int64)
        return _prefix_attention_fwd(q, k, v, prefix_k, prefix_v, mask, causal, scale, float(dropout_p), seed,
                                     implementation.backend)[0]
    if backends.eager_torch(OP, _problem(q, v, "forward"), backend):
        return _torch_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale)[0]  # the reference under autograd
    return _prefix_attention_fwd(q, k, v, prefix_k, prefix_v, mask, causal, scale, 0.0, None, backend or "")[0]


# ------------------------------------------------------------------------------------ backends


def _seed_value(dropout_p, seed) -> int:
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor (int64 [1]) for the Triton kernels' dropout mask")
    return int(seed.item()) if dropout_p > 0.0 else 0


def _triton_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale, dropout_p, seed):
    kernels = backends.import_kernels("prefix_attention")
    return kernels.prefix_attention_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale, dropout_p,
                                            _seed_value(dropout_p, seed))


def _triton_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, scale, dropout_p, seed,
                     grad_mask):
    kernels = backends.import_kernels("prefix_attention_bwd")
    grads = kernels.prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, scale,
                                              need=dict(zip(GRAD_NAMES, grad_mask)), dropout_p=dropout_p,
                                              seed=_seed_value(dropout_p, seed))
    return tuple(grad if needed else None for grad, needed in zip(grads, grad_mask))


backends.register_torch_and_triton(
    OP, dtypes=FLOAT_DTYPES, torch_functions={"forward": _torch_op_forward, "backward": _torch_op_backward},
    triton_functions={"forward": _triton_forward, "backward": _triton_backward}, triton_limits=_triton_limits,
)
