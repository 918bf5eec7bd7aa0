"""The README's "Training with Trainer / DDP / FSDP2" section (#16): its FSDP2 block is
examples/fsdp2_training.py, character for character, and that script runs (2 gloo processes: train,
save from the sharded model, load into an unsharded one, equal outputs). The section's Trainer block
runs with the README's other blocks in tests/test_readme.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.hf
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fsdp2_training.py"


def section_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Training with Trainer / DDP / FSDP2\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_fsdp2_block_is_the_example():
    assert EXAMPLE.read_text() in section_blocks()


def test_fsdp2_example_runs(tmp_path):
    pytest.importorskip("transformers")
    from torch.distributed import fsdp

    if not (torch.distributed.is_available() and hasattr(fsdp, "fully_shard")):
        pytest.skip("needs torch.distributed with FSDP2 (fully_shard)")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path)], capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded and unsharded outputs agree" in done.stdout
    assert {"trainable.safetensors", "adapters"} <= set(os.listdir(tmp_path))
