"""No host sync on any op's GPU path, checked on CPU: every headline case (bench/headline.py, small
sizes) runs its Triton path under TRITON_INTERPRET=1, forward and backward, with the Tensor methods
that read a value onto the host (item, __bool__, tolist, __int__, __float__) made to raise.

The guard and its list of CPU-only call sites are in tests/host_sync.py. The gpu tier's twin
(tests/ops/test_gpu_headline.py) runs the same cases under torch.cuda.set_sync_debug_mode("error").
"""

import pytest
import torch

from bench.headline import ALL_CASES, forward_backward
from tests.host_sync import HostSync, no_host_sync

pytestmark = pytest.mark.triton


def test_the_guard_catches_a_sync():
    x = torch.ones(3)
    with no_host_sync():
        with pytest.raises(HostSync):
            x.sum().item()
        with pytest.raises(HostSync):
            bool((x > 0).any())
        with pytest.raises(HostSync):
            x.tolist()
        with pytest.raises(HostSync):
            int(x[0])
        torch.tensor([1, 2])  # from a test: allowed (only pefops' own calls are checked)
    assert x.sum().item() == 3.0  # restored


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (tests/conftest.py)


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_triton_path_has_no_host_sync(name):
    call = ALL_CASES[name](DEVICE, torch.float32, "small")
    # the first call may fill caches (parameters, routing plans): those may read nothing either
    with no_host_sync():
        out, grads = forward_backward(call, "triton")
        forward_backward(call, "triton")
    ref_out, ref_grads = forward_backward(ALL_CASES[name](DEVICE, torch.float32, "small"), "torch")
    torch.testing.assert_close(out, ref_out, rtol=1e-3, atol=1e-3)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)
