"""pytest-benchmark wrappers for prefix attention: `pytest bench/ --benchmark-only`.

Small CPU shapes, both providers, fwd and fwd+bwd, through the same `setup_prefix_attention` that
`python -m bench` uses. Without --benchmark-only, `test_providers_agree` also checks that
pefops.ops.prefix_attention computes the same output and gradients (q, k, v and the shared prefix)
as the concatenating SDPA baseline, and `test_concat_sdpa_is_prefix_attention` that the baseline is
the operation itself (pefops' float64 reference).
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.prefix_attention import concat_sdpa, setup_prefix_attention  # noqa: E402
from bench.agreement import max_rel_err  # noqa: E402
from bench.testing import CpuCases  # noqa: E402

SHAPES = [
    {"batch": 2, "heads": 4, "seq": 33, "prefix": 5, "head_dim": 16},
    {"batch": 3, "heads": 4, "kv_heads": 2, "seq": 20, "prefix": 7, "head_dim": 8, "causal": False, "padding": True},
]
PROVIDERS = ["concat_sdpa", "pefops"]


def _id(shape: dict) -> str:
    return (f"B{shape['batch']}-H{shape['heads']}/{shape.get('kv_heads', shape['heads'])}-S{shape['seq']}"
            f"-P{shape['prefix']}-D{shape['head_dim']}" + ("" if shape.get("causal", True) else "-full")
            + ("-pad" if shape.get("padding") else ""))


CASES = CpuCases("prefix_attention", setup_prefix_attention, SHAPES, _id)
test_prefix_attention = CASES.benchmark_test(PROVIDERS)


@CASES.parametrize()
def test_providers_agree(shape, mode):
    _, out, ref = CASES.compare(shape, "pefops", "concat_sdpa", mode)
    if mode == "fwd+bwd":
        assert len(out) == len(ref) == 5  # dq, dk, dv, dprefix_k, dprefix_v


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_concat_sdpa_is_prefix_attention(shape):
    from pefops.ops import prefix_attention_ref

    setup = CASES.setup(shape)
    exact = [t.detach().double() for t in setup.grad_inputs]
    causal = setup.config["causal"]
    expected = prefix_attention_ref(*exact, attention_mask=setup.key_padding, causal=causal)
    with torch.no_grad():
        out = concat_sdpa(*exact, causal, setup.key_padding)
    assert max_rel_err(out, expected) < 1e-10


def test_work_counts():
    setup = setup_prefix_attention({"batch": 2, "heads": 4, "seq": 8, "prefix": 3, "head_dim": 16,
                                    "device": "cpu", "dtype": torch.float32})
    pairs = 2 * 4 * (8 * 3 + 8 * 9 // 2)  # prefix pairs + causal sequence pairs
    assert setup.pairs() == pairs
    assert setup.work("pefops", "fwd").flops == 2 * pairs * 32
    assert setup.work("pefops", "fwd+bwd").flops == 2 * pairs * 32 + 2 * pairs * 80
