"""Two-process DistributedDataParallel (gloo, CPU): adapter gradients computed through our custom
autograd are all-reduced, so both ranks end with identical parameters equal to a single-process run
on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pefops.ops import bottleneck_adapter


class Adapter(torch.nn.Module):
    def __init__(self, hidden=16, rank=4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.down = torch.nn.Parameter(torch.randn(rank, hidden, generator=generator) * 0.3)
        self.down_bias = torch.nn.Parameter(torch.zeros(rank))
        self.up = torch.nn.Parameter(torch.randn(hidden, rank, generator=generator) * 0.3)
        self.up_bias = torch.nn.Parameter(torch.zeros(hidden))
        self.scale = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return bottleneck_adapter(x, self.down, self.down_bias, self.up, self.up_bias, scaling=self.scale, activation="gelu")


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, 16, generator=generator), torch.randn(8, 5, 16, generator=generator)


def _worker(rank, world_size, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = torch.nn.parallel.DistributedDataParallel(Adapter())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = _batch()
    shard = slice(rank * 4, rank * 4 + 4)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[shard]), target[shard]).backward()
        optimizer.step()
    torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gradients_synchronise(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = Adapter()
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    x, target = _batch()
    for _ in range(3):
        optimizer.zero_grad()
        # DDP averages the two shard means: the same as the mean over the whole batch
        torch.nn.functional.mse_loss(single(x), target).backward()
        optimizer.step()
    for name, value in single.state_dict().items():
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0)
        torch.testing.assert_close(states[0][name], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(states[0]["up"], Adapter().up)  # training moved the weights
