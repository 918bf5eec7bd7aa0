"""pefops.ops.common.constant: the stand-ins for absent biases / float scalings are made once."""

import torch

from pefops.ops.common import constant


def test_constant_is_made_once_per_key():
    a = constant(0.5, (7,), torch.float32, "cpu")
    assert constant(0.5, (7,), torch.float32, "cpu") is a
    assert torch.equal(a, torch.full((7,), 0.5))
    assert constant(0.5, (7,), torch.float16, "cpu") is not a
    assert constant(1.0, (7,), torch.float32, "cpu") is not a
    assert constant(0.5, (2, 7), torch.float32, "cpu").shape == (2, 7)
