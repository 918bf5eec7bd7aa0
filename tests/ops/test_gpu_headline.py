"""gpu tier, headline first (bench/gpu_check.sh runs this file before the rest of the tier): every op
family's headline call (bench/headline.py: bf16, the benchmark's real sizes) fwd + bwd against the
torch backend in fp32; the same calls with torch.cuda.set_sync_debug_mode("error") (no host sync on
any op's GPU path); and each call captured fwd + bwd in a CUDA graph and replayed on new values.

Tolerance: relative RMS error ||got - ref|| / ||ref|| <= 2e-2 for bf16 outputs and gradients (the
bf16 row of tests/tolerances.py as a norm, since real sizes sum thousands of rounded terms)."""

import pytest
import torch

from bench.headline import ALL_CASES, forward_backward

pytestmark = [pytest.mark.gpu]

RELATIVE_RMS = 2e-2
CASE_NAMES = list(ALL_CASES)


def _relative_rms(got, ref):
    got, ref = got.float(), ref.float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _reference(name, call):
    if call.reference_dtype == "same":
        return forward_backward(call, "torch")
    ref_call = ALL_CASES[name]("cuda", torch.float32, "real")
    return forward_backward(ref_call, "torch")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_headline_matches_the_fp32_reference(name):
    call = ALL_CASES[name]("cuda", torch.bfloat16, "real")
    out, grads = forward_backward(call, None)
    ref_out, ref_grads = _reference(name, call)
    assert out.dtype == torch.bfloat16
    errors = {"out": _relative_rms(out, ref_out)}
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"gradient {i}"
        if g is not None:
            errors[f"grad{i}"] = _relative_rms(g, r)
    bad = {k: v for k, v in errors.items() if not v <= RELATIVE_RMS}
    assert not bad, f"{name}: relative RMS errors over {RELATIVE_RMS}: {bad} (all: {errors})"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_headline_has_no_host_sync(name):
    call = ALL_CASES[name]("cuda", torch.bfloat16, "real")
    forward_backward(call, None)  # compilation and autotuning synchronise: once, outside the check
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(call, None)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_headline_replays_in_a_cuda_graph(name):
    call = ALL_CASES[name]("cuda", torch.bfloat16, "small")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            forward_backward(call, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, grads = forward_backward(call, None)
    fresh = ALL_CASES[name]("cuda", torch.bfloat16, "small", seed=5)
    with torch.no_grad():  # new values in the captured inputs
        for leaf, new in zip(call.inputs, fresh.inputs):
            leaf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_grads = forward_backward(call, None)
    assert torch.equal(out, eager_out) or _relative_rms(out, eager_out) < 1e-3, name
    for g, e in zip(grads, eager_grads):
        if g is not None:
            assert _relative_rms(g, e) < 1e-3, name
