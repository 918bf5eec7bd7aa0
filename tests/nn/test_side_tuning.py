"""pefops.nn side-tuning modules: the frozen base stores no activations, the blend and the ladder."""

import pytest
import torch

from pefops.nn import LadderSideNetwork, SideTuned


def test_side_tuned_blends_and_trains_only_side_and_alpha():
    torch.manual_seed(0)
    base, side = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    tuned = SideTuned(base, side)
    x = torch.randn(5, 8, requires_grad=True)
    out = tuned(x)
    with torch.no_grad():
        expected = 0.5 * base(x) + 0.5 * side(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    assert all(p.grad is not None for p in side.parameters()) and tuned.alpha.grad is not None
    assert "learn_alpha=True" in repr(tuned)


def test_base_runs_without_storing_activations():
    # the base output carries no autograd graph, so nothing of the base is saved for backward
    base = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    seen = []
    base.register_forward_hook(lambda module, args, output: seen.append(output.grad_fn))
    SideTuned(base, torch.nn.Linear(8, 8))(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert seen == [None]


def test_fixed_alpha():
    tuned = SideTuned(torch.nn.Identity(), torch.nn.Identity(), alpha_init=2.0, learn_alpha=False)
    assert not tuned.alpha.requires_grad


@pytest.mark.parametrize("ladder", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_ladder_network_shapes_masks_and_gradients(ladder, causal):
    torch.manual_seed(0)
    network = LadderSideNetwork(64, num_layers=3, reduction_factor=8, causal=causal, ladder=ladder, base_num_heads=8)
    hidden = [torch.randn(2, 6, 64) for _ in range(4)]
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = network(hidden, mask)
    assert out.shape == (2, 6, 64)
    out[0].sum().backward()
    if ladder:
        assert network.gates.grad is not None and network.gates.grad.shape == (3,)
    # padded keys do not leak into the unpadded positions of row 1
    changed = [h.clone() for h in hidden]
    for h in changed:
        h[1, 4:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(network(changed, mask)[1, :4], network(hidden, mask)[1, :4])
    if causal:  # no position sees a later one
        later = [h.clone() for h in hidden]
        for h in later:
            h[:, 5] = 50.0
        with torch.no_grad():
            torch.testing.assert_close(network(later, mask)[:, :5], network(hidden, mask)[:, :5])


def test_ladder_needs_every_hidden_state():
    network = LadderSideNetwork(32, num_layers=2, reduction_factor=4, base_num_heads=4)
    with pytest.raises(ValueError, match="needs 3 hidden states"):
        network([torch.randn(1, 2, 32)])
