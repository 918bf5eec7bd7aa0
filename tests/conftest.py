import os

import pytest
import torch

# Triton runs kernels on CPU tensors only in interpreter mode, and reads the variable when a kernel
# is decorated: set it before anything imports pefops.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="gpu tier: no CUDA device here (bench/gpu_check.sh runs it on an H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # a PEFOPS_BACKEND in the caller's environment must not change what the tests select
    monkeypatch.delenv("PEFOPS_BACKEND", raising=False)
