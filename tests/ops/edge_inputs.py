"""One small call of every public op, with any of its sizes chosen (zero included), for the edge-case
tests (tests/ops/test_edge_cases.py): `CALLS[name](backend, **sizes)` returns (run, leaves), where
run() calls the op on the leaves (tensors that require grad) and returns its output."""

from __future__ import annotations

import torch

from pefops.ops import (
    adapter_fusion,
    alpha_blend,
    bottleneck_adapter,
    fusion_mix,
    gated_blend,
    ladder_gate,
    lsh_attention,
    masked_linear,
    masked_linear_routed,
    masked_linear_scores,
    multi_adapter,
    pack_mask,
    prefix_attention,
    stack_adapters,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 17 * len(shape)))


def _leaf(*shape, seed=0, scale=1.0):
    return (_randn(*shape, seed=seed) * scale).requires_grad_()


def _layer_norm(hidden, leaves):
    """(weight, bias, eps) of an adapter LayerNorm, its two leaves appended to `leaves`."""
    norm_weight, norm_bias = _leaf(hidden, seed=6), _leaf(hidden, seed=7)
    leaves += [norm_weight, norm_bias]
    return norm_weight, norm_bias, 1e-5


def bottleneck(backend, batch=2, tokens=3, hidden=8, rank=4, layer_norm=False):
    x = _leaf(batch, tokens, hidden)
    dw, db, uw, ub = _leaf(rank, hidden, seed=1), _leaf(rank, seed=2), _leaf(hidden, rank, seed=3), _leaf(hidden, seed=4)
    scaling = _leaf(hidden, seed=5)
    leaves = [x, dw, db, uw, ub, scaling]
    norm = _layer_norm(hidden, leaves) if layer_norm else None

    def run():
        return bottleneck_adapter(x, dw, db, uw, ub, activation="gelu", scaling=scaling, layer_norm=norm,
                                  backend=backend)

    return run, leaves


def multi(backend, batch=3, tokens=2, hidden=8, rank=4, adapters=3, layer_norm=False):
    x = _leaf(batch, tokens, hidden)
    index = torch.arange(batch) % adapters
    dw, db = _leaf(adapters, rank, hidden, seed=1), _leaf(adapters, rank, seed=2)
    uw, ub = _leaf(adapters, hidden, rank, seed=3), _leaf(adapters, hidden, seed=4)
    scaling = _leaf(adapters, seed=5)
    leaves = [x, dw, db, uw, ub, scaling]
    norm = _layer_norm(hidden, leaves) if layer_norm else None

    def run():
        return multi_adapter(x, index, dw, db, uw, ub, activation="silu", scaling=scaling, layer_norm=norm,
                             backend=backend)

    return run, leaves


def fusion(backend, batch=2, tokens=3, hidden=8, rank=2, adapters=3):
    x, query, residual = _leaf(batch, tokens, hidden), _leaf(batch, tokens, hidden, seed=1), _leaf(batch, tokens, hidden, seed=2)
    downs = [_randn(rank, hidden, seed=10 + i) for i in range(adapters)]
    ups = [_randn(hidden, rank, seed=20 + i) for i in range(adapters)]
    stacked = stack_adapters(downs, [None] * adapters, ups, [None] * adapters, [1.0] * adapters)
    down_weight, down_bias, up_weight, up_bias, segment = stacked
    query_weight, key_weight, value_weight = (_leaf(hidden, hidden, seed=s, scale=0.3) for s in (3, 4, 5))
    leaves = [x, query, residual, query_weight, key_weight, value_weight]

    def run():
        return adapter_fusion(x, query, residual, down_weight, down_bias, up_weight, up_bias, segment,
                              query_weight=query_weight, key_weight=key_weight, value_weight=value_weight,
                              backend=backend)

    return run, leaves


def mix(backend, rows=5, units=6, adapters=3):
    t_, a, bias = _leaf(rows, units), _leaf(rows, units, seed=1), _leaf(rows, adapters, seed=2)
    # units spread over the adapters as evenly as they go (some may own none)
    offsets = torch.tensor([units * i // adapters for i in range(adapters + 1)])

    def run():
        w, p = fusion_mix(t_, a, bias, offsets, 0.7, backend=backend)
        return torch.cat([w.reshape(-1), p.reshape(-1)])

    return run, [t_, a, bias]


def _mask(out_features, in_features, seed=0):
    return pack_mask(torch.rand(out_features, in_features, generator=torch.Generator().manual_seed(seed)) > 0.5)


def masked(backend, rows=4, in_features=11, out_features=6):
    x, bias = _leaf(rows, in_features), _leaf(out_features, seed=1)
    weight, packed = _randn(out_features, in_features, seed=2), _mask(out_features, in_features)

    def run():
        return masked_linear(x, weight, packed, bias, backend=backend)

    return run, [x, bias]


def masked_scores(backend, rows=4, in_features=11, out_features=6):
    x, bias, scores = _leaf(rows, in_features), _leaf(out_features, seed=1), _leaf(out_features, in_features, seed=3)
    weight = _randn(out_features, in_features, seed=2)

    def run():
        return masked_linear_scores(x, weight, scores, 0.1, bias, backend=backend)

    return run, [x, bias, scores]


def masked_routed(backend, batch=3, tokens=2, in_features=11, out_features=6, tasks=2):
    x, bias = _leaf(batch, tokens, in_features), _leaf(out_features, seed=1)
    weight = _randn(out_features, in_features, seed=2)
    packed = torch.stack([_mask(out_features, in_features, seed=t) for t in range(tasks)])
    row_task = torch.arange(batch) % tasks

    def run():
        return masked_linear_routed(x, weight, packed, row_task, bias)  # torch only: no backend argument

    return run, [x, bias]


def _blend(op, temperature):
    def call(backend, rows=4, channels=5, per_channel=True):
        a, b = _leaf(rows, channels), _leaf(rows, channels, seed=1)
        alpha = _leaf(channels if per_channel else 1, seed=2)

        def run():
            if temperature is None:
                return op(a, b, alpha, backend=backend)
            return op(a, b, alpha, temperature, backend=backend)

        return run, [a, b, alpha]

    return call


def prefix(backend, batch=2, heads=2, queries=3, keys=4, prefix_length=2, dim=8):
    q, k, v = _leaf(batch, heads, queries, dim), _leaf(batch, heads, keys, dim, seed=1), _leaf(batch, heads, keys, dim, seed=2)
    prefix_k, prefix_v = _leaf(heads, prefix_length, dim, seed=3), _leaf(heads, prefix_length, dim, seed=4)

    def run():
        return prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend=backend)

    return run, [q, k, v, prefix_k, prefix_v]


def lsh(backend, batch=1, heads=2, seq=32, dim=8, chunk=8):
    qk, v = _leaf(batch, heads, seq, dim), _leaf(batch, heads, seq, dim, seed=1)

    def run():
        return lsh_attention(qk, v, num_hashes=2, num_buckets=4, chunk_length=chunk, causal=True, hash_seed=3,
                             backend=backend)

    return run, [qk, v]


CALLS = {
    "bottleneck_adapter": bottleneck,
    "multi_adapter": multi,
    "adapter_fusion": fusion,
    "fusion_mix": mix,
    "masked_linear": masked,
    "masked_linear_scores": masked_scores,
    "masked_linear_routed": masked_routed,
    "gated_blend": _blend(gated_blend, 0.5),
    "alpha_blend": _blend(alpha_blend, None),
    "ladder_gate": _blend(ladder_gate, 0.1),
    "prefix_attention": prefix,
    "lsh_attention": lsh,
}

# backends each op can be forced to (masked_linear_routed takes no backend; adapter_fusion is torch only)
BACKENDS = {name: ("torch", "triton") for name in CALLS}
BACKENDS["masked_linear_routed"] = (None,)
BACKENDS["adapter_fusion"] = ("torch",)
