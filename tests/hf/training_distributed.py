"""Worker for the 2-process training tests (#16): every method trained K steps with DDP or FSDP2 over
gloo on CPU, each rank on its half of the global batch; each rank writes its trainable parameters
(gathered from shards) for the test to compare with a single-process run over the whole batch."""

import os
import socket

import torch
import torch.distributed as dist

from tests.hf.training_models import batch, build, dataset, route_rows

STEPS, GLOBAL_BATCH, WORLD = 2, 4, 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def single_process(method) -> dict:
    """The reference: the same steps on one process over the whole batch."""
    model = build(method)
    train(model, method, rank=0, world=1)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def train(model, method, rank, world, wrapped=None):
    examples = dataset(GLOBAL_BATCH * STEPS)
    local = GLOBAL_BATCH // world
    route_rows(model, method, local, first_row=rank * local)
    # SGD, not Adam: Adam scales a gradient that is rounding noise (an attention key bias has none in
    # exact arithmetic) into a full step, and noise differs between 1 and 2 processes
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * local
        loss = (wrapped or model)(**batch(examples[start:start + local])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def shard(model, method):
    """FSDP2: every transformer layer its own unit (the frozen base sharded with it), then the root."""
    from torch.distributed.fsdp import fully_shard

    base = model.tuned.base if method in ("side", "ladder") else model.bert
    for layer in base.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def worker(rank, mode, methods, port, output_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for method in methods:
            model = build(method)
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                train(model, method, rank, WORLD, wrapped=DistributedDataParallel(model))
            else:
                train(shard(model, method), method, rank, WORLD)
            from pefops.hf.training import full_tensor

            result = {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters() if p.requires_grad}
            torch.save(result, os.path.join(output_dir, f"{mode}-{method}-{rank}.pt"))
    finally:
        dist.destroy_process_group()
