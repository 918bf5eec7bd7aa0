"""pytest-benchmark wrappers for the bottleneck adapter: `pytest bench/ --benchmark-only`.

Small CPU shapes, every provider, fwd and fwd+bwd, through the same `setup_bottleneck_adapter` that
`python -m bench` uses. Without --benchmark-only, `test_providers_agree` also checks that every
provider computes the same output and gradients as the eager baseline.
"""

from __future__ import annotations


import pytest

pytest.importorskip("pytest_benchmark")

from bench.bottleneck_adapter import setup_bottleneck_adapter  # noqa: E402
from bench.testing import CpuCases  # noqa: E402

SHAPES = [
    {"tokens": 256, "hidden": 768, "r": 16},
    {"tokens": 1024, "hidden": 768, "r": 64, "layer_norm": True},
]
PROVIDERS = ["eager", "compile", "pefops"]


def _id(shape: dict) -> str:
    return f"T{shape['tokens']}-H{shape['hidden']}-r{shape['r']}" + ("-LN" if shape.get("layer_norm") else "")


CASES = CpuCases("bottleneck_adapter", setup_bottleneck_adapter, SHAPES, _id)
test_bottleneck_adapter = CASES.benchmark_test(PROVIDERS)


@CASES.parametrize(["compile", "pefops"])
def test_providers_agree(shape, provider, mode):
    CASES.compare(shape, provider, "eager", mode)
