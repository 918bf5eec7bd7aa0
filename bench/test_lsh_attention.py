"""pytest-benchmark wrappers for LSH attention: `pytest bench/ --benchmark-only`.

Tiny CPU shapes, every provider, fwd and fwd+bwd, through the same `setup_lsh_attention` that
`python -m bench` uses. Without --benchmark-only, `test_pefops_equals_transformers` checks that
pefops.ops.lsh_attention (projections included) gives transformers' LSHSelfAttention output and the
gradients of the hidden states and both projection weights; `test_sdpa_is_full_causal_attention`
that the flash baseline is plain causal softmax attention; `test_quick_cpu_configs` that the runner's
quick CPU configurations build, run every provider and agree; `test_runner_rows` that a runner pass
yields rows with the required fields.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytest.importorskip("transformers")

from bench.lsh_attention import BENCHMARK, configs, default_num_buckets, setup_lsh_attention  # noqa: E402
from bench.agreement import max_rel_err  # noqa: E402
from bench.running import RunOptions, run  # noqa: E402
from bench.tables import summary_tables  # noqa: E402
from bench.testing import MODES, CpuCases  # noqa: E402
from bench.timing import Timing  # noqa: E402

SHAPES = [
    {"batch": 2, "seq": 256, "heads": 2, "head_dim": 32, "num_hashes": 2},
    {"batch": 1, "seq": 384, "heads": 3, "head_dim": 16, "num_hashes": 4, "num_buckets": [2, 4]},  # factorised
    {"batch": 1, "seq": 64, "heads": 2, "head_dim": 32, "num_hashes": 2},  # one chunk: full-attention path
]
PROVIDERS = ["transformers", "pefops", "sdpa"]
TOL = 1e-4  # fp32: exp/logsumexp orders differ between the two implementations


def _id(shape: dict) -> str:
    nb = shape.get("num_buckets")
    return f"B{shape['batch']}-S{shape['seq']}-H{shape['heads']}-D{shape['head_dim']}-nh{shape['num_hashes']}" + (
        f"-nb{'x'.join(map(str, nb))}" if nb else "")


CASES = CpuCases("lsh_attention", setup_lsh_attention, SHAPES, _id)
test_lsh_attention = CASES.benchmark_test(PROVIDERS)


@CASES.parametrize()
def test_pefops_equals_transformers(shape, mode):
    setup, out, ref = CASES.compare(shape, "pefops", "transformers", mode, TOL)
    if mode == "fwd+bwd":
        assert len(out) == len(ref) == 3  # d hidden, d query_key.weight, d value.weight
        assert all(g.abs().max() > 0 for g in ref)
    # the comparison can fail: another hash seed gives other buckets and another output
    if mode == "fwd" and shape["seq"] > 64:
        from pefops.ops.lsh_attention import lsh_attention

        c = setup.config
        with torch.no_grad():
            qk, v = setup._split(torch.nn.functional.linear(setup.hidden, setup.wqk)), setup._split(
                torch.nn.functional.linear(setup.hidden, setup.wv))
            other = lsh_attention(qk, v, num_hashes=c["num_hashes"], num_buckets=c["num_buckets"], chunk_length=64,
                                  causal=True, hash_seed=4321)
        assert max_rel_err(setup._merge(other), ref) > 1e-3


@pytest.mark.parametrize("shape", SHAPES[:1], ids=_id)
def test_sdpa_is_full_causal_attention(shape):
    setup, fn = CASES.fn(shape, "sdpa", "fwd")
    out = fn()
    with torch.no_grad():
        qk = setup._split(setup.hidden @ setup.wqk.T)
        v = setup._split(setup.hidden @ setup.wv.T)
        scores = qk @ qk.transpose(-1, -2) / math.sqrt(shape["head_dim"])
        S = shape["seq"]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        expected = setup._merge(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
    assert max_rel_err(out, expected) < 1e-5


def test_quick_cpu_configs():
    quick = configs("cpu", None, True)
    assert [c["seq"] for c in quick] == [1024, 4096]
    for c in quick:
        assert (c["batch"], c["heads"], c["head_dim"], c["num_hashes"], c["dtype"]) == (1, 4, 64, 4, torch.float32)
    assert configs("cpu", None, False)[:2] == quick
    # the GPU grid
    full = configs("cuda", None, False)
    assert {(c["batch"], c["num_hashes"], c["seq"]) for c in full} == {
        (b, nh, s) for b in (1, 8) for nh in (1, 4, 8) for s in (1024, 4096, 16384, 65536)}
    assert all(c["dtype"] == torch.bfloat16 and c["heads"] * c["head_dim"] == 512 for c in full)
    assert default_num_buckets(1024) == 32 and default_num_buckets(16384) == [16, 32]
    # the smaller quick config runs every provider in both modes; pefops agrees with transformers
    shape = {k: quick[0][k] for k in ("batch", "seq", "heads", "head_dim", "num_hashes")}
    for mode in MODES:
        setup, _, ref = CASES.compare(shape, "pefops", "transformers", mode, TOL)
        sdpa = CASES.fn(shape, "sdpa", mode)[1]()
        assert max_rel_err(sdpa, ref) is not None  # runs; a different function, no agreement expected
        for provider in PROVIDERS:
            work = setup.work(provider, mode)
            assert work.bytes > 0 and work.flops > 0


def test_work_counts():
    setup = CASES.setup(SHAPES[0])
    B, S, H, D, nh = 2, 256, 2, 32, 2
    fwd = setup.work("pefops", "fwd")
    assert fwd == setup.work("transformers", "fwd")
    T, C, N = B * S, H * D, B * H * nh * S
    R = sum([default_num_buckets(S)] if isinstance(default_num_buckets(S), int) else default_num_buckets(S)) // 2
    assert fwd.flops == 4 * T * C * C + 4 * N * 128 * D + 2 * B * H * S * D * nh * R
    assert fwd.bytes == 5 * T * C * 4 + 2 * C * C * 4 + 48 * N + 2 * N * (D * 4 + 4)
    assert setup.work("sdpa", "fwd").flops == 4 * T * C * C + 2 * B * H * D * S * (S + 1)
    assert setup.work("pefops", "fwd+bwd").flops > 2.9 * fwd.flops


def test_runner_rows():
    bench = dataclasses.replace(BENCHMARK, configs=lambda device, dtype, quick: [
        {**SHAPES[0], "device": "cpu", "dtype": torch.float32}])
    timing = Timing(warmup_ms=0.0, rep_ms=0.0, min_reps=1)
    result = run([bench], RunOptions(device="cpu", quick=True, timing=timing))
    assert not result.skipped, result.skipped
    rows = {(r["provider"], r["mode"]): r for r in result.rows}
    assert set(rows) == {(p, m) for p in PROVIDERS for m in MODES}
    for (provider, mode), r in rows.items():
        for key in ("op", "shape", "dtype", "device_name", "median_ms", "p20_ms", "p80_ms", "peak_memory_bytes",
                    "bytes", "flops", "gbps", "tflops", "note", "timestamp", "speedup_vs_transformers"):
            assert r.get(key) is not None, (provider, mode, key)
        if provider == "pefops":
            assert r["max_rel_err_vs_transformers"] < TOL
    table = summary_tables(result.rows, result.meta)
    assert "transformers peak MiB" in table and "pefops ms (× transformers)" in table
