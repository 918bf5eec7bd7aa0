"""Merge benchmark runs (one JSON per op family or per run) into one latest-<device> result.

    python -m bench.merge OUT_DIR RESULT.json [RESULT.json ...]

Writes OUT_DIR/latest-<device>.json/.md (+ plots) and a timestamped JSON. Rows of an op that
appear in several inputs are taken from the last input that has that op, so a newer run of one op
replaces its older rows. bench/gpu_check.sh merges its per-op runs with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.environment import device_slug, file_stamp
from bench.plots import write_plots
from bench.results import RunResult, load_results, write_json
from bench.tables import markdown_report


def merge(paths: list[Path]) -> RunResult:
    results = [load_results(path) for path in paths]
    if not results:
        raise SystemExit("no results to merge")
    latest_for_op = {}
    for index, result in enumerate(results):
        for row in result.rows:
            latest_for_op[row["op"]] = index
    meta = dict(results[-1].meta)
    meta["merged_from"] = [str(path) for path in paths]
    meta["complete"] = all(bool(r.meta.get("complete", True)) for r in results)
    # each op's own settings (table columns, baselines) come from the input its rows come from, and
    # each input's start time is kept with its ops: the merged run's meta is the last input's otherwise
    meta["ops"] = {}
    for op, index in latest_for_op.items():
        op_meta = dict(results[index].meta.get("ops", {}).get(op, {}))
        op_meta.setdefault("run_started", results[index].meta.get("run_started"))
        meta["ops"][op] = op_meta
    merged = RunResult(meta=meta, rows=[], skipped=[])
    for index, result in enumerate(results):
        merged.rows += [row for row in result.rows if latest_for_op[row["op"]] == index]
        merged.skipped += [s for s in result.skipped if latest_for_op.get(s.get("op"), index) == index]
    return merged


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    merged = merge([Path(p) for p in argv[1:]])
    slug = merged.meta.get("device_slug") or device_slug(merged.meta.get("device", "cpu"))
    stamp = file_stamp()
    write_json(merged, out / f"{slug}-{stamp}.json")
    write_json(merged, out / f"latest-{slug}.json")
    (out / f"latest-{slug}.md").write_text(markdown_report(merged))
    write_plots(merged, out, f"latest-{slug}")
    print(f"merged {len(merged.rows)} rows into {out}/latest-{slug}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
