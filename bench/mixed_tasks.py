"""Mixed-task batch, end to end (issue 15): one frozen transformers stack, B rows over N tasks of mixed
methods (bottleneck adapters of three configs, an AdapterFusion, mask sets, a prefix, the base), run as one
batch with `hf.set_row_tasks` against the loop a user writes today (each task's rows as their own
batch with that task activated), forward (no_grad) and one training step (forward + backward of every
trainable task parameter), timed interleaved (bench.timing.time_cpu_interleaved, median/p20/p80 ms)
with peak memory (bench.memory.peak_memory), plus the bytes per task by method for the storage table.

    python -m bench.mixed_tasks [--model bert-base|llama] [--batch 16] [--seq 128] [--layers 12]
                                [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--out FILE]

Writes bench/results/mixed_tasks-cpu.json on CPU, mixed_tasks-<device slug>.json on a GPU (rows
appended per model), and prints a Markdown table. The base model is moved to the device and dtype
(default bfloat16 on a GPU) before the tasks are loaded into it; the row index stays on the CPU, as a
data loader gives it. CUDA timing: bench.timing.time_cuda (events, L2 flushed), so the host work of
each call (set_row_tasks and the Python of every layer) counts.
Providers: ``mixed`` (one batch, set_row_tasks), ``loop`` (per task: activate it, run its rows) and,
in forward, ``base`` (the same batch through the frozen base with no task: the floor no routing beats).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from bench.environment import device_name, device_slug, dtype_name, now_iso, parse_dtype, versions
from bench.memory import peak_memory
from bench.results import append_run
from bench.timing import Timing, time_cpu_interleaved, time_cuda

ADAPTERS = (("houlsby", "double_seq_bn"), ("pfeiffer", "seq_bn"), ("parallel", "par_bn"))
MASKS = ("masks_a", "masks_b")
PREFIX_TOKENS = 20
TASKS = ADAPTERS + (("fusion", None), ("masks_a", None), ("masks_b", None), ("prefix", None),
                    (None, None))  # 8 tasks, None: base


def build(model_kind: str, layers: int, root: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A frozen model of BERT-base width (or a LLaMA-shaped decoder stack) with the 8 tasks loaded, on
    `device` in `dtype` (moved there before the tasks are added, so that every task lives there too)."""
    import transformers

    import pefops.hf as hf

    torch.manual_seed(0)
    if model_kind == "llama":
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                          num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4)
    else:
        config = transformers.BertConfig(num_hidden_layers=layers)  # hidden 768, 12 heads, FFN 3072
    model = transformers.AutoModel.from_config(config).eval().to(device=device, dtype=dtype)
    for name, preset in ADAPTERS:
        hf.add_adapter(model, name, preset)
    hf.add_adapter_fusion(model, ["houlsby", "pfeiffer"])
    for mask in MASKS:
        masked = transformers.AutoModel.from_config(config)
        hf.apply_mask_tuning(masked, init_sparsity=0.3 + 0.2 * MASKS.index(mask))
        hf.freeze_masks(masked)
        hf.save_masks(masked, str(root / mask))
        hf.load_task(model, mask, root / mask)
    prefixed = transformers.AutoModel.from_config(copy.deepcopy(config))  # its own config: prefix-tuning switches
    # the config's attention implementation
    hf.apply_prefix_tuning(prefixed, PREFIX_TOKENS)  # the MLP form (512 hidden), as trained
    hf.save_prefix(prefixed, root / "prefix")
    hf.load_task(model, "prefix", root / "prefix")
    model.requires_grad_(False)
    return model


def activate_alone(model, name) -> None:
    """The per-task loop's activation: the task alone for the whole (sub-)batch."""
    import pefops.hf as hf

    hf.set_row_tasks(model, ["houlsby,pfeiffer" if name == "fusion" else name], torch.zeros(1, dtype=torch.long))


def trainable(model):
    import pefops.hf as hf

    parameters = [p for name, _ in ADAPTERS for p in hf.adapter_parameters(model, name).values()]
    parameters += list(model.pefops_task_modules["prefix"].parameters())
    return parameters + list(hf.fusion_parameters(model, ["houlsby", "pfeiffer"]).values())


def run(model_kind: str, batch: int, seq: int, layers: int, device: str = "cpu",
        dtype: torch.dtype = torch.float32) -> list[dict]:
    import pefops.hf as hf

    with tempfile.TemporaryDirectory() as directory:
        model = build(model_kind, layers, Path(directory), device, dtype)
    names = ["houlsby,pfeiffer" if name == "fusion" else name for name, _ in TASKS]
    row_task = torch.arange(batch) % len(names)
    input_ids = torch.randint(5, 1000, (batch, seq)).to(device)
    groups = [(row_task == task).nonzero().flatten().to(device) for task in range(len(names))]

    def forward_mixed(train=False):
        hf.set_row_tasks(model, names, row_task)
        out = model(input_ids=input_ids).last_hidden_state
        if train and out.requires_grad:
            out.square().mean().backward()
        return out

    def forward_base():  # the floor: the same batch through the frozen base alone, no task
        hf.set_row_tasks(model, None)
        return model(input_ids=input_ids).last_hidden_state

    def forward_loop(train=False):
        outs = []
        for task, rows in enumerate(groups):
            if rows.numel():
                hf.set_row_tasks(model, [names[task]], torch.zeros(rows.numel(), dtype=torch.long))
                out = model(input_ids=input_ids[rows]).last_hidden_state
                if train and out.requires_grad:  # mask and base rows train nothing here
                    out.square().mean().backward()
                outs.append(out)
        return outs

    rows_out = []
    for mode, train in (("fwd", False), ("fwd+bwd", True)):
        for parameter in trainable(model):
            parameter.requires_grad_(train)
        fns = {"mixed": lambda: forward_mixed(train), "loop": lambda: forward_loop(train)}
        if not train:
            fns["base"] = forward_base
        with torch.set_grad_enabled(train):
            timings, failed = _time(fns, device)
            memory = {name: peak_memory(fn, device)[0] for name, fn in fns.items()}
        if failed:
            raise RuntimeError(f"providers failed: {failed}")
        for provider, (quantiles, repeats) in timings.items():
            rows_out.append({"op": "mixed_tasks", "model": model_kind, "provider": provider, "mode": mode,
                             "shape": {"batch": batch, "seq": seq, "layers": layers, "tasks": len(names)},
                             "task_names": [name for name, _ in TASKS],
                             "dtype": dtype_name(dtype), "device": device_name(device), "median_ms": quantiles[0],
                             "p20_ms": quantiles[1], "p80_ms": quantiles[2], "repeats": repeats,
                             "peak_bytes": memory[provider], "versions": versions(), "timestamp": now_iso()})
    return rows_out


def _time(fns: dict, device: str) -> tuple[dict, dict]:
    """{provider: ([median, p20, p80] ms, repeats)} and the providers that raised. CPU: 3 interleaved
    calls after one warm-up (a 12-layer call takes seconds); CUDA: events around each call."""
    if not device.startswith("cuda"):
        return time_cpu_interleaved(fns, Timing(warmup_ms=0, rep_ms=0, min_reps=3), rounds=3, calls=(1, 3))
    timings, failed = {}, {}
    for name, fn in fns.items():
        try:
            quantiles, repeats = time_cuda(fn, Timing(warmup_ms=100, rep_ms=500))
            timings[name] = (quantiles, repeats)
        except Exception as error:  # noqa: BLE001
            failed[name] = error
    return timings, failed


def storage_bytes(model_kind: str, layers: int) -> dict:
    """Bytes on disk per task by method (written and measured) and a full fp32 copy of the base."""
    import pefops.hf as hf

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        model = build(model_kind, layers, root)
        hf.save_adapter(model, str(root / "seq_bn"), "pfeiffer")
        hf.save_adapter(model, str(root / "double_seq_bn"), "houlsby")
        hf.save_adapter_fusion(model, str(root / "fusion"), ["houlsby", "pfeiffer"])
        size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())  # noqa: E731
        sizes = {method: size(root / method) for method in ("seq_bn", "double_seq_bn", "fusion")}
        sizes["mask_set"] = size(root / "masks_a")
        base = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n and ".fusions." not in n)
        sizes["full_copy_fp32"] = 4 * base
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("bert-base", "llama"), default="bert-base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--storage", action="store_true", help="also write and measure one checkpoint per method")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/mixed_tasks-<device>.json)")
    args = parser.parse_args()
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    rows = run(args.model, args.batch, args.seq, args.layers, args.device, dtype)
    result = {"rows": rows}
    if args.storage:
        result["storage_bytes"] = storage_bytes(args.model, args.layers)
    default = "mixed_tasks-cpu.json" if args.device == "cpu" else f"mixed_tasks-{device_slug(args.device)}.json"
    append_run(Path(args.out) if args.out else Path(__file__).parent / "results" / default, result)
    print("| model | mode | provider | median ms | p20 | p80 | peak MB |\n|---|---|---|---|---|---|---|")
    for row in rows:
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
        print(f"| {row['model']} {row['shape']} | {row['mode']} | {row['provider']} | {row['median_ms']:.1f} | "
              f"{row['p20_ms']:.1f} | {row['p80_ms']:.1f} | {peak} |")
    if args.storage:
        print(json.dumps(result["storage_bytes"]))


if __name__ == "__main__":
    main()
