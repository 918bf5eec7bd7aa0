"""Quick CPU checks of the mixed-task benchmark (issue 15): `pytest bench/test_mixed_tasks.py`.

One layer at batch 4 x seq 16: both providers give a row per mode (and the base alone in forward) with ordered quantiles and a peak,
in the dtype asked for, and the mixed batch's rows equal the loop's (the two providers do the same work)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bench.mixed_tasks import TASKS, build, run  # noqa: E402

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("model_kind, dtype", [("bert-base", torch.float32), ("llama", torch.bfloat16)])
def test_rows_per_provider_and_mode(model_kind, dtype):
    rows = run(model_kind, batch=4, seq=16, layers=1, dtype=dtype)
    assert {(row["provider"], row["mode"]) for row in rows} == {
        (provider, mode) for provider in ("mixed", "loop") for mode in ("fwd", "fwd+bwd")} | {("base", "fwd")}
    for row in rows:
        assert row["dtype"] == str(dtype).removeprefix("torch.") and row["repeats"] == 3
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row


def test_the_mixed_batch_equals_the_loop_row_for_row():
    import pefops.hf as hf

    with tempfile.TemporaryDirectory() as directory:
        model = build("llama", 1, Path(directory))
    names = ["houlsby,pfeiffer" if name == "fusion" else name for name, _ in TASKS]
    row_task = torch.arange(len(names)) % len(names)
    input_ids = torch.randint(5, 1000, (len(names), 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf.set_row_tasks(model, names, row_task)
        mixed = model(input_ids=input_ids).last_hidden_state
        for row, task in enumerate(row_task.tolist()):
            hf.set_row_tasks(model, [names[task]], torch.zeros(1, dtype=torch.long))
            alone = model(input_ids=input_ids[row:row + 1]).last_hidden_state[0]
            torch.testing.assert_close(mixed[row], alone, atol=2e-5, rtol=1e-4)
