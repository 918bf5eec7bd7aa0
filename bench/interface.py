"""What an op family plugs into `python -m bench` with, and where the families are registered.

An op family provides one `OpBenchmark` (module attribute `BENCHMARK` of the module named in
`REGISTRY`):

* ``configs(device, dtype, quick)`` lists the configurations (plain dicts) to run on a device;
* ``setup(config)`` builds the inputs once for every provider and returns an object with
  ``shape`` (dict for the result row), ``dtype``, ``device`` and two methods:
  ``fn(provider, mode)`` -> a zero-argument callable doing one measured call (it raises
  `NotApplicable` when the provider has no such mode, `ProviderUnavailable` when it cannot run here),
  and ``work(provider, mode)`` -> `Work` (the explicit byte and flop counts);
  optionally ``describe(provider, mode)`` -> a short note stored with the row (backend used, settings).

bench/setup_helpers.py holds the pieces those set-up objects share; bench/running.py runs them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")

# op family -> module that defines BENCHMARK
REGISTRY: dict[str, str] = {
    "bottleneck_adapter": "bench.bottleneck_adapter",
    "masked_linear": "bench.masked_linear",
    "side_tuning": "bench.side_tuning",
    "adapter_fusion": "bench.adapter_fusion",
    "multi_adapter": "bench.multi_adapter",
    "lsh_attention": "bench.lsh_attention",
    "prefix_attention": "bench.prefix_attention",
}


class NotApplicable(Exception):
    """The provider has no such mode for this configuration: no row, no message."""


class ProviderUnavailable(Exception):
    """The provider cannot run here (missing package, failed compile): skipped with a message, and
    counted as a failure of the run (`python -m bench` exits non-zero) unless `expected=True`
    declares an absence that is normal on this machine (a CUDA-only provider on a CPU machine)."""

    def __init__(self, reason: str, expected: bool = False):
        super().__init__(reason)
        self.expected = expected


@dataclass(frozen=True)
class Work:
    """Explicit counts for one call: bytes that must move to/from memory, floating-point ops."""

    bytes: int | None = None
    flops: int | None = None


@dataclass
class OpBenchmark:
    name: str
    configs: Callable[[str, torch.dtype | None, bool], list[dict]]
    setup: Callable[[dict], Any]
    providers: tuple[str, ...]
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    baseline: str = "eager"  # speed-ups are relative to this provider
    subject: str | None = "pefops"  # the provider whose GB/s and TFLOP/s the summary table shows
    bandwidth_reference: str | None = "copy"  # provider whose GB/s is the "% of copy" denominator
    shape_columns: tuple[tuple[str, str], ...] = ()  # (shape key, column header); default: keys
    # (warm-up calls, timed calls) per provider on CPU instead of the time-based rule, for ops whose
    # one call takes seconds (the runner's first call of each provider is one more warm-up)
    cpu_calls: tuple[int, int] | None = None
    memory_columns: bool = False  # summary table: each provider's peak MiB and its % of the baseline's

    def info(self) -> dict:
        info = {
            "baseline": self.baseline,
            "subject": self.subject,
            "bandwidth_reference": self.bandwidth_reference,
            "providers": list(self.providers),
            "shape_columns": [list(c) for c in self.shape_columns],
        }
        if self.cpu_calls is not None:
            info["cpu_calls"] = list(self.cpu_calls)
        if self.memory_columns:
            info["memory_columns"] = True
        return info


def get_benchmark(name: str) -> OpBenchmark:
    if name not in REGISTRY:
        raise SystemExit(f"unknown op benchmark {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name]).BENCHMARK
