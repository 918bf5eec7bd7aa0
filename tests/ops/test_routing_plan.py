"""masked_linear_routed plans a routing index once (every layer and the backward reuse it); an
in-place change of the index or a new index object makes a new plan."""

import sys

import torch

from pefops.ops import masked_linear_routed, pack_mask
from tests.host_sync import no_host_sync


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 24, generator=g)
    w = torch.randn(40, 24, generator=g)
    masks = torch.stack([pack_mask(torch.randn(40, 24, generator=g) > 0) for _ in range(3)])
    return x, w, masks


def _expected(x, w, masks, task):
    from pefops.ops import masked_linear

    return torch.stack([masked_linear(x[b], w, masks[int(task[b])]) for b in range(x.shape[0])])


def test_plan_reused_then_invalidated():
    module = sys.modules["pefops.ops.masked_linear"]
    x, w, masks = _setup()
    task = torch.tensor([0, 1, 2, 0, 1])
    stats = module.ROUTING_PLAN_STATS
    first = masked_linear_routed(x, w, masks, task)
    built = stats["plans"]
    with no_host_sync():  # a second layer with the same index: no host read, the same plan
        again = masked_linear_routed(x, w, masks, task)
    assert stats["plans"] == built and torch.equal(first, again)
    torch.testing.assert_close(first, _expected(x, w, masks, task))
    task[1] = 2  # in place: its _version moves
    changed = masked_linear_routed(x, w, masks, task)
    assert stats["plans"] == built + 1
    torch.testing.assert_close(changed, _expected(x, w, masks, task))
    other = torch.tensor([2, 2, 1, 0, 0])  # a new index object
    torch.testing.assert_close(masked_linear_routed(x, w, masks, other), _expected(x, w, masks, other))
    assert stats["plans"] == built + 2
