"""Triton tier: the shared adapter row passes (kernels/adapter_rows.py) as the two kernel families
launch them. The autotuned launch path with each BLOCK_M candidate (the backward's partial-sum
buffers are sized for the smallest and summed over the rows the chosen config wrote), and the
reversed sweep order against the plain one, for token counts that no BLOCK_M divides and T = 1.
Under TRITON_INTERPRET=1 the autotuner is given one config, so it launches without benchmarking."""

import pytest
import torch
import triton

from pefops.kernels import adapter_rows
from pefops.kernels import bottleneck_adapter as ba
from pefops.kernels import launch
from tests.adapter_inputs import AdapterCase, make_inputs, outputs_and_grads
from tests.ops import test_multi_adapter as multi_tests
from tests.ops.test_bottleneck_adapter import check_against_naive
from pefops.ops import bottleneck_adapter, multi_adapter

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _one_config(monkeypatch, tuned, **kwargs):
    monkeypatch.setattr(tuned, "configs", [triton.Config(kwargs, num_warps=4, num_stages=2)])
    monkeypatch.setattr(tuned, "cache", {})


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the tuner benchmarks; this pins one config per launch")
@pytest.mark.parametrize("block_m", [16, 64, 128])
@pytest.mark.parametrize("tokens", [1, 17, 100, 300])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_autotuned_backward_block_m(monkeypatch, block_m, tokens, layer_norm):
    monkeypatch.setattr(ba, "autotuning", lambda: True)
    _one_config(monkeypatch, ba.bottleneck_adapter_fwd_tuned, BLOCK_M=block_m, BLOCK_H=32)
    _one_config(monkeypatch, ba.bottleneck_adapter_bwd_rows_tuned, BLOCK_M=block_m, BLOCK_H=32)
    # buffers sized for 16-row blocks, written for block_m-row ones: poison the unwritten rows
    empty = torch.empty
    monkeypatch.setattr(ba.torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype") == torch.float32 else empty(*a, **k))
    check_against_naive(AdapterCase(tokens, 40, 5, layer_norm=layer_norm, scaling="channel", device=DEVICE),
                        backend="triton")
    assert ba.bottleneck_adapter_bwd_rows_tuned.best_config.kwargs["BLOCK_M"] == block_m


def _assert_same(first, second):
    (out_a, grads_a), (out_b, grads_b) = first, second
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_bottleneck_sweep_orders_agree(monkeypatch, tokens, layer_norm):
    # H 150 is no multiple of any BLOCK_H: the reversed sweep starts on the partial chunk
    case = AdapterCase(tokens, 150, 6, layer_norm=layer_norm, scaling="channel", separate_residual=True,
                       device=DEVICE)
    results = []
    for reverse in (True, False):
        monkeypatch.setattr(adapter_rows, "REVERSE_SWEEPS", reverse)
        check_against_naive(case, backend="triton")
        inputs, kwargs = make_inputs(case)
        results.append(outputs_and_grads(bottleneck_adapter, case, inputs, kwargs, backend="triton"))
    _assert_same(*results)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_multi_adapter_sweep_orders_agree(monkeypatch, layer_norm):
    case = multi_tests.MultiCase(29, 0, 150, 6, 3, layer_norm=layer_norm, scaling="channel", device=DEVICE)
    results = []
    for reverse in (True, False):
        monkeypatch.setattr(adapter_rows, "REVERSE_SWEEPS", reverse)
        multi_tests.check_against_naive(case, backend="triton")
        inputs, index, kwargs = multi_tests.make_inputs(case)
        results.append(multi_tests.outputs_and_grads(multi_adapter, inputs, index, kwargs, backend="triton"))
    _assert_same(*results)


def test_backward_pruning_fills_the_device_and_fits():
    x = torch.empty(1, dtype=torch.bfloat16)
    for tokens, rank in ((16384, 64), (4096, 256), (100, 16)):
        args = {"grad_ptr": x, "T": tokens, "H": 4096, "R": rank, "t_bucket": launch.token_bucket(tokens)}
        kept = ba._prune_backward_configs(ba._BACKWARD_CONFIGS, args)
        block_ms = {c.kwargs["BLOCK_M"] for c in kept}
        block_r = max(16, triton.next_power_of_2(rank))
        assert all(m * block_r <= 8192 for m in block_ms), (tokens, rank, block_ms)
        programs = min(triton.cdiv(tokens, m) for m in block_ms)
        if tokens >= 264 * 16:  # a 16-row grid fills 132 SMs twice: every survivor must
            assert programs >= 264, (tokens, rank, block_ms)
        else:  # nothing fills the device: the largest grid
            assert block_ms == {16}, (tokens, rank, block_ms)
