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


def _layers_routed(count, row_task, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    layers, stacks = [], []
    for _ in range(count):
        layer = MaskedLinear(torch.randn(24, 16, generator=g), torch.randn(24, generator=g)).to(device)
        layer.freeze()
        masks = torch.stack([pack_mask(torch.randn(24, 16, generator=g) > 0) for _ in range(2)]).to(device)
        layer.set_row_masks(masks, row_task)
        layers.append(layer)
        stacks.append(masks)
    return layers, stacks


def test_each_layer_plans_its_routing_once_not_per_call():
    """Every layer keeps its own copy of the index and plans it with the routing (set_row_masks): no
    forward plans (a one-entry cache re-planned every layer of every call)."""
    from pefops.ops.masked_linear import ROUTING_PLAN_STATS

    layers, _ = _layers_routed(6, torch.tensor([0, -1, 1, 1, -1]))
    x = torch.randn(5, 3, 16)

    def forward():
        h = x
        for layer in layers:
            h = layer(h)[..., :16]
        return h

    built = ROUTING_PLAN_STATS["plans"]
    first = forward()
    torch.testing.assert_close(forward(), first, rtol=0, atol=0)
    assert ROUTING_PLAN_STATS["plans"] == built


def test_a_cpu_index_stays_on_the_host_and_its_rows_move_to_the_weights_device():
    layers, _ = _layers_routed(1, torch.tensor([0, -1, 1]))
    packed, row_task, (dense_rows, masked_rows, masked_task), plan = layers[0]._row_masks
    assert row_task.device.type == "cpu" and masked_task.device.type == "cpu"
    assert dense_rows.device == masked_rows.device == layers[0].weight.device


@pytest.mark.gpu
def test_mixed_rows_on_a_gpu_with_a_host_index_do_not_sync_after_the_first_call():
    row_task = torch.tensor([0, -1, 1, 1, -1, 0])
    layers, stacks = _layers_routed(4, row_task, device="cuda")
    x = torch.randn(6, 7, 16, device="cuda")

    def forward():
        return [layer(x) for layer in layers]

    forward()  # plans each layer's index (host work, non-blocking copies)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = forward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for layer, masks, out in zip(layers, stacks, outs):
        for b, task in enumerate(row_task.tolist()):
            alone = (F.linear(x[b], layer.weight, layer.bias) if task < 0 else
                     masked_linear(x[b], layer.weight, masks[task], layer.bias))
            torch.testing.assert_close(out[b], alone, rtol=1e-4, atol=1e-4)
