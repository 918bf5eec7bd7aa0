"""pytest-benchmark wrappers for the masked linear layer: `pytest bench/ --benchmark-only`.

Small CPU shapes, every provider, fwd (inference, packed mask) and fwd+bwd (training from scores),
through the same `setup_masked_linear` that `python -m bench` uses. Without --benchmark-only,
`test_providers_agree` also checks that every provider computes the same output (and gradients for
x, scores and bias) as the eager baseline.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.masked_linear import setup_masked_linear  # noqa: E402
from bench.interface import ProviderUnavailable  # noqa: E402
from bench.testing import CpuCases  # noqa: E402

SHAPES = [
    {"rows": 1, "out_features": 256, "in_features": 200},  # decode; K not a multiple of 8 (mask tail bits)
    {"rows": 256, "out_features": 512, "in_features": 512, "density": 0.25},  # prefill-like, sparser mask
]
PROVIDERS = ["eager", "compile", "dense", "pefops"]


def _id(shape: dict) -> str:
    return (f"rows{shape['rows']}-N{shape['out_features']}-K{shape['in_features']}"
            + (f"-d{shape['density']}" if "density" in shape else ""))


CASES = CpuCases("masked_linear", setup_masked_linear, SHAPES, _id)
test_masked_linear = CASES.benchmark_test(PROVIDERS)


@CASES.parametrize(["compile", "dense", "pefops"])
def test_providers_agree(shape, provider, mode):
    _, out, ref = CASES.compare(shape, provider, "eager", mode)
    if mode == "fwd+bwd":
        assert len(out) == len(ref) == 3  # dx, dscores, dbias
        assert out[1].dtype == ref[1].dtype == torch.float32  # the scores' gradient stays fp32


def test_mask_density_and_packing():
    """The mask kept has the requested density, and pefops' packed form is the bool mask."""
    shape = SHAPES[1]
    setup = CASES.setup(shape)
    assert abs(setup.mask.float().mean().item() - shape["density"]) < 0.02
    try:
        setup.fn("pefops", "fwd")
    except ProviderUnavailable as error:
        pytest.skip(str(error))
    from pefops.ops import unpack_mask

    assert torch.equal(unpack_mask(setup.packed, shape["in_features"]), setup.mask)
