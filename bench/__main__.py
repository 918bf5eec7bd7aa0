"""python -m bench: run the registered op-family benchmarks and write results under bench/results/.

    python -m bench                                   # every op; cuda if available, else cpu (quick set)
    python -m bench --ops bottleneck_adapter --device cpu --quick
    python -m bench --device cuda --out "$OUT/results" --budget-s 300

Writes <out>/<device-slug>-<UTC timestamp>.json (all rows of this run), <out>/latest-<device-slug>.json,
<out>/latest-<device-slug>.md (summary and all rows) and <out>/latest-<device-slug>-<op>-<mode>-<dtype>.png,
and prints the summary table. The JSON files are rewritten after every configuration, so a run cut
short (time budget, timeout) still leaves the rows it measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench import interface
from bench.environment import device_name, device_slug, file_stamp, parse_dtype
from bench.plots import write_plots
from bench.results import RESULTS_DIR, RunResult, jsonable, write_json
from bench.running import RunOptions, run
from bench.tables import markdown_report, provenance_line, summary_tables
from bench.timing import Timing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=None,
                   help=f"comma-separated op families (default: all: {', '.join(interface.REGISTRY)})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the small shape set (the default on cpu)")
    size.add_argument("--full", action="store_true", help="the full shape set (the default on cuda)")
    p.add_argument("--modes", default=None, help="comma-separated subset of fwd, bwd, fwd+bwd (default: fwd,fwd+bwd)")
    p.add_argument("--providers", default=None, help="comma-separated subset of providers (default: all)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder (default: bench/results)")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per case")
    p.add_argument("--rep-ms", type=float, default=None, help="measurement time per case")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for --device cpu (default 1; 0 = torch's default). One thread "
                        "keeps CPU timings meaningful on shared machines, where a busy core stalls every "
                        "OpenMP parallel region for a scheduler tick")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new configurations after this many seconds (results so far are kept)")
    p.add_argument("--strict", action="store_true", help="a failing provider ends the run instead of being skipped")
    p.add_argument("--no-check", action="store_true", help="skip comparing every provider's outputs with the baseline")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--list", action="store_true", help="list the configurations that would run, and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    quick = args.quick or (device == "cpu" and not args.full)
    names = [n.strip() for n in args.ops.split(",") if n.strip()] if args.ops else list(interface.REGISTRY)
    benchmarks = [interface.get_benchmark(n) for n in names]
    dtype = parse_dtype(args.dtype)
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else None
    if modes and any(m not in interface.MODES for m in modes):
        print(f"--modes: expected a subset of {', '.join(interface.MODES)}", file=sys.stderr)
        return 2
    providers = tuple(p.strip() for p in args.providers.split(",")) if args.providers else None

    if args.list:
        for bench in benchmarks:
            for config in bench.configs(device, dtype, quick):
                print(bench.name, jsonable(config))
        return 0

    if device == "cpu":
        threads = 1 if args.threads is None else args.threads
        if threads > 0:
            torch.set_num_threads(threads)
    timing = Timing.default(device)
    if args.warmup_ms is not None:
        timing.warmup_ms = args.warmup_ms
    if args.rep_ms is not None:
        timing.rep_ms = args.rep_ms
    options = RunOptions(device=device, dtype=dtype, quick=quick, modes=modes, providers=providers,
                         timing=timing, budget_s=args.budget_s, strict=args.strict, check=not args.no_check)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    stamp = file_stamp()
    run_path = out_dir / f"{slug}-{stamp}.json"
    latest_path = out_dir / f"latest-{slug}.json"

    def save(result: RunResult) -> None:
        write_json(result, run_path)
        write_json(result, latest_path)

    print(f"benchmarking {', '.join(names)} on {device_name(device)} ({device}, "
          f"{'quick' if quick else 'full'} set); results in {out_dir}", file=sys.stderr)
    result = run(benchmarks, options, on_config_done=save)
    save(result)
    md_path = out_dir / f"latest-{slug}.md"
    md_path.write_text(markdown_report(result))
    plots = [] if args.no_plots else write_plots(result, out_dir, f"latest-{slug}")

    failures = result.failures
    print()
    if failures:
        # first, so that a run which lost a provider or a configuration never reads as green
        print(f"FAILED: {len(failures)} case(s) that should run here did not:")
        for failure in failures:
            where = " ".join(str(failure[k]) for k in ("op", "provider", "mode") if k in failure)
            print(f"  {where}: {failure['reason']}")
        print()
    print(provenance_line(result.meta))
    print()
    print(summary_tables(result.rows, result.meta))
    expected = len(result.skipped) - len(failures)
    if expected:
        print(f"{expected} case(s) skipped as expected here (time budget or a declared absence); "
              f"reasons in {md_path.name} and the JSON 'skipped' list")
    print("wrote:", run_path, latest_path, md_path, *plots, sep="\n  ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
