"""AdapterFusion (Pfeiffer et al. 2021) over N frozen bottleneck adapters, without [tokens, N, H].

AdapterHub stacks every adapter's output up_i = s_i ⊙ (W_u,i act(W_d,i x + b_d,i) + b_u,i) into a
[tokens, N, H] tensor and projects each with the key and value matrices (2N + 1 H×H products). The
projections are linear, so the same function is (a_i = act(W_d,i x + b_d,i), U_i = s_i ⊙ W_u,i,
c_i = s_i ⊙ b_u,i):

    q       = W_q query + b_q                         (H×H)
    qk      = W_kᵀ q                                  (H×H)
    score_i = (U_iᵀ qk)·a_i + qk·c_i + q·b_k          (one H×(N·r) product for all i)
    p       = softmax(dropout(score) / T)
    mix     = Σ_i p_i up_i = [p_i a_i]_i U_catᵀ + p C (one (N·r)×H product)
    out     = W_v mix + residual                       (H×H)

When tokens outnumber the N·r bottleneck units, W_qᵀ W_k U and W_v U are formed once per call
(H²·N·r work) and every per-token product is H×(N·r): three of them, and no H×H product at all.

residual_before adds the residual to every up_i first (keys included: AdapterHub adds it in place
to the one tensor that serves as both key and value), which is + qk·residual on every score and
+ residual on the mix.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from pefops import backend as backends
from pefops.ops.activations import activation_code, activation_forward
from pefops.ops.common import FLOAT_DTYPES, check_index_tensor, describe

OP = "adapter_fusion"


# segment tensors whose layout is known ({segment: (its _version, N adapters)}): made by stack_adapters
# or checked once, so a CUDA segment is never read back to the host on later calls
_KNOWN_SEGMENTS = WeakIdKeyDictionary()


def stack_adapters(down_weights: Sequence[torch.Tensor], down_biases, up_weights, up_biases, scalings):
    """Concatenate N adapters (ranks may differ) into the fused layout, folding each scaling into
    its up-projection: returns (W_d [R, H], b_d [R], U [H, R], C [N, H], segment [R] adapter index).
    The five lists have one entry per adapter (None for an absent bias); scalings are floats or
    tensors of 1 or H values."""
    lists = {"down_weights": down_weights, "down_biases": down_biases, "up_weights": up_weights,
             "up_biases": up_biases, "scalings": scalings}
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"stack_adapters needs one entry per adapter in every list; got lengths {lengths}")
    if not down_weights:
        raise ValueError("adapter fusion needs at least one adapter")
    hidden = down_weights[0].shape[1] if down_weights[0].dim() == 2 else None
    ups, biases, segments = [], [], []
    for index, (down, down_bias, up, up_bias, scaling) in enumerate(zip(*lists.values())):
        if down.dim() != 2 or down.shape[1] != hidden or down.shape[0] == 0 or tuple(up.shape) != (hidden, down.shape[0]):
            raise ValueError(f"adapter {index}: expected down [r >= 1, {hidden}] and up [{hidden}, r]; got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
        for name, bias, size in (("down bias", down_bias, down.shape[0]), ("up bias", up_bias, hidden)):
            if bias is not None and tuple(bias.shape) != (size,):
                raise ValueError(f"adapter {index}: {name} must be [{size}] or None; got {describe(bias)}")
        if isinstance(scaling, torch.Tensor) and scaling.numel() not in (1, hidden):
            raise ValueError(f"adapter {index}: a scaling tensor has 1 or {hidden} values; got {describe(scaling)}")
        if not isinstance(scaling, (torch.Tensor, int, float)):
            raise ValueError(f"adapter {index}: scaling must be a float or a tensor; got {describe(scaling)}")
        bias = up_bias if up_bias is not None else up.new_zeros(hidden)
        if isinstance(scaling, torch.Tensor):
            scale = scaling.to(up.dtype).reshape(-1, 1) if scaling.numel() > 1 else scaling.to(up.dtype).reshape(())
            ups.append(scale * up)
            biases.append(scale.reshape(-1) * bias if scale.dim() else scale * bias)
        else:  # a Python float multiplies directly: no tensor made from it (a host-to-device copy on a GPU)
            ups.append(up * float(scaling))
            biases.append(bias * float(scaling))
        segments.append(torch.full((down.shape[0],), index, dtype=torch.long, device=down.device))
    down_bias = torch.cat([b if b is not None else d.new_zeros(d.shape[0]) for d, b in zip(down_weights, down_biases)])
    segment = torch.cat(segments)
    _KNOWN_SEGMENTS[segment] = (segment._version, len(down_weights))
    return torch.cat(list(down_weights)), down_bias, torch.cat(ups, dim=1), torch.stack(biases), segment


def _segment_adapters(segment: torch.Tensor) -> Optional[int]:
    """How many adapters `segment` [R] lays out (each owns a contiguous, non-empty run of units, in
    adapter order: 0..0 1..1 ... N-1), or None while compiling (no data-dependent check). A segment
    from stack_adapters is known without reading it; any other is read once."""
    known = _KNOWN_SEGMENTS.get(segment)
    if known is not None and known[0] == segment._version:
        return known[1]
    if backends.compiling():
        return None
    values = segment.tolist()  # host read: once per segment tensor not made by stack_adapters
    steps_ok = all(b - a in (0, 1) for a, b in zip(values, values[1:]))
    if not values or values[0] != 0 or not steps_ok:
        raise ValueError("segment must give each adapter a contiguous, non-empty run of units in adapter order "
                         f"(0..0, 1..1, ..., as stack_adapters makes it); got {values[:16]}"
                         f"{' ...' if len(values) > 16 else ''}")
    _KNOWN_SEGMENTS[segment] = (segment._version, values[-1] + 1)
    return values[-1] + 1


def _check_operands(x, hidden, down_weight, down_bias, up_weight, up_bias_scaled, segment, projections):
    """Every tensor's shape, dtype and device against x's, before any product runs."""
    if down_weight.dim() != 2 or down_weight.shape[1] != hidden or tuple(up_weight.shape) != (hidden, down_weight.shape[0]):
        raise ValueError(f"down_weight [R, {hidden}] and up_weight [{hidden}, R] expected; got "
                         f"{tuple(down_weight.shape)} and {tuple(up_weight.shape)}")
    units = down_weight.shape[0]
    if down_bias is not None and tuple(down_bias.shape) != (units,):
        raise ValueError(f"down_bias must be [R={units}]; got {describe(down_bias)}")
    check_index_tensor(segment, "segment", f"[R={units}] (adapter index of each unit, from stack_adapters)")
    if tuple(segment.shape) != (units,):
        raise ValueError(f"segment must be [R={units}]; got {tuple(segment.shape)}")
    if up_bias_scaled.dim() != 2 or up_bias_scaled.shape[1] != hidden:
        raise ValueError(f"up_bias_scaled must be [N, {hidden}] (one row per adapter); got {describe(up_bias_scaled)}")
    adapters = _segment_adapters(segment)
    if adapters is not None and up_bias_scaled.shape[0] != adapters:
        raise ValueError(f"up_bias_scaled has {up_bias_scaled.shape[0]} rows but segment lays out {adapters} "
                         "adapters: one row per adapter (an extra row would be a phantom adapter in the softmax)")
    for name, tensor, shape in (("query_weight", projections[0], (hidden, hidden)),
                                ("query_bias", projections[1], (hidden,)),
                                ("key_weight", projections[2], (hidden, hidden)),
                                ("key_bias", projections[3], (hidden,)),
                                ("value_weight", projections[4], (hidden, hidden))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}; got {describe(tensor)}")
    named = {"down_weight": down_weight, "down_bias": down_bias, "up_weight": up_weight,
             "up_bias_scaled": up_bias_scaled, "query_weight": projections[0], "query_bias": projections[1],
             "key_weight": projections[2], "key_bias": projections[3], "value_weight": projections[4]}
    # under autocast the products cast their operands: mixed dtypes are how autocast is used
    check_dtype = not torch.is_autocast_enabled(x.device.type)
    for name, tensor in named.items():
        if tensor is not None and ((check_dtype and tensor.dtype != x.dtype) or tensor.device != x.device):
            raise ValueError(f"{name} must match x's dtype and device ({str(x.dtype).removeprefix('torch.')}, "
                             f"{x.device}); got {describe(tensor)}")
    if segment.device != x.device:
        raise ValueError(f"segment must be on x's device {x.device}; got {describe(segment)}")


def adapter_fusion(x, query, residual, down_weight, down_bias, up_weight, up_bias_scaled, segment, *,
                   query_weight=None, query_bias=None, key_weight=None, key_bias=None, value_weight=None,
                   activation="relu", temperature=1.0, dropout_p=0.0, training=False, residual_before=False,
                   negative_slope=0.01, backend: Optional[str] = None):
    """The fused AdapterFusion layer at one site (see the module docstring).

    x: adapter input [..., H]; query: [..., H]; residual: [..., H]; the adapters in the layout of
    `stack_adapters`: down_weight [R, H], down_bias [R], up_weight [H, R] (scaling folded in),
    up_bias_scaled [N, H], segment [R] (adapter index of each of the R bottleneck units).
    query/key weights [H, H] with biases, value weight [H, H] without bias (None: no projection,
    as in the static variant). Returns [..., H]. Differentiable in everything but `segment`.
    """
    hidden = x.shape[-1]
    for name, tensor in (("query", query), ("residual", residual)):
        if tensor.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}; got {tuple(tensor.shape)}")
    _check_operands(x, hidden, down_weight, down_bias, up_weight, up_bias_scaled, segment,
                    (query_weight, query_bias, key_weight, key_bias, value_weight))
    if temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature}")
    code = activation_code(activation)
    problem = backends.Problem(x.device, x.dtype, "forward", {"tokens": math.prod(x.shape[:-1]), "hidden": hidden,
                                                             "adapters": up_bias_scaled.shape[0]})
    implementation = backends.select(OP, problem, backend)
    return implementation.functions["forward"](
        x, query, residual, down_weight, down_bias, up_weight, up_bias_scaled, segment, query_weight, query_bias,
        key_weight, key_bias, value_weight, code, float(temperature), float(dropout_p), bool(training),
        bool(residual_before), float(negative_slope),
    )


def _torch_forward(x, query, residual, down_weight, down_bias, up_weight, up_bias_scaled, segment, query_weight,
                   query_bias, key_weight, key_bias, value_weight, activation, temperature, dropout_p, training,
                   residual_before, negative_slope):
    from pefops.ops.fusion_mix import fusion_mix

    adapters = up_bias_scaled.shape[0]
    tokens, units = math.prod(x.shape[:-1]), up_weight.shape[1]
    a = activation_forward(F.linear(x, down_weight, down_bias), activation, negative_slope)  # [..., R]
    if tokens > units and not residual_before:
        # Fold the query and key matrices into the adapters once per call (H²·R work, independent of
        # the token count): per token only H×R products remain, no H×H one.
        key_up = key_weight @ up_weight if key_weight is not None else up_weight  # W_k U [H, R]
        key_bias_up = key_weight @ up_bias_scaled.t() if key_weight is not None else up_bias_scaled.t()  # [H, N]
        query_key_up = query_weight.t() @ key_up if query_weight is not None else key_up
        query_key_bias = query_weight.t() @ key_bias_up if query_weight is not None else key_bias_up
        t_ = query @ query_key_up
        bias_scores = query @ query_key_bias
        if query_bias is not None:
            t_ = t_ + query_bias @ key_up
            bias_scores = bias_scores + query_bias @ key_bias_up
        if key_weight is not None and key_bias is not None:  # q·b_k: one value per token, for every adapter
            query_dot_key_bias = query @ (query_weight.t() @ key_bias if query_weight is not None else key_bias)
            if query_bias is not None:
                query_dot_key_bias = query_dot_key_bias + query_bias @ key_bias
            bias_scores = bias_scores + query_dot_key_bias.unsqueeze(-1)
    else:
        q = F.linear(query, query_weight, query_bias) if query_weight is not None else query
        qk = q @ key_weight if key_weight is not None else q  # W_kᵀ q, row-wise
        t_ = qk @ up_weight
        bias_scores = qk @ up_bias_scaled.t()  # [..., N]
        if key_weight is not None and key_bias is not None:
            bias_scores = bias_scores + (q * key_bias).sum(-1, keepdim=True)
        if residual_before:
            bias_scores = bias_scores + (qk * residual).sum(-1, keepdim=True)
    # segment is 0..0 1..1 ... (checked in adapter_fusion): adapter i owns units offsets[i] .. offsets[i + 1] - 1
    offsets = torch.searchsorted(segment, torch.arange(adapters + 1, device=segment.device, dtype=segment.dtype))
    # the dropout mask as F.dropout(scores) would draw it (same shape, same random stream), scaled by 1 / (1 - p)
    mask = F.dropout(torch.ones_like(bias_scores), dropout_p, True) if training and dropout_p > 0 else None
    # w = a ⊙ p[segment] [..., R], p = softmax(dropout(Σ_segment (qk U ⊙ a) + bias_scores) / T) [..., N]
    w, probabilities = fusion_mix(t_, a, bias_scores, offsets, temperature, mask)
    if value_weight is not None and not residual_before and tokens > units:
        # W_v Σ p_i up_i = w (W_v U)ᵀ + p (C W_vᵀ): the value matrix folded in once per call too
        return w @ (value_weight @ up_weight).t() + probabilities @ (up_bias_scaled @ value_weight.t()) + residual
    mix = w @ up_weight.t() + probabilities @ up_bias_scaled  # Σ p_i up_i
    if residual_before:
        mix = mix + residual
    if value_weight is not None:
        mix = F.linear(mix, value_weight)
    return mix if residual_before else mix + residual


def adapter_fusion_eager(x, query, residual, ups, *, query_weight=None, query_bias=None, key_weight=None,
                         key_bias=None, value_weight=None, temperature=1.0, dropout_p=0.0, training=False,
                         residual_before=False, value_before_softmax=True):
    """AdapterHub's BertFusion on precomputed adapter outputs `ups` [..., N, H]: the oracle and the
    benchmark's eager provider (it materialises [tokens, N, H] and projects every adapter output)."""
    value = ups
    if residual_before:
        value = value + residual.unsqueeze(-2)
    key_input = value if residual_before else ups  # AdapterHub adds in place to the shared tensor
    q = F.linear(query, query_weight, query_bias) if query_weight is not None else query
    k = F.linear(key_input, key_weight, key_bias) if key_weight is not None else key_input
    v = F.linear(value, value_weight) if value_weight is not None and value_before_softmax else value
    scores = (q.unsqueeze(-2) @ k.transpose(-2, -1)).squeeze(-2)
    scores = F.dropout(scores, dropout_p, training)
    probabilities = torch.softmax(scores / temperature, dim=-1)
    context = (probabilities.unsqueeze(-2) @ v).squeeze(-2)
    if value_weight is not None and not value_before_softmax:
        context = F.linear(context, value_weight)
    return context if residual_before else context + residual


def fusion_regularization_loss(value_weight: torch.Tensor) -> torch.Tensor:
    """AdapterHub's regulariser of one dynamic fusion layer: 0.01 · ‖I − W_v‖²."""
    identity = torch.eye(value_weight.shape[0], dtype=value_weight.dtype, device=value_weight.device)
    return 0.01 * (identity - value_weight).pow(2).sum()


backends.register(backends.Implementation(
    op=OP, backend="torch", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES + (torch.float64,), has_backward=True,
    functions={"forward": _torch_forward},
))
