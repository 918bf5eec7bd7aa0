"""cuda-build tier: the CUDA extension in csrc/ compiles on this machine (no GPU needed).

Skipped only when nvcc cannot be found or torch is a CPU-only build. One build per test session
(the `built_ext` fixture of tests/csrc/conftest.py; about 2 minutes on 2 cores, then cached on disk).

The `cuda_build` marker is registered by the project's pytest configuration (owned by the lead):
    markers = ["cuda_build: compiles the csrc CUDA extension (needs nvcc, not a GPU)", ...]
"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pefops import csrc  # noqa: E402
from tests.csrc.helpers import build_skip_reason  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.cuda_build
def test_extension_builds_and_exposes_ops(built_ext):
    assert callable(built_ext.bottleneck_adapter_decode_forward)
    assert "decode" in (built_ext.bottleneck_adapter_decode_forward.__doc__ or "")
    assert callable(built_ext.masked_linear_decode_forward)
    assert "decode" in (built_ext.masked_linear_decode_forward.__doc__ or "")
    assert csrc.build_error() is None


@pytest.mark.cuda_build
def test_load_is_memoised(built_ext):
    start = time.perf_counter()
    assert csrc.load() is built_ext
    assert time.perf_counter() - start < 1.0


def test_module_imports_without_torch_or_build(tmp_path):
    # setup.py loads pefops/csrc.py by path: it must need nothing but the standard library, must not
    # build anything and must find the sources.
    code = textwrap.dedent(
        f"""
        import importlib.util, os, sys
        os.environ["PEFOPS_CACHE_DIR"] = {str(tmp_path)!r}
        spec = importlib.util.spec_from_file_location("pefops_csrc_standalone",
                                                      {str(REPO_ROOT / "pefops" / "csrc.py")!r})
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        assert "torch" not in sys.modules, "importing pefops/csrc.py imported torch"
        names = sorted(os.path.basename(p) for p in m.CSRC_SOURCES)
        assert "bindings.cpp" in names and "bottleneck_adapter_decode.cu" in names, names
        assert all(os.path.isabs(p) for p in m.CSRC_SOURCES + m.CSRC_HEADERS)
        assert any(p.endswith("common.cuh") for p in m.CSRC_HEADERS)
        assert os.listdir({str(tmp_path)!r}) == []
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_unavailable_reasons_is_cheap_and_explains():
    reasons = csrc.unavailable_reasons()
    assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in reasons)
    assert any("not a CUDA device" in r for r in csrc.unavailable_reasons("cpu"))


@pytest.mark.cuda_build
def test_failed_build_raises_with_compiler_message(tmp_path, monkeypatch):
    if build_skip_reason():
        pytest.skip(build_skip_reason())
    bad = tmp_path / "broken.cu"
    bad.write_text("this is not valid CUDA C++, pefops_marker_token;\n")
    # A fresh loader state pointed at a broken source (monkeypatch restores all of it afterwards).
    monkeypatch.setenv("PEFOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(csrc, "CSRC_SOURCES", [str(bad)])
    monkeypatch.setattr(csrc, "CSRC_HEADERS", [])
    monkeypatch.setattr(csrc, "EXTENSION_NAME", "pefops_csrc_broken_probe")
    monkeypatch.setattr(csrc, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(csrc, "_module", None)
    monkeypatch.setattr(csrc, "_build_error", None)
    with pytest.raises(RuntimeError, match="building the pefops CUDA extension failed") as info:
        csrc.load()
    assert "pefops_marker_token" in str(info.value)  # the compiler's message is included
    assert csrc.build_error() == str(info.value)
    assert any("failed to build" in r for r in csrc.unavailable_reasons())
    with pytest.raises(RuntimeError, match="failed"):  # remembered: no second compile
        csrc.load()
