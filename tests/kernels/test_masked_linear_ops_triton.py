"""Triton tier through the public ops: masked_linear and masked_linear_scores with backend="triton"
(custom ops, autograd, the Triton launchers; interpreter on CPU, the device on a GPU machine)."""

import pytest
import torch

from pefops import backend as backends
from pefops.ops import masked_linear, masked_linear_scores, pack_mask
from tests.masked_inputs import make_case, naive_masked_linear
from tests.tolerances import TOLERANCE_TF32, assert_close

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 5, 9), (33, 64, 100), (1, 1, 1)])
@pytest.mark.parametrize("transposed", [False, True])
def test_training_and_inference_forms(dtype, shape, transposed):
    rows, out_features, in_features = shape
    x, weight, scores, b = make_case(rows, out_features, in_features, dtype=dtype, device=DEVICE,
                                     transposed_weight=transposed)
    x.requires_grad_(), scores.requires_grad_(), b.requires_grad_()
    out = masked_linear_scores(x, weight, scores, 0.1, b, backend="triton")
    mask = scores.detach() > 0.1
    assert_close(out, naive_masked_linear(x, weight, mask, b), dtype, "out")
    grad = torch.randn_like(out)
    out.backward(grad)
    g = grad.double()
    assert_close(scores.grad, (g.t() @ x.detach().double()) * weight.double(), dtype, "dscores")
    assert_close(x.grad, g @ (weight.double() * mask), dtype, "dx")
    assert_close(b.grad, g.sum(0), dtype, "dbias")
    with torch.no_grad():
        frozen = masked_linear(x, weight, pack_mask(mask), b, backend="triton")
    assert_close(frozen, naive_masked_linear(x, weight, mask, b), dtype, "inference")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 16, 2048])
def test_auto_selection_and_real_sizes_on_gpu(dtype, rows):
    x, weight, scores, b = make_case(rows, 4096, 4096, dtype=dtype, device="cuda")
    mask = scores > 0
    packed = pack_mask(mask)
    problem = backends.Problem(torch.device("cuda"), dtype, "forward",
                               {"rows": rows, "out_features": 4096, "in_features": 4096, "weight_contiguous": 1})
    assert backends.select("masked_linear", problem).backend == ("cuda" if rows <= 16 else "triton")
    with torch.no_grad():
        out = masked_linear(x, weight, packed, b)
    tolerance = TOLERANCE_TF32 if dtype == torch.float32 else None
    assert_close(out, naive_masked_linear(x, weight, mask, b), dtype, "auto", tolerance)
