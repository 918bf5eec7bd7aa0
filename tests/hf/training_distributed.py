"""Worker for the 2-process training tests (#16): every method trained K steps with DDP or FSDP2 over
gloo on CPU, each rank on its half of the global batch; each rank writes its trainable parameters
(gathered from shards) for the test to compare with a single-process run over the whole batch.
Under FSDP2 each rank then also checks checkpoints of the sharded model (`sharded_checkpoints`) and
what a sharded model refuses (`sharded_refusals`)."""

import os
import socket

import torch
import torch.distributed as dist

import pefops.hf as hf
from pefops.hf.sharding import full_tensor
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


def logits(model, method) -> torch.Tensor:
    """The same evaluation rows on every rank (a fixed batch of the training set's first rows)."""
    rows = dataset(GLOBAL_BATCH)[:GLOBAL_BATCH // WORLD]
    route_rows(model, method, len(rows))
    with torch.no_grad():
        return model(**{k: v for k, v in batch(rows).items() if k != "labels"}).logits.clone()


def exports(directory) -> dict:
    """Every file of a checkpoint directory: JSON text, or the tensors of a safetensors file."""
    from safetensors.torch import load_file

    found = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, directory)
            found[key] = load_file(path) if name.endswith(".safetensors") else open(path).read()
    return found


def sharded_checkpoints(model, method, rank, output_dir) -> dict:
    """hf.save_training_checkpoint (which runs the method's own hf.save_*) on the sharded, trained
    model, every rank calling it; then the checkpoint loaded into an unsharded and a sharded rebuild.
    Returns the logits of all three and, on rank 0, the files of the sharded save and of the same save
    from the unsharded rebuild (equal files: the gathered checkpoint is an ordinary one)."""
    sharded_dir = os.path.join(output_dir, f"ckpt-{method}-sharded")
    hf.save_training_checkpoint(model, sharded_dir, is_main_process=rank == 0)
    dist.barrier()  # rank 0 has written every file
    unsharded = build(method)
    hf.load_training_checkpoint(unsharded, sharded_dir)
    resharded = shard(build(method), method)
    hf.load_training_checkpoint(resharded, sharded_dir)
    result = {"trained": logits(model, method), "unsharded": logits(unsharded, method),
              "resharded": logits(resharded, method)}
    if rank == 0:
        unsharded_dir = os.path.join(output_dir, f"ckpt-{method}-unsharded")
        hf.save_training_checkpoint(unsharded, unsharded_dir)
        result["files"] = exports(sharded_dir), exports(unsharded_dir)
    return result


def sharded_refusals(model) -> dict:
    """The message of each call that would change a sharded model's parameters (the model is a sharded
    "adapter" model), and whether its parameter names stayed as they were."""
    names = [name for name, _ in model.named_parameters()]
    calls = {
        "add_adapter": lambda: hf.add_adapter(model, "other", "seq_bn"),
        "remove_adapter": lambda: hf.remove_adapter(model, "task"),
        "apply_mask_tuning": lambda: hf.apply_mask_tuning(model),
        "apply_prefix_tuning": lambda: hf.apply_prefix_tuning(model, num_virtual_tokens=2),
        "freeze_masks": lambda: hf.freeze_masks(model),
        "load_adapter": lambda: hf.load_adapter(model, "a directory that is never read"),
        "load_task": lambda: hf.load_task(model, "other", "a directory that is never read"),
    }
    messages = {}
    for call, run in calls.items():
        try:
            run()
            messages[call] = None
        except ValueError as error:
            messages[call] = str(error)
    messages["unchanged"] = names == [name for name, _ in model.named_parameters()]
    return messages


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
            result = {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters() if p.requires_grad}
            torch.save(result, os.path.join(output_dir, f"{mode}-{method}-{rank}.pt"))
            if mode == "fsdp":
                torch.save(sharded_checkpoints(model, method, rank, output_dir),
                           os.path.join(output_dir, f"checkpoints-{method}-{rank}.pt"))
                if method == "adapter":
                    torch.save(sharded_refusals(model), os.path.join(output_dir, f"refusals-{rank}.pt"))
        # both ranks done before either tears gloo down: a rank that destroyed the group while the other
        # was still in its last collective aborted once in CI ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
