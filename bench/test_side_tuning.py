"""Quick CPU checks of the side-tuning training-step benchmark: `pytest bench/test_side_tuning.py`.

Tiny LLaMA only, batch 2 x seq 32: every available provider runs training steps through the same
`setup_side_tuning` that `python -m bench --ops side_tuning` uses, the loss is finite, the base
weights stay unchanged for every method but full fine-tuning (and the trainable ones move), the peak
memory of a step is positive, and the runner's summary table shows the memory columns.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

pytest.importorskip("transformers")

from bench.interface import ProviderUnavailable  # noqa: E402
from bench.memory import peak_memory  # noqa: E402
from bench.running import RunOptions, run  # noqa: E402
from bench.tables import summary_tables  # noqa: E402
from bench.side_tuning import BENCHMARK, MODE, PROVIDERS, setup_side_tuning  # noqa: E402

CONFIG = {"model": "llama-tiny", "batch": 2, "seq": 32, "device": "cpu", "dtype": torch.float32}


@functools.lru_cache(maxsize=None)
def _setup():
    return setup_side_tuning(dict(CONFIG))


def _trainer(setup, provider):
    try:
        setup.fn(provider, MODE)
    except ProviderUnavailable as error:
        pytest.skip(f"{provider}: {error}")
    return setup.trainers[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(provider):
    setup = _setup()
    base_state = {k: v.clone() for k, v in setup.base.state_dict().items()}
    trainer = _trainer(setup, provider)
    before = [p.detach().clone() for p in trainer.params]
    frozen = {n: p.detach().clone() for n, p in trainer.module.named_parameters() if not p.requires_grad}
    for _ in range(2):
        trainer.step()
        assert trainer.last_loss is not None and math.isfinite(trainer.last_loss.item())
    assert all(p.grad is None for p in trainer.params), "gradients must not outlive the step"
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.params)), "nothing trained"
    # the seeded base every provider copies is never trained
    for key, value in setup.base.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    if provider == "full":
        assert not frozen
        return
    # the base copy this provider was given (and every frozen parameter of what it trains) is unchanged
    model_state = setup.models[provider].state_dict()
    for key, value in base_state.items():
        assert torch.equal(model_state[key], value), f"{provider}: base weight {key} changed"
    for name, value in frozen.items():
        assert torch.equal(dict(trainer.module.named_parameters())[name].detach(), value), name
    # every base weight is frozen: the trainable set is far smaller than the base
    base_numel = sum(v.numel() for v in base_state.values())
    assert trainer.trainable() < 0.2 * base_numel


@pytest.mark.parametrize("provider", PROVIDERS)
def test_peak_memory_positive(provider):
    setup = _setup()
    _trainer(setup, provider)
    fn = setup.fn(provider, MODE)
    fn()  # AdamW state allocated outside the measured step
    peak, method = peak_memory(fn, "cpu")
    assert peak is not None and peak > 0, method
    assert setup.trainers[provider].optimizer_state_bytes() > 0
    assert "trainable" in setup.describe(provider, MODE)


def test_runner_table_shows_memory_share():
    bench = dataclasses.replace(BENCHMARK, configs=lambda device, dtype, quick: [dict(CONFIG)])
    result = run([bench], RunOptions(device="cpu", quick=True))
    rows = {r["provider"]: r for r in result.rows}
    assert "full" in rows and "adapters" in rows
    assert all(r["reps"] == 3 and r["peak_memory_bytes"] > 0 for r in rows.values())
    table = summary_tables(result.rows, result.meta)
    assert "adapters peak MiB (% of full)" in table and "train-step" in table
