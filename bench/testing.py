"""What the pytest-benchmark wrappers (bench/test_*.py) share: inputs built once per CPU shape
through an op's setup function, the provider's callable (skipping providers that cannot run),
and one timed call with the row's metadata."""

from __future__ import annotations

import functools
import json
from typing import Callable

import pytest
import torch

from bench.interface import NotApplicable, ProviderUnavailable


class CpuCases:
    """`setup_function(config)` of one op family, cached per shape (every provider and mode of a
    shape share one set of inputs, as in `python -m bench`)."""

    def __init__(self, op: str, setup_function: Callable[[dict], object]):
        self.op = op
        self._setup = functools.lru_cache(maxsize=None)(
            lambda shape_json: setup_function({**json.loads(shape_json), "device": "cpu", "dtype": torch.float32})
        )

    def setup(self, shape: dict):
        return self._setup(json.dumps(shape, sort_keys=True))

    def fn(self, shape: dict, provider: str, mode: str):
        setup = self.setup(shape)
        try:
            return setup, setup.fn(provider, mode)
        except NotApplicable:
            pytest.skip(f"{provider} has no {mode} mode")
        except ProviderUnavailable as error:
            pytest.skip(f"{provider}: {error}")

    def benchmark(self, benchmark, shape: dict, shape_id: str, provider: str, mode: str) -> None:
        setup, fn = self.fn(shape, provider, mode)
        fn()  # compile / first-call work stays out of the measurement
        work = setup.work(provider, mode)
        benchmark.group = f"{self.op} {shape_id} {mode}"
        benchmark.extra_info.update({"provider": provider, "mode": mode, "shape": setup.shape, "dtype": "float32",
                                     "bytes": work.bytes, "flops": work.flops,
                                     "note": setup.describe(provider, mode)})
        benchmark(fn)
