"""FSDP2 fine-tuning of a pefops adapter, 2 processes (gloo on CPU; "nccl" with one GPU per rank on GPUs).
Run: python examples/fsdp2_training.py. For DDP, wrap the model in DistributedDataParallel instead of
fully_shard; nothing else changes."""
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

import pefops.hf as hf


def build():
    torch.manual_seed(0)  # every rank (and the unsharded copy) builds the same model
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                     vocab_size=100, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    hf.add_adapter(model, "task", "seq_bn")  # every pefops call that adds parameters comes before fully_shard
    hf.train_adapter(model, "task")
    for parameter in model.classifier.parameters():  # the task head trains too
        parameter.requires_grad_(True)
    return model.eval()  # no dropout: the outputs below compare exactly


def probe():
    return torch.arange(32).reshape(2, 16) % 100


def train(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)  # each layer its own unit: the frozen base is sharded with the adapter
    fully_shard(model)
    optimizer = torch.optim.AdamW(hf.trainable_parameters(model).values(), lr=1e-3)
    data = torch.Generator().manual_seed(rank)  # each rank its own shard of the data
    for _ in range(2):
        ids = torch.randint(0, 100, (4, 16), generator=data)
        model(input_ids=ids, labels=ids[:, 0] % 2).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # every rank calls the save (the shards are gathered), rank 0 writes one ordinary checkpoint:
    # trainable.safetensors + adapters/task/ (loadable by hf.load_adapter)
    hf.save_training_checkpoint(model, out, is_main_process=rank == 0)
    with torch.no_grad():
        logits = model(input_ids=probe()).logits  # a forward of a sharded model: every rank runs it
    if rank == 0:
        torch.save(logits, os.path.join(out, "probe_logits.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    torch.multiprocessing.spawn(train, args=(2, free_port(), out), nprocs=2, join=True)
    served = build()  # an unsharded model, e.g. for serving: the same base + pefops calls, then load
    hf.load_training_checkpoint(served, out)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=probe()).logits, torch.load(os.path.join(out, "probe_logits.pt")))
    print("sharded and unsharded outputs agree; checkpoint:", sorted(os.listdir(out)))
