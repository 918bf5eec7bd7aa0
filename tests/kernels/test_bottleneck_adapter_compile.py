"""Triton tier, real backend: compile every kernel variant ahead of time for sm_90 and sm_80 (no GPU
needed) and check the heuristic configs do not spill registers. The interpreter cannot catch
layout or type errors of the real compiler; this does. Runs in a subprocess because this test
process decorated the kernels in interpreter mode."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")
pytestmark = [pytest.mark.triton, pytest.mark.slow]


@pytest.mark.parametrize("capability", [90, 80])
def test_all_variants_compile_without_spills(capability):
    environment = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "pefops.kernels.compile_check", "--json", "--capability", str(capability)],
        capture_output=True, text=True, env=environment, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) >= 36
    # 16-bit variants on sm_90 (the target) must not spill; fp32 ones and sm_80's LayerNorm
    # backward spill a few bytes at most (recorded in bench/NOTES.md)
    strict = lambda row: capability == 90 and "float32" not in row["kernel"]  # noqa: E731
    spilling = [row for row in rows if row["spill_stores"] > (0 if strict(row) else 64)]
    assert not spilling, f"register spills on sm_{capability}: {spilling}"
