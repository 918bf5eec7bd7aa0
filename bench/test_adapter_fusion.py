"""pytest-benchmark wrappers for AdapterFusion: `pytest bench/ --benchmark-only`.

A tiny CPU shape, every provider, fwd and fwd+bwd, through the same `setup_adapter_fusion` that
`python -m bench` uses. Without --benchmark-only, `test_providers_agree` also checks that compile
and pefops compute the same output (and gradients for x, query, residual and the fusion weights) as
the eager BertFusion formula, and `test_nofusion_is_one_adapter` that the nofusion baseline is one
plain adapter.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.adapter_fusion import setup_adapter_fusion  # noqa: E402
from bench.agreement import max_rel_err  # noqa: E402
from bench.testing import CpuCases  # noqa: E402

SHAPES = [
    {"tokens": 128, "hidden": 64, "adapters": 3, "r": 16},
]
PROVIDERS = ["eager", "compile", "pefops", "nofusion"]


def _id(shape: dict) -> str:
    return f"T{shape['tokens']}-H{shape['hidden']}-N{shape['adapters']}-r{shape['r']}"


CASES = CpuCases("adapter_fusion", setup_adapter_fusion, SHAPES, _id)
test_adapter_fusion = CASES.benchmark_test(PROVIDERS)


@CASES.parametrize(["compile", "pefops"])
def test_providers_agree(shape, provider, mode):
    setup, out, ref = CASES.compare(shape, provider, "eager", mode)
    if mode == "fwd+bwd":
        assert len(out) == len(ref) == 3 + len(setup.fusion_params)  # x, query, residual, fusion weights


def test_fusion_is_not_trivial():
    """The randomised fusion layer mixes the adapters (the softmax is neither uniform nor one-hot),
    so the providers-agree check compares a real mixture."""
    setup = CASES.setup(SHAPES[0])
    fusion = setup.fusion
    with torch.no_grad():
        ups = torch.stack([a.up_projection(setup.x) for a in setup.adapters], dim=-2)
        keys = fusion.key(ups)
        scores = (fusion.query(setup.query).unsqueeze(-2) @ keys.transpose(-2, -1)).squeeze(-2)
        p = torch.softmax(scores, dim=-1)
    top = p.max(-1).values.mean().item()
    assert 1.5 / SHAPES[0]["adapters"] < top < 0.95, top
    eye = torch.eye(SHAPES[0]["hidden"])
    assert (fusion.value.weight - eye).abs().max().item() > 0.01


def test_nofusion_is_one_adapter():
    """The nofusion baseline is adapters[0] on (x, residual): residual + up(relu(down(x)))."""
    shape = SHAPES[0]
    setup, fn = CASES.fn(shape, "nofusion", "fwd")
    out = fn()["nofusion"]
    adapter = setup.adapters[0]
    with torch.no_grad():
        expected = setup.residual + adapter.up_proj(torch.relu(adapter.down_proj(setup.x)))
    assert max_rel_err(out, expected) < 1e-5
