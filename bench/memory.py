"""Peak memory of one call: the most memory it allocated above what was allocated before it
(inputs, weights and the module are excluded; the outputs are included).

GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
``memory_allocated()`` before the call (method "cuda.max_memory_allocated").
CPU: the running sum of torch CPU allocator events recorded by ``torch.profiler`` with
``profile_memory=True`` during one call, its maximum (method "torch.profiler.profile_memory").
tracemalloc cannot see torch's allocator and the process max-RSS high-water mark cannot be reset
per call, so neither is used.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (the Kineto profiler prints start/stop lines and a GPU-count error on CPU hosts)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[int | None, str]:
    """Peak bytes allocated by one call above what was allocated before it; and the method used."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak), "cuda.max_memory_allocated"
    method = "torch.profiler.profile_memory"
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fn()
                del out
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        running = peak = 0
        for event in events:
            running += event.nbytes()
            peak = max(peak, running)
        return int(peak), method
    except Exception as error:  # noqa: BLE001 - memory is a nice-to-have on CPU
        return None, f"unavailable ({type(error).__name__})"
