"""The headline call of every op family, fwd + bwd, at two sizes: "real" (the benchmark headline
shapes, bf16, on a GPU) and "small" (odd sizes for the Triton interpreter on CPU).

One table used three ways:
  - `python -m bench.headline` (bench/gpu_check.sh's warm-up): runs each case once on the device
    and reports the first call (compilation, autotuning under PEFOPS_AUTOTUNE_CONFIGS) and the
    second call per family, so the tests and benchmarks after it find the Triton cache warm;
  - tests/ops/test_gpu_headline.py (gpu tier): each case against the torch backend in fp32, under
    torch.cuda.set_sync_debug_mode("error"), and captured in a CUDA graph and replayed;
  - tests/ops/test_no_host_sync.py (CPU, interpreter): each case's Triton path at the small size
    with Tensor.item / __bool__ / tolist / __int__ / __float__ made to raise.

A case: build(device, dtype, size, seed) -> Call with `run(backend)` (the op's output, one tensor),
`inputs` (the leaves that get gradients) and `reference_dtype` ("float32": compare with the torch
backend on fp32 copies; "same": with the torch backend in the same dtype, for LSH, whose bucket
choice itself depends on the rounding of the hashed vectors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

import torch

SIZES = ("real", "small")


@dataclasses.dataclass
class Call:
    run: Callable[[str | None], torch.Tensor]
    inputs: list[torch.Tensor]
    reference_dtype: str = "float32"


def _tensor_factory(device, dtype, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False, dtype_=None):
        t = (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype_ or dtype)
        return t.requires_grad_(grad)

    return randn


def bottleneck_adapter(device, dtype, size, seed=0, layer_norm=False):
    from pefops.ops import bottleneck_adapter as op

    T, H, r = (16384, 4096, 64) if size == "real" else (33, 48, 8)
    randn = _tensor_factory(device, dtype, seed)
    x = randn(T, H, grad=True)
    wd, bd = randn(r, H, scale=H ** -0.5, grad=True), randn(r, scale=0.1, grad=True)
    wu, bu = randn(H, r, scale=r ** -0.5, grad=True), randn(H, scale=0.1, grad=True)
    inputs = [x, wd, bd, wu, bu]
    ln = None
    if layer_norm:
        lnw, lnb = randn(H, scale=0.1, grad=True), randn(H, scale=0.1, grad=True)
        with torch.no_grad():
            lnw += 1
        inputs += [lnw, lnb]
        ln = (lnw, lnb, 1e-5)
    return Call(lambda backend: op(x, wd, bd, wu, bu, activation="relu", scaling=0.5, layer_norm=ln, backend=backend),
                inputs)


def bottleneck_adapter_ln(device, dtype, size, seed=0):
    return bottleneck_adapter(device, dtype, size, seed, layer_norm=True)


def multi_adapter(device, dtype, size, seed=0):
    from pefops.ops import multi_adapter as op

    B, S, H, r, N = (64, 512, 4096, 64, 16) if size == "real" else (4, 9, 48, 8, 3)
    randn = _tensor_factory(device, dtype, seed)
    x = randn(B, S, H, grad=True)
    wd, bd = randn(N, r, H, scale=H ** -0.5, grad=True), randn(N, r, scale=0.1, grad=True)
    wu, bu = randn(N, H, r, scale=r ** -0.5, grad=True), randn(N, H, scale=0.1, grad=True)
    index = (torch.arange(B) * 7 % N).to(device)
    return Call(lambda backend: op(x, index, wd, bd, wu, bu, activation="relu", scaling=0.5, backend=backend),
                [x, wd, bd, wu, bu])


def _masked_inference(rows, device, dtype, size, seed):
    from pefops.ops import masked_linear, pack_mask

    M, N, K = (rows, 4096, 4096) if size == "real" else (min(rows, 7), 40, 24)
    randn = _tensor_factory(device, dtype, seed)
    x, w, b = randn(M, K), randn(N, K, scale=K ** -0.5), randn(N, scale=0.1)
    packed = pack_mask(randn(N, K, dtype_=torch.float32) > 0)
    return Call(lambda backend: masked_linear(x, w, packed, b, backend=backend), [])


def masked_linear_prefill(device, dtype, size, seed=0):
    """Inference with a frozen mask (no gradients: inputs are empty)."""
    return _masked_inference(2048, device, dtype, size, seed)


def masked_linear_decode(device, dtype, size, seed=0):
    return _masked_inference(1, device, dtype, size, seed)


def masked_linear_training(device, dtype, size, seed=0):
    from pefops.ops import masked_linear_scores

    M, N, K = (8192, 4096, 4096) if size == "real" else (7, 40, 24)
    randn = _tensor_factory(device, dtype, seed)
    x, w, b = randn(M, K, grad=True), randn(N, K, scale=K ** -0.5), randn(N, scale=0.1, grad=True)
    scores = randn(N, K, grad=True, dtype_=torch.float32)
    return Call(lambda backend: masked_linear_scores(x, w, scores, 0.0, b, backend=backend), [x, scores, b])


def fusion_mix(device, dtype, size, seed=0):
    from pefops.ops import fusion_mix as op

    T, N, r = (16384, 8, 64) if size == "real" else (13, 3, 5)
    randn = _tensor_factory(device, dtype, seed)
    t_, a, bias = randn(T, N * r, grad=True), randn(T, N * r, grad=True), randn(T, N, grad=True)
    offsets = torch.arange(N + 1, device=device) * r
    return Call(lambda backend: torch.cat(op(t_, a, bias, offsets, 1.0, backend=backend), dim=-1), [t_, a, bias])


def adapter_fusion(device, dtype, size, seed=0):
    """AdapterFusion over N frozen adapters (stacked once), learnable query/key/value; its one
    backend is torch, whose middle step (fusion_mix) runs on Triton on a GPU."""
    from pefops.ops import adapter_fusion as op, stack_adapters

    T, H, N, r = (16384, 1024, 8, 64) if size == "real" else (11, 24, 3, 4)
    randn = _tensor_factory(device, dtype, seed)
    downs = [randn(r, H, scale=H ** -0.5) for _ in range(N)]
    ups = [randn(H, r, scale=r ** -0.5) for _ in range(N)]
    down_biases = [randn(r, scale=0.1) for _ in range(N)]
    up_biases = [randn(H, scale=0.1) for _ in range(N)]
    stacked = stack_adapters(downs, down_biases, ups, up_biases, [1.0] * N)
    x, query, residual = randn(T, H, grad=True), randn(T, H, grad=True), randn(T, H, grad=True)
    qw, kw, vw = (randn(H, H, scale=H ** -0.5, grad=True) for _ in range(3))
    qb, kb = randn(H, scale=0.1, grad=True), randn(H, scale=0.1, grad=True)
    return Call(lambda backend: op(x, query, residual, *stacked, query_weight=qw, query_bias=qb, key_weight=kw,
                                   key_bias=kb, value_weight=vw, backend=None if backend == "triton" else backend),
                [x, query, residual, qw, qb, kw, kb, vw])


def gated_blend(device, dtype, size, seed=0):
    from pefops.ops import gated_blend as op

    T, C = (16384, 4096) if size == "real" else (9, 40)
    randn = _tensor_factory(device, dtype, seed)
    a, b, alpha = randn(T, C, grad=True), randn(T, C, grad=True), randn(C, grad=True)
    return Call(lambda backend: op(a, b, alpha, 0.5, backend=backend), [a, b, alpha])


def prefix_attention(device, dtype, size, seed=0):
    from pefops.ops import prefix_attention as op

    B, Hh, S, P, D = (4, 16, 2048, 200, 64) if size == "real" else (2, 2, 33, 5, 16)
    randn = _tensor_factory(device, dtype, seed)
    q, k, v = (randn(B, Hh, S, D, grad=True) for _ in range(3))
    pk, pv = randn(Hh, P, D, grad=True), randn(Hh, P, D, grad=True)
    return Call(lambda backend: op(q, k, v, pk, pv, causal=True, backend=backend), [q, k, v, pk, pv])


def lsh_attention(device, dtype, size, seed=0):
    from pefops.ops import lsh_attention as op, lsh_rotations

    B, Hh, S, D, nh, chunk, buckets = (1, 8, 16384, 64, 4, 64, 256) if size == "real" else (1, 2, 64, 16, 2, 8, 8)
    randn = _tensor_factory(device, dtype, seed)
    qk, v = randn(B, Hh, S, D, grad=True), randn(B, Hh, S, D, grad=True)
    torch.manual_seed(seed)
    rotations = lsh_rotations(Hh, D, nh, buckets, device=device, dtype=dtype)
    return Call(lambda backend: op(qk, v, num_hashes=nh, num_buckets=buckets, chunk_length=chunk, causal=True,
                                   rotations=rotations, backend=backend), [qk, v], reference_dtype="same")


def adapter_fusion_module(device, dtype, size, seed=0):
    """nn.AdapterFusion over N BottleneckAdapters (the layer a patched model calls every step):
    stacking the frozen adapters is part of each call unless cached."""
    from pefops.nn import AdapterFusion, BottleneckAdapter

    T, H, N, r = (16384, 1024, 8, 64) if size == "real" else (11, 24, 3, 4)
    torch.manual_seed(seed)
    adapters = [BottleneckAdapter(H, r, scaling=0.5 + i, init="bert", device=device, dtype=dtype) for i in range(N)]
    for adapter in adapters:
        adapter.requires_grad_(False)
        with torch.no_grad():
            adapter.up_proj.weight.normal_(0, r ** -0.5)
    fusion = AdapterFusion(H, "dynamic").to(device=device, dtype=dtype)
    randn = _tensor_factory(device, dtype, seed)
    x, query, residual = randn(T, H, grad=True), randn(T, H, grad=True), randn(T, H, grad=True)
    return Call(lambda backend: fusion(x, query, residual, adapters),
                [x, query, residual, *[p for p in fusion.parameters()]])


def masked_linear_routed(device, dtype, size, seed=0):
    """A mixed-task batch over one frozen weight: sequence b uses task row_task[b]'s mask."""
    from pefops.ops import masked_linear_routed as op, pack_mask

    B, S, N, K, tasks = (16, 512, 4096, 4096, 4) if size == "real" else (5, 3, 40, 24, 3)
    randn = _tensor_factory(device, dtype, seed)
    x, w, b = randn(B, S, K, grad=True), randn(N, K, scale=K ** -0.5), randn(N, scale=0.1, grad=True)
    masks = torch.stack([pack_mask(randn(N, K, dtype_=torch.float32) > 0) for _ in range(tasks)])
    row_task = (torch.arange(B) * 5 % tasks).to(device)
    return Call(lambda backend: op(x, w, masks, row_task, b), [x, b])


def lsh_attention_padded(device, dtype, size, seed=0):
    """LSH attention with a padding mask (transformers' extra padding bucket)."""
    from pefops.ops import lsh_attention as op, lsh_rotations

    B, Hh, S, D, nh, chunk, buckets = (2, 8, 4096, 64, 4, 64, 64) if size == "real" else (2, 2, 32, 16, 2, 8, 4)
    randn = _tensor_factory(device, dtype, seed)
    qk, v = randn(B, Hh, S, D, grad=True), randn(B, Hh, S, D, grad=True)
    mask = torch.ones(B, S, dtype=torch.long, device=device)
    mask[1, S - S // 4:] = 0
    torch.manual_seed(seed)
    rotations = lsh_rotations(Hh, D, nh, buckets, device=device, dtype=dtype)
    return Call(lambda backend: op(qk, v, num_hashes=nh, num_buckets=buckets, chunk_length=chunk, causal=False,
                                   attention_mask=mask, rotations=rotations, backend=backend), [qk, v],
                reference_dtype="same")


# family -> cases, headline first. The families are the benchmark registry's (bench/interface.py).
CASES: dict[str, dict[str, Callable]] = {
    "bottleneck_adapter": {"bottleneck_adapter": bottleneck_adapter, "bottleneck_adapter_ln": bottleneck_adapter_ln},
    "multi_adapter": {"multi_adapter": multi_adapter},
    "masked_linear": {"masked_linear_prefill": masked_linear_prefill, "masked_linear_decode": masked_linear_decode,
                      "masked_linear_training": masked_linear_training, "masked_linear_routed": masked_linear_routed},
    "adapter_fusion": {"adapter_fusion": adapter_fusion, "fusion_mix": fusion_mix,
                       "adapter_fusion_module": adapter_fusion_module},
    "side_tuning": {"gated_blend": gated_blend},
    "prefix_attention": {"prefix_attention": prefix_attention},
    "lsh_attention": {"lsh_attention": lsh_attention, "lsh_attention_padded": lsh_attention_padded},
}
ALL_CASES = {name: build for cases in CASES.values() for name, build in cases.items()}


def forward_backward(call: Call, backend: str | None, grad_seed: int = 1):
    """(output, gradients of every input) against a fixed random upstream gradient."""
    out = call.run(backend)
    if not call.inputs:
        return out, []
    generator = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)
    return out, list(torch.autograd.grad(out, call.inputs, grad, allow_unused=True))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def warm_up(families, device, dtype, size, backend=None) -> list[dict]:
    """Run each case twice (fwd + bwd); report the first and second call times (s) per case."""
    rows = []
    for family in families:
        for name, build in CASES[family].items():
            row = {"family": family, "case": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                   "size": size}
            try:
                call = build(device, dtype, size)
                times = []
                for _ in range(2):
                    _sync(device)
                    start = time.perf_counter()
                    forward_backward(call, backend)
                    _sync(device)
                    times.append(time.perf_counter() - start)
                row.update(first_s=round(times[0], 3), second_s=round(times[1], 4), status="ok")
                del call
            except Exception as error:  # noqa: BLE001 - a warm-up reports and goes on
                row.update(status=f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            print(json.dumps(row), flush=True)
            rows.append(row)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(CASES), help="comma-separated op families")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default=None, help="default: real on cuda, small on cpu")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("real" if device.type == "cuda" else "small")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(CASES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {list(CASES)}")
    print(f"warm-up: {families} on {device} ({size}, {dtype}), {os.environ.get('PEFOPS_AUTOTUNE_CONFIGS', 'all')} "
          "autotune configs", flush=True)
    start = time.perf_counter()
    rows = warm_up(families, device, dtype, size)
    total = time.perf_counter() - start
    print(f"{'family':<20} {'case':<24} {'first call s':>12} {'second ms':>10}  status")
    per_family: dict[str, float] = {}
    for row in rows:
        per_family[row["family"]] = per_family.get(row["family"], 0.0) + row.get("first_s", 0.0)
        second = f"{row['second_s'] * 1e3:10.2f}" if "second_s" in row else f"{'-':>10}"
        print(f"{row['family']:<20} {row['case']:<24} {row.get('first_s', math.nan):12.2f} {second}  {row['status']}")
    print("first-call (compile) seconds per family: " + ", ".join(f"{k} {v:.1f}" for k, v in per_family.items())
          + f"; total {total:.1f}s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"rows": rows, "per_family_first_s": per_family, "total_s": total}, handle, indent=1)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
