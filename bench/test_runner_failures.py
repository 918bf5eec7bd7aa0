"""A benchmark run that loses a provider or a configuration must not look green: `python -m bench`
exits non-zero and lists the failures first; only a declared, expected absence (and the time budget)
is a quiet skip."""

import json

import pytest
import torch

from bench import __main__ as bench_main
from bench import interface


class ToySetup:
    shape = {"n": 4}
    dtype = torch.float32

    def __init__(self, unavailable: dict[str, interface.ProviderUnavailable]):
        self.x = torch.ones(4)
        self.unavailable = unavailable

    def fn(self, provider, mode):
        if provider in self.unavailable:
            raise self.unavailable[provider]
        if provider == "broken":
            def call():
                raise RuntimeError("kernel exploded")
            return call
        return lambda: self.x * 2

    def work(self, provider, mode):
        return interface.Work(bytes=32)


def toy_benchmark(providers, unavailable=None, setup_error=None):
    def setup(config):
        if setup_error is not None:
            raise setup_error
        return ToySetup(unavailable or {})

    return interface.OpBenchmark(name="toy", configs=lambda device, dtype, quick: [{"n": 4}], setup=setup,
                                 providers=tuple(providers), modes=("fwd",), baseline="eager",
                                 bandwidth_reference=None)


def run_main(monkeypatch, tmp_path, benchmark, capsys):
    monkeypatch.setattr(interface, "get_benchmark", lambda name: benchmark)
    code = bench_main.main(["--ops", "toy", "--device", "cpu", "--out", str(tmp_path), "--no-plots",
                            "--warmup-ms", "1", "--rep-ms", "2"])
    saved = json.loads(next(tmp_path.glob("latest-*.json")).read_text())
    return code, capsys.readouterr().out, saved


@pytest.mark.parametrize("case", ["unavailable", "raises", "setup"])
def test_a_lost_provider_or_configuration_fails_the_run(monkeypatch, tmp_path, capsys, case):
    if case == "unavailable":
        lost = interface.ProviderUnavailable("transformers is not importable")
        benchmark = toy_benchmark(["eager", "pefops"], unavailable={"pefops": lost})
    elif case == "raises":
        benchmark = toy_benchmark(["eager", "broken"])
    else:
        benchmark = toy_benchmark(["eager"], setup_error=ImportError("no module named transformers"))
    code, out, saved = run_main(monkeypatch, tmp_path, benchmark, capsys)
    assert code == 1
    # the failures come before the results table
    assert out.lstrip().startswith("FAILED: 1 case(s)")
    assert [s["failure"] for s in saved["skipped"]] == [True]
    report = next(tmp_path.glob("latest-*.md")).read_text()
    assert "## FAILED: 1 case(s) did not run" in report.split("## All rows")[0]


def test_declared_expected_absence_is_a_quiet_skip(monkeypatch, tmp_path, capsys):
    absent = interface.ProviderUnavailable("needs a CUDA device", expected=True)
    benchmark = toy_benchmark(["eager", "cuda_only"], unavailable={"cuda_only": absent})
    code, out, saved = run_main(monkeypatch, tmp_path, benchmark, capsys)
    assert code == 0
    assert "FAILED" not in out and "skipped as expected" in out
    assert [s["failure"] for s in saved["skipped"]] == [False]


def test_clean_run_exits_zero(monkeypatch, tmp_path, capsys):
    code, out, saved = run_main(monkeypatch, tmp_path, toy_benchmark(["eager", "pefops"]), capsys)
    assert code == 0 and saved["skipped"] == [] and len(saved["rows"]) == 2
