"""pytest-benchmark wrappers for the bottleneck adapter: `pytest bench/ --benchmark-only`.

Small CPU shapes, every provider, fwd and fwd+bwd, through the same `setup_bottleneck_adapter` that
`python -m bench` uses. Without --benchmark-only, `test_providers_agree` also checks that every
provider computes the same output and gradients as the eager baseline.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.bottleneck_adapter import setup_bottleneck_adapter  # noqa: E402
from bench.runner import NotApplicable, ProviderUnavailable, max_rel_err  # noqa: E402

SHAPES = [
    {"tokens": 256, "hidden": 768, "r": 16},
    {"tokens": 1024, "hidden": 768, "r": 64, "layer_norm": True},
]
PROVIDERS = ["eager", "compile", "pefops"]
MODES = ["fwd", "fwd+bwd"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # as `python -m bench` does on CPU: one thread keeps timings meaningful on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _id(shape: dict) -> str:
    return f"T{shape['tokens']}-H{shape['hidden']}-r{shape['r']}" + ("-LN" if shape.get("layer_norm") else "")


@functools.lru_cache(maxsize=None)
def _setup(shape_json: str):
    # inputs built once per shape and shared by every provider and mode
    return setup_bottleneck_adapter({**json.loads(shape_json), "device": "cpu", "dtype": torch.float32})


def _fn(shape: dict, provider: str, mode: str):
    setup = _setup(json.dumps(shape, sort_keys=True))
    try:
        return setup, setup.fn(provider, mode)
    except (ProviderUnavailable, NotApplicable) as error:
        pytest.skip(f"{provider}: {error}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_bottleneck_adapter(benchmark, shape, provider, mode):
    setup, fn = _fn(shape, provider, mode)
    fn()  # compile / first-call work stays out of the measurement
    work = setup.work(provider, mode)
    benchmark.group = f"bottleneck_adapter {_id(shape)} {mode}"
    benchmark.extra_info.update({"provider": provider, "mode": mode, "shape": setup.shape,
                                 "dtype": "float32", "bytes": work.bytes, "flops": work.flops})
    benchmark(fn)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["compile", "pefops"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_providers_agree(shape, provider, mode):
    setup, fn = _fn(shape, provider, mode)
    _, reference = _fn(shape, "eager", mode)
    err = max_rel_err(fn(), reference())
    assert err is not None and err < 1e-4, f"{provider} {mode}: max relative error {err} vs eager"
