"""pytest-benchmark wrappers for mixed-task adapter batches: `pytest bench/ --benchmark-only`.

A tiny CPU shape, every provider, fwd and fwd+bwd, through the same `setup_multi_adapter` that
`python -m bench` uses. Without --benchmark-only, `test_providers_agree` also checks that
pefops.ops.multi_adapter computes the same output (and gradients for x and the stacked weights) as
the PEFT-style loop, and `test_loop_is_per_sequence_adapter` that the loop is each sequence's own
bottleneck adapter.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.multi_adapter import setup_multi_adapter  # noqa: E402
from bench.agreement import max_rel_err  # noqa: E402
from bench.testing import CpuCases  # noqa: E402

SHAPES = [
    {"batch": 8, "seq": 16, "hidden": 64, "r": 8, "adapters": 4},
    {"batch": 6, "seq": 8, "hidden": 32, "r": 4, "adapters": 8},  # more adapters than sequences: some absent
]
PROVIDERS = ["loop", "pefops", "copy"]


def _id(shape: dict) -> str:
    return f"B{shape['batch']}-T{shape['seq']}-H{shape['hidden']}-r{shape['r']}-N{shape['adapters']}"


CASES = CpuCases("multi_adapter", setup_multi_adapter, SHAPES, _id)
test_multi_adapter = CASES.benchmark_test(PROVIDERS)


@CASES.parametrize()
def test_providers_agree(shape, mode):
    setup, out, ref = CASES.compare(shape, "pefops", "loop", mode)
    if mode == "fwd+bwd":
        assert len(out) == len(ref) == 5  # dx, d down_weight, d down_bias, d up_weight, d up_bias
        if len(set(setup.adapter_names)) < shape["adapters"]:
            absent = sorted(set(range(shape["adapters"])) - set(setup.adapter_names))
            for grad in out[1:]:
                assert torch.count_nonzero(grad[absent]) == 0  # adapters without rows get zeros


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_loop_is_per_sequence_adapter(shape):
    """The loop baseline gives every sequence its own adapter's output (checked with pefops'
    single-adapter reference, sequence by sequence)."""
    from pefops.ops import bottleneck_adapter_ref

    setup, fn = CASES.fn(shape, "loop", "fwd")
    out = fn()
    with torch.no_grad():
        for i, a in enumerate(setup.adapter_names):
            expected = bottleneck_adapter_ref(setup.x[i], setup.down_weight[a], setup.down_bias[a],
                                              setup.up_weight[a], setup.up_bias[a])
            assert max_rel_err(out[i], expected) < 1e-5, (i, a)
