"""bench.launch_overhead on CPU: the rows it writes and its argument checks."""

import json

import pytest

from bench import launch_overhead


def test_writes_a_row_per_case_and_mode(tmp_path):
    out = tmp_path / "overhead.json"
    assert launch_overhead.main(["--device", "cpu", "--cases", "gated_blend,masked_linear_decode", "--calls", "2",
                                 "--rounds", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "launch_overhead" and report["torch_add_us"] > 0
    # masked_linear_decode is inference only: no fwd_bwd row
    assert [(row["case"], row["mode"], row["path"]) for row in report["rows"]] == [
        ("gated_blend", "fwd", "default"), ("gated_blend", "fwd", "torch"),
        ("gated_blend", "fwd_bwd", "default"), ("gated_blend", "fwd_bwd", "torch"),
        ("masked_linear_decode", "fwd", "default"), ("masked_linear_decode", "fwd", "torch")]
    for row in report["rows"]:
        assert row["host_us"] > 0 and row["synced_us"] >= row["host_us"]


@pytest.mark.parametrize("argv, message", [(["--cases", "no_such_case"], "unknown cases"),
                                            (["--calls", "0"], "must be >= 1")])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        launch_overhead.main(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err
