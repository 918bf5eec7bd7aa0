"""The end-to-end tables of the README's results section, read from bench/results: mixed-task batches
(bench/mixed_tasks.py -> mixed_tasks-<device>.json) and training workflows (bench/training.py ->
training-<device>.json). Both files append runs; a model's rows come from the newest run that has it.
"""

from __future__ import annotations

import json
from pathlib import Path

MIB = 1 << 20


def _runs(path: Path) -> list[dict]:
    return json.loads(path.read_text()).get("runs", [])


def _newest_rows_per_model(runs: list[dict]) -> list[dict]:
    newest: dict[str, list[dict]] = {}
    for run in runs:  # runs are appended in time order: a later run replaces a model's rows
        for model in dict.fromkeys(row["model"] for row in run.get("rows", [])):
            newest[model] = [row for row in run["rows"] if row["model"] == model]
    return [row for rows in newest.values() for row in rows]


def mixed_tasks_table(path: Path) -> list[str]:
    rows = _newest_rows_per_model(_runs(path))
    by_key = {(row["model"], row["mode"], row["provider"]): row for row in rows}
    lines = ["| model | layers | batch × seq | tasks | mode | mixed ms | loop ms | mixed ÷ loop | base alone ms "
             "| peak MiB mixed / loop |",
             "|---|---:|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for (model, mode, provider), mixed in by_key.items():
        loop = by_key.get((model, mode, "loop"))
        if provider != "mixed" or loop is None:
            continue
        shape, base = mixed["shape"], by_key.get((model, mode, "base"))
        lines.append(f"| {model} | {shape['layers']} | {shape['batch']} × {shape['seq']} | {shape['tasks']} | {mode} | "
                     f"{mixed['median_ms']:.0f} | {loop['median_ms']:.0f} | "
                     f"{loop['median_ms'] / mixed['median_ms']:.2f}× | "
                     f"{'–' if base is None else format(base['median_ms'], '.0f')} | "
                     f"{mixed['peak_bytes'] / MIB:.0f} / {loop['peak_bytes'] / MIB:.0f} |")
    device = rows[0]["device"] if rows else "?"
    kind = "cpu" if path.name.startswith("mixed_tasks-cpu") else "cuda"
    dtype = rows[0].get("dtype", "float32") if rows else "?"
    return [f"#### mixed-task batches vs one batch per task — {device} ({kind}, {dtype})", "", *lines, "",
            f"_Source: `bench/results/{path.name}` (`python -m bench.mixed_tasks`); median of the run's repeats; "
            "base alone: the same batch through the frozen base with no task (the floor no routing beats); "
            "peak: the allocator's high-water mark of one call._"]


def training_table(path: Path) -> list[str]:
    run = _runs(path)[-1]
    lines = ["| provider | model | batch × seq | median ms / step | p20 | p80 |", "|---|---|---:|---:|---:|---:|"]
    for row in run["rows"]:
        lines.append(f"| {row['provider']} | {row['model']} | {row['shape']['batch']} × {row['shape']['seq']} | "
                     f"{row['median_ms']:.1f} | {row['p20_ms']:.1f} | {row['p80_ms']:.1f} |")
    lines += ["", f"Trainer overhead over the hand-written loop: {run['trainer_overhead_percent']:+.1f} %.", "",
              "| FSDP2 ranks | parameters held per rank MiB | step peak per rank MiB |", "|---:|---:|---:|"]
    for row in run["fsdp_rows"]:
        lines.append(f"| {row['ranks']} | {max(row['parameter_bytes_per_rank']) / MIB:.1f} | "
                     f"{max(row['peak_bytes_per_rank']) / MIB:.1f} |")
    device = run["rows"][0]["device"] if run["rows"] else "?"
    return [f"#### training workflows — {device} (cpu, float32)", "", *lines, "",
            f"_Source: `bench/results/{path.name}` (`python -m bench.training`)._"]


def end_to_end_lines(results_dir: Path) -> list[str]:
    lines = []
    for pattern, table in (("mixed_tasks-*.json", mixed_tasks_table), ("training-*.json", training_table)):
        for path in sorted(Path(results_dir).glob(pattern)):
            lines += [*table(path), ""]
    return lines
