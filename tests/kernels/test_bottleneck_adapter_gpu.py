"""gpu tier: the Triton kernels and the CUDA decode path on the device, at real sizes, against the
float64 formula. Skipped without CUDA; bench/gpu_check.sh runs it on an H200."""

import pytest
import torch

from pefops import backend as backends
from pefops.ops import bottleneck_adapter
from tests.adapter_inputs import AdapterCase, make_inputs, naive_adapter, outputs_and_grads
from tests.ops.test_bottleneck_adapter import check_against_naive
from tests.tolerances import TOLERANCE, TOLERANCE_TF32, assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden, rank", [(768, 16), (1023, 64), (4096, 64), (1024, 256), (768, 1024)])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_triton_real_sizes(dtype, hidden, rank, layer_norm):
    # fp32 sums run over 4096 tokens or hidden units here: allow the TF32-row tolerance
    tolerance = TOLERANCE_TF32 if dtype == torch.float32 else TOLERANCE[dtype]
    check_against_naive(AdapterCase(4096, hidden, rank, dtype=dtype, layer_norm=layer_norm, scaling="channel",
                                    device="cuda", activation="gelu"), backend="triton", tolerance=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("hidden, rank", [(768, 16), (1023, 1), (4096, 64), (1024, 1024)])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_cuda_decode_forward(dtype, tokens, hidden, rank, layer_norm):
    case = AdapterCase(tokens, hidden, rank, dtype=dtype, layer_norm=layer_norm, scaling="channel", device="cuda",
                       activation="silu", separate_residual=True)
    inputs, kwargs = make_inputs(case)
    with torch.no_grad():
        out = bottleneck_adapter(inputs["x"], inputs["down_weight"], inputs["down_bias"], inputs["up_weight"],
                                 inputs["up_bias"], backend="cuda", **kwargs)
        expected = naive_adapter(inputs["x"], inputs["down_weight"], inputs["down_bias"], inputs["up_weight"],
                                 inputs["up_bias"], **kwargs)
    assert_close(out, expected, dtype, f"cuda decode {case}", TOLERANCE_TF32 if dtype == torch.float32 else None)


def test_auto_selection_on_gpu():
    problem = backends.Problem(torch.device("cuda"), torch.bfloat16, "forward", {"tokens": 8, "hidden": 1024, "rank": 64})
    assert backends.select("bottleneck_adapter", problem).backend == "cuda"
    problem = backends.Problem(torch.device("cuda"), torch.bfloat16, "forward", {"tokens": 4096, "hidden": 1024, "rank": 64})
    assert backends.select("bottleneck_adapter", problem).backend == "triton"
    problem = backends.Problem(torch.device("cuda"), torch.bfloat16, "backward", {"tokens": 8, "hidden": 1024, "rank": 64})
    assert backends.select("bottleneck_adapter", problem).backend == "triton"


def test_decode_forward_then_backward_on_triton():
    # forward at decode shape on the CUDA kernel, backward on Triton: one autograd contract
    case = AdapterCase(4, 512, 32, dtype=torch.bfloat16, layer_norm=True, device="cuda")
    inputs, kwargs = make_inputs(case)
    out, grads = outputs_and_grads(bottleneck_adapter, case, inputs, kwargs)
    ref_out, ref_grads = outputs_and_grads(bottleneck_adapter, case, inputs, kwargs, backend="torch")
    assert_close(out, ref_out, torch.bfloat16, "out")
    for name in grads:
        assert_close(grads[name], ref_grads[name], torch.bfloat16, name)
