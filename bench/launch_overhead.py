"""Per-call host overhead of every op's call path, at tiny shapes (issue #13).

At the small headline sizes (bench/headline.py, "small": tens of rows) the arithmetic is negligible,
so the time per call is what the op costs the CPU around its kernels: argument checks, backend
selection, custom-op dispatch, autograd bookkeeping and the launches themselves.

  - CPU: the default path (path "default": an eager call runs the reference's ATen calls directly,
    what a CPU user pays per call) and the torch backend forced through the custom-op layer (path
    "torch": the dispatch every GPU call goes through, with the torch implementation at its end);
  - CUDA: the default path (Triton / CUDA kernels). `host_us` is the time the Python thread spends
    per call with no synchronisation (enqueue cost: what stays on the CPU's critical path), and
    `synced_us` the time per call of the same loop including the final synchronisation (what a
    call costs when the GPU work is smaller than its launch).

Each case: 3 warm-up calls, then `rounds` loops of `calls` calls; the median loop gives µs per call.
Modes: "fwd" (under torch.no_grad) and "fwd_bwd" (forward, then torch.autograd.grad of every input
against a fixed upstream gradient).

    python -m bench.launch_overhead [--device cpu|cuda] [--calls 50] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from bench.environment import cpu_model, device_name, device_slug, loadavg, now_iso, synchronize, versions
from bench.headline import ALL_CASES, Call

RESULTS = Path(__file__).parent / "results"


def _fwd(call: Call, backend: str | None) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return call.run(backend)
    return run


def _fwd_bwd(call: Call, backend: str | None) -> Callable[[], object] | None:
    if not call.inputs:
        return None  # an inference case: no backward to time
    upstream = torch.ones_like(call.run(backend))

    def run():
        return torch.autograd.grad(call.run(backend), call.inputs, upstream, allow_unused=True)
    return run


def per_call_us(fn: Callable[[], object], device: str, calls: int, rounds: int) -> tuple[float, float]:
    """(host µs per call without a sync, µs per call with the loop's final sync), medians over rounds."""
    for _ in range(3):
        fn()
    synchronize(device)
    host, synced = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        enqueued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        host.append((enqueued - start) / calls * 1e6)
        synced.append((done - start) / calls * 1e6)
    return statistics.median(host), statistics.median(synced)


def calibration_us(device: str, calls: int, rounds: int) -> float:
    """µs per call of one tiny torch.add: the machine's own per-op cost now (load from other processes
    raises it and every row with it), to read the rows against."""
    a = torch.ones(33, 48, device=device)
    return per_call_us(lambda: torch.add(a, a), device, calls, rounds)[0]


def measure(device: str, cases: list[str], calls: int, rounds: int) -> list[dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    backends = [None] if device.startswith("cuda") else [None, "torch"]
    rows = []
    try:
        for name in cases:
            call = ALL_CASES[name](device, dtype, "small")
            for mode, make in (("fwd", _fwd), ("fwd_bwd", _fwd_bwd)):
                for backend in backends:
                    fn = make(call, backend)
                    if fn is None:
                        continue
                    host_us, synced_us = per_call_us(fn, device, calls, rounds)
                    path = backend or "default"
                    rows.append({"case": name, "mode": mode, "path": path, "dtype": str(dtype)[6:],
                                 "host_us": round(host_us, 1), "synced_us": round(synced_us, 1)})
                    print(f"{name:<24} {mode:<8} {path:<8} host {host_us:9.1f} µs  synced {synced_us:9.1f} µs",
                          flush=True)
    except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): keep the rows measured so far
        print(f"interrupted after {len(rows)} rows", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated bench.headline cases")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/launch_overhead-<device>.json)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(ALL_CASES)}")
    if args.calls < 1 or args.rounds < 1:
        parser.error(f"--calls and --rounds must be >= 1, got {args.calls} and {args.rounds}")
    floor_us = calibration_us(args.device, args.calls, args.rounds)
    print(f"calibration: one tiny torch.add {floor_us:.1f} µs per call", flush=True)
    rows = measure(args.device, cases, args.calls, args.rounds)
    name = device_name(args.device)
    report = {"benchmark": "launch_overhead", "device": name, "cpu": cpu_model(), "versions": versions(),
              "timestamp": now_iso(), "loadavg": loadavg(), "threads": torch.get_num_threads(), "calls": args.calls,
              "rounds": args.rounds, "torch_add_us": round(floor_us, 2), "rows": rows}
    out = Path(args.out) if args.out else RESULTS / f"launch_overhead-{device_slug(args.device, name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
