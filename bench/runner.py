"""Generic benchmark machinery: timing, peak memory, result rows, tables, plots, files.

An op family plugs in with one `OpBenchmark` (module attribute `BENCHMARK` of the module named in
`REGISTRY`):

* ``configs(device, dtype, quick)`` lists the configurations (plain dicts) to run on a device;
* ``setup(config)`` builds the inputs once for every provider and returns an object with
  ``shape`` (dict for the result row), ``dtype``, ``device`` and two methods:
  ``fn(provider, mode)`` -> a zero-argument callable doing one measured call (it raises
  `NotApplicable` when the provider has no such mode, `ProviderUnavailable` when it cannot run here),
  and ``work(provider, mode)`` -> `Work` (the explicit byte and flop counts);
  optionally ``describe(provider, mode)`` -> a short note stored with the row (backend used, settings).

Timing
  GPU: ``triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8])`` (L2 flushed before
  every call by do_bench); CPU: ``time.perf_counter`` around single calls after a warm-up, median /
  p20 / p80 of the repeats (same quantile rule, torch.quantile, as do_bench).

Peak memory (``peak_memory_bytes``): the most memory the call allocated above what was allocated
  before it (inputs, weights and the module are excluded; the outputs are included).
  GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call (method "cuda.max_memory_allocated").
  CPU: the running sum of torch CPU allocator events recorded by ``torch.profiler`` with
  ``profile_memory=True`` during one call, its maximum (method "torch.profiler.profile_memory").
  tracemalloc cannot see torch's allocator and the process max-RSS high-water mark cannot be reset
  per call, so neither is used.

Speed-ups are ratios between providers measured in the same run (same process, same inputs): every
row carries ``speedup_vs_<baseline>`` computed only from rows of that run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)
RESULTS_DIR = Path(__file__).resolve().parent / "results"

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

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
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
    subject: str = "pefops"  # the provider whose GB/s and TFLOP/s the summary table shows
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


# ----------------------------------------------------------------------------- environment


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def device_slug(device: str, name: str | None = None) -> str:
    """"cuda-nvidia-h200", "cpu-intel-xeon": the device kind and a cleaned model name."""
    name = name or device_name(device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    clean = re.sub(r"\((r|tm|c)\)|@.*$", " ", name.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", clean) if w and w not in ("cpu", "processor", "corporation")]
    return "-".join([kind] + words)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "triton": None, "pefops": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional here
        pass
    try:
        import pefops

        out["pefops"] = getattr(pefops, "__version__", "unknown")
    except Exception as error:  # noqa: BLE001
        out["pefops"] = f"not importable ({type(error).__name__}: {error})"[:200]
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing


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


def _quantiles_ms(times_ms: Sequence[float]) -> list[float]:
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
    return {name: (_quantiles_ms(samples[name]), len(samples[name])) for name in fns}, failed


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
    return _quantiles_ms([s.elapsed_time(e) for s, e in events]), reps


# ----------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------- checks


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def max_rel_err(out: Any, ref: Any) -> float | None:
    """max |out - ref| / max |ref| over all tensors (in float32); None when there is nothing to compare."""
    a, b = _tensors(out), _tensors(ref)
    if not a or len(a) != len(b):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        x, y = x.detach().float(), y.detach().float()
        scale = y.abs().max().item() or 1.0
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst


# ----------------------------------------------------------------------------- running


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


@dataclass
class RunResult:
    meta: dict
    rows: list[dict]
    skipped: list[dict]

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": self.rows, "skipped": self.skipped}

    @property
    def failures(self) -> list[dict]:
        """Skipped cases that are not a declared, expected absence or the time budget: a provider or
        configuration that should have run here and did not."""
        return [s for s in self.skipped if s.get("failure", True)]


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


def shape_label(shape: dict) -> str:
    parts = []
    for key, value in shape.items():
        if isinstance(value, bool):
            if value:
                parts.append(key)
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def compact_label(shape: dict, shape_columns: Sequence[Sequence[str]] = ()) -> str:
    """"T16384 H4096 r64 LN": the op's short column headers (or the keys) followed by the values."""
    headers = {k: h for k, h in shape_columns}
    parts = []
    for key, value in shape.items():
        head = headers.get(key, key)
        if isinstance(value, bool):
            if value:
                parts.append(head)
        else:
            parts.append(f"{head}{value}" if key in headers else f"{key}={value}")
    return " ".join(parts)


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
        "loadavg_start": _loadavg(),
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
                result.skipped.append({"op": bench.name, "config": _jsonable(config), "reason": "time budget spent",
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
                result.skipped.append({"op": bench.name, "config": _jsonable(config), "reason": msg,
                                       "failure": not getattr(error, "expected", False)})
                progress.update(n_cases)
                _free(device)
                continue
            config_rows: list[dict] = []
            for mode in modes:
                config_rows += _run_mode(bench, setup, mode, providers, device, timing, options, progress,
                                         result, unavailable, vers, dev_name)
            _add_speedups(config_rows, bench.baseline, exclude=bench.bandwidth_reference)
            result.rows.extend(config_rows)
            del setup
            _free(device)
            if on_config_done is not None:
                on_config_done(result)
    finally:
        progress.close()
    meta["complete"] = not stopped_for_budget
    meta["stopped_for_budget"] = stopped_for_budget
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_end"] = _loadavg()
    meta["run_finished"] = now_iso()
    return result


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine makes CPU timings noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


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
                               "shape": _jsonable(setup.shape), "reason": reason,
                               "failure": not getattr(error, "expected", False)})
        _free(device)
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
            "shape": _jsonable(setup.shape),
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


# ----------------------------------------------------------------------------- tables


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt_num(x: float | None, digits: int = 0) -> str:
    """Three significant figures, at least `digits` decimals dropped for large values."""
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    decimals = max(digits, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{min(decimals, 6)}f}"


def _fmt_shape_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _group(rows: Iterable[dict], key: Callable[[dict], Any]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def _shape_key(shape: dict) -> str:
    return json.dumps(shape, sort_keys=True)


def summary_tables(rows: list[dict], meta: dict, heading_level: int = 3) -> str:
    """Per op (and dtype): one line per shape and mode, each provider's median and its speed-up."""
    out = []
    for (op, dtype), op_rows in _group(rows, lambda r: (r["op"], r["dtype"])).items():
        info = meta.get("ops", {}).get(op, {})
        baseline = info.get("baseline", "eager")
        subject = info.get("subject")
        reference = info.get("bandwidth_reference")
        providers = [p for p in info.get("providers", []) if p != reference]
        for r in op_rows:
            if r["provider"] not in providers and r["provider"] != reference:
                providers.append(r["provider"])
        providers = [p for p in providers if any(r["provider"] == p for r in op_rows)]
        shape_cols = [tuple(c) for c in info.get("shape_columns", [])]
        if not shape_cols:
            keys: list[str] = []
            for r in op_rows:
                keys += [k for k in r["shape"] if k not in keys]
            shape_cols = [(k, k) for k in keys]
        ref_rows = {_shape_key(r["shape"]): r for r in op_rows if r["provider"] == reference}
        has_subject = subject in providers

        header = [h for _, h in shape_cols] + ["mode"]
        for p in providers:
            header.append(f"{p} ms" if p == baseline else f"{p} ms (× {baseline})")
        if has_subject:
            header += [f"{subject} GB/s", f"{subject} TFLOP/s"]
            if ref_rows:
                header.append(f"% of {reference} GB/s")
        if ref_rows:
            header.append(f"{reference} ms")
        memory = bool(info.get("memory_columns"))
        if memory:
            for p in providers:
                header.append(f"{p} peak MiB" if p == baseline else f"{p} peak MiB (% of {baseline})")
        align = ["---:"] * len(shape_cols) + [":---"] + ["---:"] * (len(header) - len(shape_cols) - 1)

        title = f"{'#' * heading_level} {op} — {meta.get('device_name', '?')} ({meta.get('device', '?')}, {dtype})"
        lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        groups = _group((r for r in op_rows if r["provider"] != reference),
                        lambda r: (_shape_key(r["shape"]), r["mode"]))
        for (skey, mode), g in groups.items():
            by_p = {r["provider"]: r for r in g}
            shape = g[0]["shape"]
            cells = [_fmt_shape_value(shape.get(k, "")) for k, _ in shape_cols] + [mode]
            for p in providers:
                r = by_p.get(p)
                if r is None:
                    cells.append("–")
                elif p == baseline:
                    cells.append(_fmt_ms(r["median_ms"]))
                else:
                    s = r.get(f"speedup_vs_{baseline}")
                    cells.append(_fmt_ms(r["median_ms"]) + (f" ({s:.2f}×)" if s else ""))
            ref = ref_rows.get(skey)
            if has_subject:
                r = by_p.get(subject)
                cells.append(_fmt_num(r and r.get("gbps")))
                cells.append(_fmt_num(r and r.get("tflops"), 1))
                if ref_rows:
                    if r and r.get("gbps") and ref and ref.get("gbps"):
                        cells.append(f"{100 * r['gbps'] / ref['gbps']:.0f}%")
                    else:
                        cells.append("–")
            if ref_rows:
                cells.append(_fmt_ms(ref["median_ms"]) if ref else "–")
            if memory:
                base_peak = (by_p.get(baseline) or {}).get("peak_memory_bytes")
                for p in providers:
                    peak = (by_p.get(p) or {}).get("peak_memory_bytes")
                    cell = _fmt_num(None if peak is None else peak / 2**20)
                    if p != baseline and peak is not None and base_peak:
                        cell += f" ({100 * peak / base_peak:.0f}%)"
                    cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def details_table(rows: list[dict]) -> str:
    """Every row: median with p20–p80, throughput, peak memory, numerical agreement."""
    header = ["op", "provider", "mode", "shape", "dtype", "median ms", "p20–p80 ms", "GB/s", "TFLOP/s",
              "peak MiB", "speed-up", "max rel err", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * 5 + ["---:"] * 7 + [":---"]) + "|"]
    for r in rows:
        speed = next((v for k, v in r.items() if k.startswith("speedup_vs_")), None)
        err = next((v for k, v in r.items() if k.startswith("max_rel_err_vs_")), None)
        peak = r.get("peak_memory_bytes")
        lines.append("| " + " | ".join([
            r["op"], r["provider"], r["mode"], shape_label(r["shape"]), r["dtype"], _fmt_ms(r["median_ms"]),
            f"{_fmt_ms(r['p20_ms'])}–{_fmt_ms(r['p80_ms'])}", _fmt_num(r.get("gbps")), _fmt_num(r.get("tflops"), 2),
            "–" if peak is None else f"{peak / 2**20:.1f}", "–" if speed is None else f"{speed:.2f}×",
            "–" if err is None else f"{err:.1e}", (r.get("note") or "").replace("|", "/"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def provenance_line(meta: dict) -> str:
    v = meta.get("versions", {})
    started = {op: op_meta.get("run_started") for op, op_meta in meta.get("ops", {}).items()
               if isinstance(op_meta, dict) and op_meta.get("run_started")}
    if len(set(started.values())) > 1:  # a merge of runs (bench/merge.py): say when each op ran
        when = ", ".join(f"{op} {time}" for op, time in started.items())
        parts = [f"merged runs, measured {when}", f"torch {v.get('torch')}"]
    else:
        parts = [f"measured {meta.get('run_started', '?')}", f"torch {v.get('torch')}"]
    if v.get("triton"):
        parts.append(f"triton {v.get('triton')}")
    parts.append(f"pefops {v.get('pefops')}")
    if meta.get("device") == "cpu":
        n = meta.get('cpu_threads')
        parts.append(f"{n} CPU thread{'' if n == 1 else 's'}")
        if meta.get("loadavg_start"):
            parts.append(f"load average at start {meta['loadavg_start'][0]}")
    if not meta.get("complete", True):
        parts.append("**incomplete run** (time budget or interruption)")
    timing = meta.get("timing", {})
    method = timing.get("method", "?")
    parts.append(f"timing: {method}, median of repeats")
    return "; ".join(parts) + ". Speed-ups are ratios within this run."


def markdown_report(result: RunResult) -> str:
    meta = result.meta
    text = [f"# Benchmark results — {meta['device_name']}", "", provenance_line(meta), "",
            summary_tables(result.rows, meta, heading_level=2), "## All rows", "", details_table(result.rows)]
    failures = result.failures
    text = [f"# Benchmark results — {meta['device_name']}", ""] + (
        [f"## FAILED: {len(failures)} case(s) did not run", ""] + [f"- {json.dumps(s)}" for s in failures] + [""]
        if failures else []) + text[2:]
    expected = [s for s in result.skipped if not s.get("failure", True)]
    if expected:
        text += ["## Skipped (expected here)", ""] + [f"- {json.dumps(s)}" for s in expected] + [""]
    return "\n".join(text)


# ----------------------------------------------------------------------------- plots


def write_plots(result: RunResult, out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per op, mode and dtype: median time per shape (log scale) and speed-up vs baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    paths = []
    meta = result.meta
    for (op, mode, dtype), rows in _group(result.rows, lambda r: (r["op"], r["mode"], r["dtype"])).items():
        info = meta.get("ops", {}).get(op, {})
        baseline = info.get("baseline", "eager")
        reference = info.get("bandwidth_reference")
        first_shape = {}
        for r in rows:
            first_shape.setdefault(_shape_key(r["shape"]), r["shape"])
        shapes = list(first_shape)
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        labels = [compact_label(first_shape[s], info.get("shape_columns", ())) for s in shapes]
        table = {(_shape_key(r["shape"]), r["provider"]): r for r in rows}
        width = max(6.0, 0.45 * len(shapes) * max(1, len(providers)) * 0.5 + 2)
        fig, axes = plt.subplots(1, 2, figsize=(min(2 * width, 30), 4.8))
        bar_w = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * bar_w for j in range(len(shapes))]
            ys = [table[(s, p)]["median_ms"] if (s, p) in table else float("nan") for s in shapes]
            axes[0].bar(xs, ys, bar_w, label=p)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("median ms (log)")
        axes[0].set_title(f"{op} {mode} {dtype}: time")
        speed_providers = [p for p in providers if p not in (baseline, reference)]
        sw = 0.8 / max(1, len(speed_providers))
        for i, p in enumerate(speed_providers):
            xs = [j + (i - (len(speed_providers) - 1) / 2) * sw for j in range(len(shapes))]
            ys = [(table[(s, p)].get(f"speedup_vs_{baseline}") or float("nan")) if (s, p) in table else float("nan")
                  for s in shapes]
            axes[1].bar(xs, ys, sw, label=p, color=f"C{providers.index(p)}")
        axes[1].axhline(1.0, color="black", linewidth=0.8)
        axes[1].set_yscale("log")
        axes[1].set_ylabel(f"speed-up vs {baseline} (×)")
        axes[1].set_title(f"{op} {mode} {dtype}: speed-up (same run)")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        for ax in axes:
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(labels, rotation=60 if len(shapes) > 4 else 0, ha="right" if len(shapes) > 4 else "center",
                               fontsize=7)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        low, high = axes[1].get_ylim()
        axes[1].set_yticks([2.0 ** k for k in range(-8, 9) if low <= 2.0 ** k <= high])
        fig.suptitle(meta.get("device_name", ""), fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{prefix}-{op}-{mode.replace('+', '_')}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- files


def write_json(result: RunResult, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(result.to_json()), indent=1) + "\n")
    tmp.replace(path)


def load_results(path: Path) -> RunResult:
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):  # a bare list of rows
        return RunResult(meta={}, rows=data, skipped=[])
    return RunResult(meta=data.get("meta", {}), rows=data.get("rows", []), skipped=data.get("skipped", []))
