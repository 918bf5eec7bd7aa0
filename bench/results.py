"""A run's results: the `RunResult` (meta, rows, skipped cases), its JSON file, and the helpers that
group rows and name shapes for the tables and plots.

A result row: op, provider, mode (fwd / bwd / fwd+bwd), shape, dtype, device name, median, p20,
p80, peak memory, achieved GB/s or TFLOP/s from an explicit byte/flop count, versions, timestamp,
and ``speedup_vs_<baseline>`` computed only from rows of the same run (bench/running.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from bench.environment import dtype_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def jsonable(value: Any) -> Any:
    """`value` as JSON can hold it: dtypes by name, inf and nan as strings, anything else by str()."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def shape_label(shape: dict) -> str:
    """"tokens=512 hidden=768 layer_norm": every key with its value, a true flag by its name only."""
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


def group(rows: Iterable[dict], key: Callable[[dict], Any]) -> dict:
    """Rows by key(row), in the order each key first appears."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def shape_key(shape: dict) -> str:
    """One string per shape whatever the order of its keys (rows of one shape share it)."""
    return json.dumps(shape, sort_keys=True)


def write_json(result: RunResult, path: Path) -> None:
    """Written to a temporary file, then moved: a run cut short never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(result.to_json()), indent=1) + "\n")
    tmp.replace(path)


def load_results(path: Path) -> RunResult:
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):  # a bare list of rows
        return RunResult(meta={}, rows=data, skipped=[])
    return RunResult(meta=data.get("meta", {}), rows=data.get("rows", []), skipped=data.get("skipped", []))


def append_run(path: Path, result: dict) -> None:
    """Add one run to a result file that keeps every run ({"runs": [...]}), creating it if needed."""
    previous = json.loads(path.read_text()) if path.exists() else {"runs": []}
    previous["runs"].append(result)
    path.write_text(json.dumps(previous, indent=1) + "\n")
