"""bench.end_to_end_report: a model's rows from the newest run that has it, the mixed ÷ loop ratio,
and the training tables, as the README's generated section shows them."""

import json

from bench import report
from bench.end_to_end_report import MIB, end_to_end_lines


def mixed_row(model, mode, provider, ms, layers):
    return {"model": model, "mode": mode, "provider": provider, "median_ms": ms, "peak_bytes": 3 * MIB,
            "device": "test cpu", "shape": {"batch": 16, "seq": 128, "layers": layers, "tasks": 8}}


def test_mixed_tasks_rows_come_from_each_models_newest_run(tmp_path):
    old = [mixed_row("bert", "fwd", "mixed", 100.0, 2), mixed_row("bert", "fwd", "loop", 300.0, 2),
           mixed_row("llama", "fwd", "mixed", 50.0, 2), mixed_row("llama", "fwd", "loop", 60.0, 2)]
    new = [mixed_row("bert", "fwd", "mixed", 200.0, 12), mixed_row("bert", "fwd", "loop", 250.0, 12),
           mixed_row("bert", "fwd", "base", 180.0, 12)]
    (tmp_path / "mixed_tasks-cpu.json").write_text(json.dumps({"runs": [{"rows": old}, {"rows": new}]}))
    table = [line for line in end_to_end_lines(tmp_path) if line.startswith("| bert") or line.startswith("| llama")]
    assert table == ["| bert | 12 | 16 × 128 | 8 | fwd | 200 | 250 | 1.25× | 180 | 3 / 3 |",
                     "| llama | 2 | 16 × 128 | 8 | fwd | 50 | 60 | 1.20× | – | 3 / 3 |"]


def test_a_gpu_file_is_titled_with_its_device_kind_and_dtype(tmp_path):
    rows = [{**mixed_row("bert", "fwd", provider, ms, 12), "device": "NVIDIA H100", "dtype": "bfloat16"}
            for provider, ms in (("mixed", 5.0), ("loop", 20.0))]
    (tmp_path / "mixed_tasks-cuda-nvidia-h100.json").write_text(json.dumps({"runs": [{"rows": rows}]}))
    lines = end_to_end_lines(tmp_path)
    assert "#### mixed-task batches vs one batch per task — NVIDIA H100 (cuda, bfloat16)" in lines
    assert "| bert | 12 | 16 × 128 | 8 | fwd | 5 | 20 | 4.00× | – | 3 / 3 |" in lines


def test_training_tables_and_the_readme_section(tmp_path):
    step = {"model": "m", "shape": {"batch": 8, "seq": 128}, "median_ms": 10.0, "p20_ms": 9.0, "p80_ms": 11.0,
            "device": "test cpu"}
    run = {"rows": [{**step, "provider": "trainer"}, {**step, "provider": "hand", "median_ms": 9.5}],
           "trainer_overhead_percent": 5.26,
           "fsdp_rows": [{"ranks": 2, "parameter_bytes_per_rank": [MIB, MIB], "peak_bytes_per_rank": [4 * MIB, 5 * MIB]}]}
    (tmp_path / "training-cpu.json").write_text(json.dumps({"runs": [run]}))
    section = report.render_section(tmp_path)  # no latest-*.json here: the end-to-end tables still show
    assert "| trainer | m | 8 × 128 | 10.0 | 9.0 | 11.0 |" in section
    assert "Trainer overhead over the hand-written loop: +5.3 %." in section
    assert "| 2 | 1.0 | 5.0 |" in section
