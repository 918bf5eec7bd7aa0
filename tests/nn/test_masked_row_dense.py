"""MaskedLinear.set_row_masks with row_task -1 (issue 15): those rows use the shared weight without a
mask (one dense GEMM), the others their task mask; outputs and input gradients equal each row alone."""

import pytest
import torch
import torch.nn.functional as F

from pefops.nn import MaskedLinear
from pefops.ops import masked_linear, pack_mask


@pytest.mark.parametrize("row_task", [[-1, 1, -1, 0, 1], [-1, -1, -1, -1, -1], [0, 1, 1, 0, 0]])
def test_unmasked_rows_and_masked_rows_equal_each_row_alone(row_task):
    g = torch.Generator().manual_seed(0)
    layer = MaskedLinear(torch.randn(40, 27, generator=g), torch.randn(40, generator=g))
    layer.freeze()
    masks = torch.stack([pack_mask(torch.randn(40, 27, generator=g) > 0) for _ in range(2)])
    x = torch.randn(5, 3, 27, generator=g, requires_grad=True)
    layer.set_row_masks(masks, torch.tensor(row_task))
    out = layer(x)
    grad = torch.randn_like(out)
    (x_grad,) = torch.autograd.grad(out, x, grad)
    for b, task in enumerate(row_task):
        row = x[b].detach().requires_grad_(True)
        alone = (F.linear(row, layer.weight, layer.bias) if task < 0 else
                 masked_linear(row, layer.weight, masks[task], layer.bias))
        torch.testing.assert_close(out[b], alone, rtol=1e-5, atol=1e-5)
        (row_grad,) = torch.autograd.grad(alone, row, grad[b])
        torch.testing.assert_close(x_grad[b], row_grad, rtol=1e-5, atol=1e-5)


def test_row_task_below_minus_one_is_refused():
    layer = MaskedLinear(torch.randn(8, 5), None)
    layer.freeze()
    masks = pack_mask(torch.ones(8, 5, dtype=torch.bool))[None]
    with pytest.raises(ValueError, match=r"row_task values must be in \[-1, 1\) \(1 task masks; -1: no mask\)"):
        layer.set_row_masks(masks, torch.tensor([0, -2]))


def test_a_batch_of_another_size_is_refused():
    layer = MaskedLinear(torch.randn(8, 5), None)
    layer.freeze()
    layer.set_row_masks(pack_mask(torch.ones(8, 5, dtype=torch.bool))[None], torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"row_task must be an integer tensor \[3\].*routed 2 rows"):
        layer(torch.randn(3, 4, 5))
