"""kernels/launch.py: the autotuning limit (PEFOPS_AUTOTUNE_CONFIGS), token buckets, the grid rule, and
each family's pruner under the limit. No kernel runs: the pruners are called on CPU tensors."""

import pytest
import torch

from pefops.kernels import bottleneck_adapter as ba
from pefops.kernels import gated_blend as gb
from pefops.kernels import launch
from pefops.kernels import masked_linear as ml
from pefops.kernels import multi_adapter as ma

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("value, expected", [("", None), ("all", None), ("0", 0), ("off", 0), ("2", 2), ("1", 1)])
def test_autotune_limit_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv(launch.AUTOTUNE_ENV, value)
    assert launch.autotune_limit() == expected


def test_autotune_limit_rejects_garbage(monkeypatch):
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "many")
    with pytest.raises(ValueError, match="PEFOPS_AUTOTUNE_CONFIGS"):
        launch.autotune_limit()


def test_autotuning_is_off_under_the_interpreter_or_at_zero(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not launch.autotuning()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "0")
    assert not launch.autotuning()
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "2")
    assert launch.autotuning()


def test_token_bucket():
    assert [launch.token_bucket(t) for t in (0, 1, 16, 17, 1000, 16384, 16385, 1 << 30)] == [
        16, 16, 16, 32, 1024, 16384, 32768, 1 << 20]


def test_fill_the_device_keeps_two_programs_per_sm():
    configs = ba._FORWARD_CONFIGS
    kept = launch.fill_the_device(configs, 16384, "cpu")  # 132 SMs assumed off a GPU: >= 264 programs
    assert {c.kwargs["BLOCK_M"] for c in kept} == {16, 32}
    kept = launch.fill_the_device(configs, 1024, "cpu")  # no BLOCK_M gives 264 programs: the smallest
    assert {c.kwargs["BLOCK_M"] for c in kept} == {16}


def _args(dtype=torch.bfloat16, tokens=16384, hidden=4096, rank=64):
    x = torch.empty(1, dtype=dtype)
    return {"x_ptr": x, "grad_ptr": x, "w_ptr": x, "T": tokens, "H": hidden, "R": rank,
            "t_bucket": launch.token_bucket(tokens), "m_bucket": 2048, "N": 4096, "K": 4096, "C": hidden}


@pytest.mark.parametrize("limit", [None, 1, 2])
def test_every_pruner_honours_the_limit(monkeypatch, limit):
    if limit is None:
        monkeypatch.delenv(launch.AUTOTUNE_ENV, raising=False)
    else:
        monkeypatch.setenv(launch.AUTOTUNE_ENV, str(limit))
    args = _args()
    pruned = {
        "bottleneck fwd": ba._prune_forward_configs(ba._FORWARD_CONFIGS, args),
        "bottleneck bwd": ba._prune_backward_configs(ba._BACKWARD_CONFIGS, args),
        "multi_adapter fwd": ma._prune_configs(ma._FORWARD_CONFIGS, args),
        "masked_linear fwd": ml._pruner("forward", "w_ptr")(ml.masked_linear_fwd_tuned.configs, args),
        "gated_blend fwd": gb._prune_forward_configs(gb._FORWARD_CONFIGS, {**args, "R": 16384}),
    }
    for name, kept in pruned.items():
        assert kept, name
        if limit is not None:
            assert len(kept) <= limit, (name, len(kept))
    if limit is None:
        assert len(pruned["bottleneck fwd"]) > 2  # the full search stays the default
    # every bottleneck forward survivor fills an H100 twice over at the headline token count
    assert all(16384 // c.kwargs["BLOCK_M"] >= 264 for c in pruned["bottleneck fwd"])


def test_limit_prefers_the_heuristic_config(monkeypatch):
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1")
    args = _args(tokens=1 << 20)
    block_m, _, block_h, warps = ba._block_sizes(64, 4096)
    (kept,) = ba._prune_forward_configs(ba._FORWARD_CONFIGS, args)
    assert (kept.kwargs["BLOCK_M"], kept.kwargs["BLOCK_H"], kept.num_warps) == (block_m, block_h, warps)
