"""What the pytest-benchmark wrappers (bench/test_*.py) share: inputs built once per CPU shape
through an op's setup function, the provider's callable (skipping providers that cannot run),
the parametrised timed test (one call with the row's metadata), and the check that two providers
agree."""

from __future__ import annotations

import functools
import json
from typing import Callable

import pytest
import torch

from bench.agreement import max_rel_err
from bench.interface import NotApplicable, ProviderUnavailable

MODES = ("fwd", "fwd+bwd")


class CpuCases:
    """`setup_function(config)` of one op family on its test shapes, cached per shape (every provider
    and mode of a shape share one set of inputs, as in `python -m bench`); `shape_id(shape)` names
    a shape in the test ids."""

    def __init__(self, op: str, setup_function: Callable[[dict], object], shapes: list[dict],
                 shape_id: Callable[[dict], str]):
        self.op, self.shapes, self.shape_id = op, shapes, shape_id
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

    def parametrize(self, providers: list[str] | None = None, shapes: list[dict] | None = None,
                    modes: tuple[str, ...] = MODES):
        """Decorator: the test runs for every shape (default: all of them), provider (when given;
        the test then takes a `provider` argument) and mode, with ids shape-provider-mode."""

        def decorate(test):
            test = pytest.mark.parametrize("shape", self.shapes if shapes is None else shapes, ids=self.shape_id)(test)
            if providers is not None:
                test = pytest.mark.parametrize("provider", providers)(test)
            return pytest.mark.parametrize("mode", modes)(test)

        return decorate

    def benchmark_test(self, providers: list[str]):
        """The pytest-benchmark test of every shape, provider and mode (assign it to a test_* name)."""

        @self.parametrize(providers)
        def test(benchmark, shape, provider, mode):
            self.benchmark(benchmark, shape, self.shape_id(shape), provider, mode)

        return test

    def compare(self, shape: dict, provider: str, reference: str, mode: str, tolerance: float = 1e-4):
        """One call of `provider` and of `reference` on the shape's shared inputs; asserts that the
        outputs (in fwd+bwd: every gradient) agree to `tolerance` by max_rel_err. Returns (setup,
        out, ref) for the caller's own checks."""
        setup, fn = self.fn(shape, provider, mode)
        _, reference_fn = self.fn(shape, reference, mode)
        out, ref = fn(), reference_fn()
        err = max_rel_err(out, ref)
        assert err is not None and err < tolerance, f"{provider} {mode}: max relative error {err} vs {reference}"
        return setup, out, ref
