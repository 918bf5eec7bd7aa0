"""Markdown: the summary table per op (each provider's median and its speed-up, throughput, the
bandwidth reference, peak memory), the table of every row, the provenance line, the whole report."""

from __future__ import annotations

import json
import math
from typing import Any

from bench.results import RunResult, group, shape_key, shape_label


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


def summary_tables(rows: list[dict], meta: dict, heading_level: int = 3) -> str:
    """Per op (and dtype): one line per shape and mode, each provider's median and its speed-up."""
    out = []
    for (op, dtype), op_rows in group(rows, lambda r: (r["op"], r["dtype"])).items():
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
        ref_rows = {shape_key(r["shape"]): r for r in op_rows if r["provider"] == reference}
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
        groups = group((r for r in op_rows if r["provider"] != reference),
                        lambda r: (shape_key(r["shape"]), r["mode"]))
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
