"""ReLU keeps NaN in the Triton kernels, as torch.relu does (a NaN row stays NaN; other rows are
untouched), forward, and the backward passes the gradient where z is NaN (threshold_backward).
The kernels use tl.where(z < 0, 0, z): a GPU max.f32 (tl.maximum) would return 0 for NaN. The
interpreter's maximum is numpy's, which keeps NaN either way, so this guards the semantics; the
GPU tier runs the same test on the device."""

import pytest
import torch

from pefops.ops import bottleneck_adapter, multi_adapter

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(H=24, r=8, N=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if N is None else (N,)
    make = lambda *s: (torch.randn(*lead, *s, generator=g) * 0.3).to(DEVICE)  # noqa: E731
    return make(r, H), make(r), make(H, r), make(H)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_bottleneck_relu_keeps_a_nan_row(layer_norm):
    H = 24
    x = torch.randn(7, H, device=DEVICE)
    x[3, 5] = float("nan")
    wd, bd, wu, bu = _weights(H)
    ln = (torch.ones(H, device=DEVICE), torch.zeros(H, device=DEVICE), 1e-5) if layer_norm else None
    outs = {}
    for backend in ("torch", "triton"):
        xi = x.clone().requires_grad_(True)
        out = bottleneck_adapter(xi, wd, bd, wu, bu, activation="relu", layer_norm=ln, backend=backend)
        (grad,) = torch.autograd.grad(out, xi, torch.ones_like(out))
        outs[backend] = (out.detach(), grad)
    assert torch.isnan(outs["triton"][0][3]).all(), "the NaN row lost its NaN"
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert not torch.isnan(outs["triton"][0][[0, 1, 2, 4, 5, 6]]).any()


def test_multi_adapter_relu_keeps_a_nan_row():
    H, N = 24, 3
    x = torch.randn(6, H, device=DEVICE)
    x[2, 0] = float("nan")
    index = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    wd, bd, wu, bu = _weights(H, N=N)
    outs = {}
    for backend in ("torch", "triton"):
        xi = x.clone().requires_grad_(True)
        out = multi_adapter(xi, index, wd, bd, wu, bu, activation="relu", backend=backend)
        (grad,) = torch.autograd.grad(out, xi, torch.ones_like(out))
        outs[backend] = (out.detach(), grad)
    assert torch.isnan(outs["triton"][0][2]).all()
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.slow
def test_compiled_relu_has_no_nan_dropping_max():
    """On the GPU target (ptx for sm_90, compiled in a subprocess without TRITON_INTERPRET, no device
    needed): the relu forward has no max.f32, whose NaN rule (return the other operand) turned a NaN
    row into zeros (seen in the ptx before the fix: `max.f32 %r230, %r141, 0f00000000`)."""
    import os
    import subprocess
    import sys

    code = (
        "from pefops.kernels import bottleneck_adapter as ba, shared\n"
        "from pefops.kernels.compile_check import compile_for_target\n"
        "v = next(v for v in ba.compile_variants() if v[0] == 'fwd-bfloat16-r64-noln')\n"
        "ptx = compile_for_target(v[1], v[2], {**v[3], 'ACTIVATION': shared.RELU}, set(v[4]), v[5], v[6]).asm['ptx']\n"
        "print('MAXF32' if 'max.f32' in ptx else 'CLEAN')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("CLEAN"), result.stdout
