"""Timing one provider's call.

GPU: ``triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8])`` (L2 flushed before
every call by do_bench; CUDA events and the same flush where triton is missing). CPU:
``time.perf_counter`` around single calls after a warm-up, the providers of one case interleaved,
median / p20 / p80 of the repeats (same quantile rule, torch.quantile, as do_bench).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Timing:
    warmup_ms: float
    rep_ms: float
    min_reps: int = 5
    max_reps: int = 10_000

    @staticmethod
    def default(device: str) -> "Timing":
        if device.startswith("cuda"):
            return Timing(warmup_ms=25.0, rep_ms=50.0)
        return Timing(warmup_ms=50.0, rep_ms=500.0)


def quantiles_ms(times_ms: Sequence[float]) -> list[float]:
    t = torch.tensor(list(times_ms), dtype=torch.float64)
    return torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], timing: Timing, rounds: int = 5,
                         calls: tuple[int, int] | None = None,
                         ) -> tuple[dict[str, tuple[list[float], int]], dict[str, BaseException]]:
    """CPU timing of several providers, interleaved: after a warm-up of each, `rounds` rounds in which
    every provider runs its share of repeats in turn, so that load from other processes that comes
    and goes hits all providers alike. Per provider: ([median, p20, p80] ms, repeats); and the
    providers that raised, with their error. `calls` = (warm-up calls, timed calls) fixes the counts
    instead of deriving them from `timing` (the timed calls still interleaved, one per round)."""
    clock = time.perf_counter
    if calls is not None:
        warm_calls, timed_calls = max(0, int(calls[0])), max(1, int(calls[1]))
        rounds = min(rounds, timed_calls)
    fns = dict(fns)
    failed: dict[str, BaseException] = {}
    reps: dict[str, int] = {}
    for name, fn in list(fns.items()):
        try:
            if calls is not None:
                for _ in range(warm_calls):
                    fn()
                reps[name] = math.ceil(timed_calls / rounds)
                continue
            start, count = clock(), 0
            while count < 2 or (clock() - start) * 1e3 < timing.warmup_ms:
                fn()
                count += 1
        except Exception as error:  # noqa: BLE001
            failed[name] = error
            del fns[name]
            continue
        estimate_ms = max((clock() - start) * 1e3 / count, 1e-6)
        total = min(max(timing.rep_ms / estimate_ms, timing.min_reps), timing.max_reps)
        reps[name] = max(1, math.ceil(total / rounds))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in list(fns.items()):
            try:
                for _ in range(reps[name]):
                    t0 = clock()
                    fn()
                    samples[name].append((clock() - t0) * 1e3)
            except Exception as error:  # noqa: BLE001
                failed[name] = error
                del fns[name]
    return {name: (quantiles_ms(samples[name]), len(samples[name])) for name in fns}, failed


def time_cuda(fn: Callable[[], Any], timing: Timing) -> tuple[list[float], int | None]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, timing)
    return list(do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, quantiles=list(QUANTILES))), None


def _time_cuda_events(fn: Callable[[], Any], timing: Timing) -> tuple[list[float], int]:
    """do_bench's method without triton: CUDA events around each call, L2 flushed before each."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-4)
    for _ in range(max(1, int(timing.warmup_ms / estimate_ms))):
        fn()
    reps = max(1, int(timing.rep_ms / estimate_ms))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return quantiles_ms([s.elapsed_time(e) for s, e in events]), reps
