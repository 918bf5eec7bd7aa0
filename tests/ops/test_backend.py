"""Backend registry: selection order, forced backends and their errors, the environment override."""

import subprocess
import sys

import pytest
import torch

from pefops import backend as backends
from pefops.ops import bottleneck_adapter, bottleneck_adapter_ref

CPU_PROBLEM = backends.Problem(torch.device("cpu"), torch.float32, "forward", {"tokens": 8, "hidden": 32, "rank": 4})


def test_automatic_choice_on_cpu_is_torch_and_never_raises():
    assert backends.select("bottleneck_adapter", CPU_PROBLEM).backend == "torch"


def test_explain_lists_reasons_for_each_backend():
    explained = dict(backends.explain("bottleneck_adapter", CPU_PROBLEM))
    assert set(explained) == {"cuda", "triton", "torch"}
    assert explained["torch"] == []
    assert explained["triton"] and explained["cuda"]


def test_forced_backend_that_cannot_serve_lists_reasons():
    with pytest.raises(backends.BackendNotSupportedError, match="backend 'cuda' cannot run bottleneck_adapter"):
        backends.select("bottleneck_adapter", CPU_PROBLEM, "cuda")


def test_forced_triton_rank_limit():
    problem = backends.Problem(torch.device("cpu"), torch.float32, "forward", {"tokens": 8, "hidden": 32, "rank": 2048})
    with pytest.raises(backends.BackendNotSupportedError, match="rank 2048 exceeds"):
        backends.select("bottleneck_adapter", problem, "triton")


def test_cuda_backend_declares_no_backward():
    problem = backends.Problem(torch.device("cuda"), torch.float32, "backward", {"tokens": 1, "hidden": 32, "rank": 4})
    reasons = backends.implementations("bottleneck_adapter")["cuda"].not_supported_reasons(problem)
    assert reasons  # no CUDA here, and never a backward


def test_environment_variable_forces_backend(monkeypatch):
    x, wd, wu = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8, 2)
    monkeypatch.setenv("PEFOPS_BACKEND", "cuda")
    with pytest.raises(backends.BackendNotSupportedError):
        bottleneck_adapter(x, wd, None, wu, None)
    monkeypatch.setenv("PEFOPS_BACKEND", "torch")
    bottleneck_adapter(x, wd, None, wu, None)
    monkeypatch.setenv("PEFOPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PEFOPS_BACKEND='fastest' is not a backend"):
        bottleneck_adapter(x, wd, None, wu, None)


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("PEFOPS_BACKEND", "cuda")
    assert backends.forced_backend() == "cuda"
    assert backends.forced_backend("torch") == "torch"
    assert backends.select("bottleneck_adapter", CPU_PROBLEM, "torch").backend == "torch"
    x, wd, wu = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8, 2)
    out = bottleneck_adapter(x, wd, None, wu, None, backend="torch")
    torch.testing.assert_close(out, bottleneck_adapter_ref(x, wd, None, wu, None))


def test_triton_on_cpu_only_when_forced_under_interpreter():
    reasons = backends.triton_cpu_reasons(forced=False)
    assert reasons
    if backends.triton_interpreter_enabled():
        assert backends.triton_cpu_reasons(forced=True) == []


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.register(backends.Implementation("x", "opencl", ("cpu",), (torch.float32,), False, {}))


def test_import_without_triton_or_transformers():
    # import pefops must not need triton, transformers or a GPU
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['transformers'] = None\n"
        "import torch, pefops\n"
        "from pefops.ops import bottleneck_adapter\n"
        "from pefops import backend\n"
        "x = torch.randn(3, 8); y = bottleneck_adapter(x, torch.randn(2, 8), None, torch.randn(8, 2), None)\n"
        "p = backend.Problem(torch.device('cuda'), torch.float16, 'forward', {'tokens': 64, 'hidden': 8, 'rank': 2})\n"
        "print(dict(backend.explain('bottleneck_adapter', p))['triton'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "triton is not importable" in result.stdout


def test_info_command_runs():
    result = subprocess.run([sys.executable, "-m", "pefops"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bottleneck_adapter" in result.stdout and "torch" in result.stdout


def test_selection_memo_buckets_token_counts():
    """A new sequence length above 64 tokens reuses its power-of-two bucket's choice; at most 64
    tokens (where the decode limits are) every count is its own entry."""
    backends.clear_selection_cache()
    device = torch.device("cpu")

    def pick(tokens):
        problem = backends.Problem(device, torch.float32, "forward", {"tokens": tokens, "hidden": 64, "rank": 8})
        return backends.select("bottleneck_adapter", problem)

    for tokens in (1000, 1001, 1020, 1024):
        pick(tokens)
    assert len(backends._SELECTION_CACHE) == 1
    pick(1025)
    assert len(backends._SELECTION_CACHE) == 2
    for tokens in (15, 16, 17):
        pick(tokens)
    assert len(backends._SELECTION_CACHE) == 5
    assert backends._size_key("rank", 1000) == 1000  # only token counts are bucketed
