"""Fixtures of the csrc tests: the extension for the cuda-build tier (`built_ext`: compiles it, no GPU
needed) and for the gpu tier (`ext`: skipped without a CUDA device). One build per session: csrc.load()
is memoised in the process and cached on disk."""

import time

import pytest

from pefops import csrc
from tests.csrc.helpers import build_skip_reason


@pytest.fixture(scope="session")
def built_ext():
    reason = build_skip_reason()
    if reason:
        pytest.skip(reason)
    start = time.perf_counter()
    module = csrc.load()  # a build failure is a test error, never a skip
    print(f"\npefops csrc extension ready in {time.perf_counter() - start:.1f}s: {module.__file__}")
    return module


@pytest.fixture(scope="session")
def ext():
    reasons = csrc.unavailable_reasons("cuda")
    if reasons:
        pytest.skip("; ".join(reasons))
    return csrc.load()
