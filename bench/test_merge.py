"""bench.merge: rows of each op from the last input that has it, each op's own meta (table settings,
start time) kept, and the provenance line says when each op ran."""

from bench import merge
from bench.results import RunResult, write_json
from bench.tables import provenance_line


def run_result(ops, started, rows_per_op=1):
    meta = {"run_started": started, "device": "cpu", "device_name": "test cpu", "device_slug": "cpu-test",
            "versions": {"torch": "x", "pefops": "y"}, "cpu_threads": 1,
            "ops": {op: {"baseline": f"{op}-baseline"} for op in ops}}
    rows = [{"op": op, "provider": "p", "mode": "fwd", "value": index} for op in ops for index in range(rows_per_op)]
    return RunResult(meta=meta, rows=rows, skipped=[])


def test_merge_keeps_each_ops_meta_and_rows(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_json(run_result(["new_op"], "T1"), first)
    write_json(run_result(["old_op", "new_op"], "T0", rows_per_op=2), second)
    merged = merge.merge([first, second])
    # new_op appears in both: the last input that has it wins (2 rows from T0)
    assert sorted((row["op"], row["value"]) for row in merged.rows) == [
        ("new_op", 0), ("new_op", 1), ("old_op", 0), ("old_op", 1)]
    assert merged.meta["ops"]["old_op"] == {"baseline": "old_op-baseline", "run_started": "T0"}
    write_json(run_result(["only_new"], "T1"), first)
    merged = merge.merge([first, second])
    assert merged.meta["ops"]["only_new"] == {"baseline": "only_new-baseline", "run_started": "T1"}
    line = provenance_line(merged.meta)
    assert line.startswith("merged runs, measured ") and "only_new T1" in line and "old_op T0" in line
