"""The run loop of `python -m bench`: every configuration of every op family, every mode, every
provider; first calls and the numerical check against the baseline, timing (bench/timing.py), peak
memory (bench/memory.py), one result row per provider and mode (bench/results.py).

Speed-ups are ratios between providers measured in the same run (same process, same inputs): every
row carries ``speedup_vs_<baseline>`` computed only from rows of that run. A provider that fails is
skipped with its reason in the run's ``skipped`` list (a failure of the run unless declared
expected), and the run goes on; ``strict`` ends it instead.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bench.agreement import max_rel_err
from bench.environment import (device_name, device_slug, dtype_name, free_memory, loadavg, now_iso,
                               synchronize, versions)
from bench.interface import MODES, NotApplicable, OpBenchmark, ProviderUnavailable
from bench.memory import peak_memory
from bench.results import RunResult, jsonable, shape_label
from bench.timing import QUANTILES, Timing, time_cpu_interleaved, time_cuda


@dataclass
class RunOptions:
    device: str
    dtype: torch.dtype | None = None
    quick: bool = False
    modes: tuple[str, ...] | None = None
    providers: tuple[str, ...] | None = None
    timing: Timing | None = None
    budget_s: float | None = None
    strict: bool = False
    check: bool = True


class _Progress:
    """tqdm when installed (the GPU machine may lack it), else a line per config on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self._bar = None
        self._total, self._done = total, 0

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(text, refresh=True)

    def update(self, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _raise_recompile_limits() -> None:
    # Every configuration is a new module and often a new shape: without this, torch.compile would
    # fall back to eager silently after 8 recompiles and the "compile" rows would be mislabelled.
    try:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 4096))
    except Exception:  # noqa: BLE001
        pass


def run(benchmarks: Sequence[OpBenchmark], options: RunOptions,
        on_config_done: Callable[[RunResult], None] | None = None) -> RunResult:
    device = options.device
    timing = options.timing or Timing.default(device)
    dev_name = device_name(device)
    vers = versions()
    run_ts = now_iso()
    meta = {
        "run_started": run_ts,
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "device_name": dev_name,
        "device_slug": device_slug(device, dev_name),
        "cpu_threads": torch.get_num_threads(),
        "versions": vers,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "quick": options.quick,
        "autotune_configs": os.environ.get("PEFOPS_AUTOTUNE_CONFIGS", "") or "all",
        "loadavg_start": loadavg(),
        "timing": {"method": "triton.testing.do_bench" if device.startswith("cuda") else "time.perf_counter",
                   **dataclasses.asdict(timing), "quantiles": list(QUANTILES)},
        "ops": {b.name: b.info() for b in benchmarks},
        "argv": sys.argv,
        "complete": False,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        meta["cuda"] = {"capability": f"{props.major}.{props.minor}", "memory_bytes": props.total_memory,
                        "sm_count": props.multi_processor_count, "cuda_runtime": torch.version.cuda}
    result = RunResult(meta=meta, rows=[], skipped=[])
    _raise_recompile_limits()

    plan = []
    for bench in benchmarks:
        modes = tuple(m for m in bench.modes if options.modes is None or m in options.modes)
        if options.modes:
            modes += tuple(m for m in options.modes if m not in modes and m in MODES)
        providers = tuple(p for p in bench.providers if options.providers is None or p in options.providers)
        for config in bench.configs(device, options.dtype, options.quick):
            plan.append((bench, config, modes, providers))
    if any("bwd" in modes for _, _, modes, _ in plan):
        # bwd alone times autograd.grad(..., retain_graph=True) on one forward graph, which
        # torch.compile's donated buffers forbid; turn them off for the whole run and say so
        try:
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
            meta["compile_donated_buffer"] = False
        except (ImportError, AttributeError):
            pass
    total = sum(len(modes) * len(providers) for _, _, modes, providers in plan)
    progress = _Progress(total)
    t_start = time.monotonic()
    stopped_for_budget = False
    unavailable: dict[tuple[str, str], str] = {}  # (op, provider) -> reason already reported
    try:
        for bench, config, modes, providers in plan:
            n_cases = len(modes) * len(providers)
            if options.budget_s is not None and time.monotonic() - t_start > options.budget_s:
                if not stopped_for_budget:
                    progress.write(f"time budget of {options.budget_s:.0f}s spent: skipping the remaining configurations")
                stopped_for_budget = True
                result.skipped.append({"op": bench.name, "config": jsonable(config), "reason": "time budget spent",
                                       "failure": False})
                progress.update(n_cases)
                continue
            try:
                setup = bench.setup(config)
            except Exception as error:  # noqa: BLE001
                if options.strict:
                    raise
                msg = f"{bench.name} {config}: setup failed: {type(error).__name__}: {error}"
                progress.write(msg)
                result.skipped.append({"op": bench.name, "config": jsonable(config), "reason": msg,
                                       "failure": not getattr(error, "expected", False)})
                progress.update(n_cases)
                free_memory(device)
                continue
            config_rows: list[dict] = []
            for mode in modes:
                config_rows += _run_mode(bench, setup, mode, providers, device, timing, options, progress,
                                         result, unavailable, vers, dev_name)
            _add_speedups(config_rows, bench.baseline, exclude=bench.bandwidth_reference)
            result.rows.extend(config_rows)
            del setup
            free_memory(device)
            if on_config_done is not None:
                on_config_done(result)
    finally:
        progress.close()
    meta["complete"] = not stopped_for_budget
    meta["stopped_for_budget"] = stopped_for_budget
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_end"] = loadavg()
    meta["run_finished"] = now_iso()
    return result


def _run_mode(bench, setup, mode, providers, device, timing, options, progress, result, unavailable,
              vers, dev_name) -> list[dict]:
    """All providers of one configuration and mode: first calls (and the numerical check against the
    baseline), timing (CPU: interleaved), peak memory, rows. A failing provider is skipped with a
    message unless options.strict."""
    label = f"{bench.name} {shape_label(setup.shape)} {mode}"
    counted: set[str] = set()

    def done(provider: str) -> None:
        if provider not in counted:
            counted.add(provider)
            progress.update()

    def skip(provider: str, error: BaseException) -> None:
        if options.strict and not isinstance(error, ProviderUnavailable):
            raise error
        text = str(error).strip()
        reason = text if isinstance(error, ProviderUnavailable) else f"{type(error).__name__}: {text}"
        reason = (reason.splitlines() or [type(error).__name__])[0][:500]
        key = (bench.name, provider)
        if isinstance(error, ProviderUnavailable):
            if key not in unavailable:
                unavailable[key] = reason
                progress.write(f"skipping provider {provider!r} of {bench.name}: {reason}")
        else:
            progress.write(f"{label} {provider}: failed: {reason}")
        result.skipped.append({"op": bench.name, "provider": provider, "mode": mode,
                               "shape": jsonable(setup.shape), "reason": reason,
                               "failure": not getattr(error, "expected", False)})
        free_memory(device)
        done(provider)

    prepared: dict[str, Callable[[], Any]] = {}
    errors: dict[str, float | None] = {}
    reference_out = None
    for provider in providers:
        progress.describe(f"{label} {provider} (first call)")
        try:
            key = (bench.name, provider)
            if key in unavailable:
                raise ProviderUnavailable(unavailable[key])
            fn = setup.fn(provider, mode)
            out = fn()  # compiles / autotunes; the output is compared with the baseline's
            synchronize(device)
        except NotApplicable:
            done(provider)
            continue
        except Exception as error:  # noqa: BLE001 - a failing provider must not end the run
            skip(provider, error)
            continue
        if options.check and provider == bench.baseline:
            reference_out = out
        elif options.check and reference_out is not None and provider != bench.bandwidth_reference:
            errors[provider] = max_rel_err(out, reference_out)
        del out
        prepared[provider] = fn
    del reference_out

    timings: dict[str, tuple[list[float], int | None]] = {}
    if device.startswith("cuda"):
        for provider, fn in prepared.items():
            progress.describe(f"{label} {provider}")
            try:
                timings[provider] = time_cuda(fn, timing)
            except Exception as error:  # noqa: BLE001
                skip(provider, error)
    elif prepared:
        progress.describe(f"{label} {'/'.join(prepared)} (interleaved)")
        timings, failed = time_cpu_interleaved(prepared, timing, calls=bench.cpu_calls)
        for provider, error in failed.items():
            skip(provider, error)

    rows = []
    for provider, fn in prepared.items():
        if provider not in timings:
            continue
        try:
            peak, peak_method = peak_memory(fn, device)
            work = setup.work(provider, mode)
            note = setup.describe(provider, mode) if hasattr(setup, "describe") else None
        except Exception as error:  # noqa: BLE001
            skip(provider, error)
            continue
        (median, p20, p80), reps = timings[provider]
        row = {
            "op": bench.name,
            "provider": provider,
            "mode": mode,
            "shape": jsonable(setup.shape),
            "dtype": dtype_name(setup.dtype),
            "device": "cuda" if device.startswith("cuda") else "cpu",
            "device_name": dev_name,
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
            "reps": reps,
            "peak_memory_bytes": peak,
            "peak_memory_method": peak_method,
            "bytes": work.bytes,
            "flops": work.flops,
            "gbps": work.bytes / (median * 1e-3) / 1e9 if work.bytes else None,
            "tflops": work.flops / (median * 1e-3) / 1e12 if work.flops else None,
            "note": note,
            "pefops_version": vers["pefops"],
            "torch_version": vers["torch"],
            "triton_version": vers["triton"],
            "timestamp": now_iso(),
        }
        if provider in errors:
            row[f"max_rel_err_vs_{bench.baseline}"] = errors[provider]
        rows.append(row)
        done(provider)
    for provider in providers:
        done(provider)
    return rows


def _add_speedups(rows: list[dict], baseline: str, exclude: str | None = None) -> None:
    """speedup_vs_<baseline> = baseline median / provider median, same config and mode, same run
    (None for the bandwidth-reference provider, which does not compute the op)."""
    base = {r["mode"]: r["median_ms"] for r in rows if r["provider"] == baseline}
    for r in rows:
        b = base.get(r["mode"]) if r["provider"] != exclude else None
        r[f"speedup_vs_{baseline}"] = (b / r["median_ms"]) if b and r["median_ms"] > 0 else None
