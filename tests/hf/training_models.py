"""Tiny classification models prepared with each pefops method, shared by the training tests
(Trainer, gradient checkpointing, autocast, DDP, FSDP2). Dropout is 0 so that runs compare exactly."""

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import pefops.hf as hf

METHODS = ("adapter", "fusion", "mixed", "masks", "side", "ladder", "prefix", "prompt", "lsh")
VOCAB, SEQ, HIDDEN = 50, 8, 32


def bert_config(**overrides) -> transformers.BertConfig:
    return transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=64,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                                   **overrides)


class SideClassifier(nn.Module):
    """A side-tuned BERT encoder with a classification head on the first token (Trainer needs a loss)."""

    def __init__(self, method: str):
        super().__init__()
        self.tuned = hf.side_tune(transformers.BertModel(bert_config()), method=method, reduction_factor=4)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.tuned(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(hidden[:, 0])
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build(method: str, seed: int = 0, **config_overrides) -> nn.Module:
    """The same model for the same (method, seed), its base frozen and only the method (and the head) training."""
    torch.manual_seed(seed)
    if method in ("side", "ladder"):
        return SideClassifier(method)
    if method == "lsh":
        hf.register_lsh_attention()
    model = transformers.BertForSequenceClassification(bert_config(**config_overrides))
    head = list(model.classifier.parameters())
    if method in ("adapter", "lsh"):
        hf.add_adapter(model, "task", "seq_bn")
        hf.train_adapter(model, "task")
        if method == "lsh":  # two chunks of 4 tokens: real bucketing, not the one-chunk exact path
            hf.configure_lsh_attention(model, num_hashes=2, num_buckets=2, chunk_length=4, hash_seed=0)
    elif method == "fusion":
        for name in ("a", "b"):
            hf.add_adapter(model, name, "seq_bn")
        hf.add_adapter_fusion(model, hf.Fuse("a", "b"), "dynamic")
        hf.train_adapter_fusion(model, hf.Fuse("a", "b"))
    elif method == "mixed":
        for name in ("a", "b"):
            hf.add_adapter(model, name, "seq_bn")
        hf.train_adapter(model, "a")
        for parameter in hf.adapter_parameters(model, "b").values():
            parameter.requires_grad_(True)
        route_rows(model, method, 4)
    elif method == "masks":
        hf.apply_mask_tuning(model, threshold=0.0, init_sparsity=0.5)
    elif method == "prefix":
        hf.apply_prefix_tuning(model, num_virtual_tokens=3, projection_hidden=16, trainable_modules=["classifier"])
    elif method == "prompt":
        hf.apply_prompt_tuning(model, num_virtual_tokens=3, trainable_modules=["classifier"])
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    for parameter in head:  # the task head trains with every method (PEFT's modules_to_save)
        parameter.requires_grad_(True)
    return model


def route_rows(model, method: str, batch_size: int, first_row: int = 0) -> None:
    """Mixed-task batches: global row r uses adapter r % 2 ("a", "b"); `first_row` is where this
    process's slice of the global batch starts (DDP)."""
    if method == "mixed":
        rows = (torch.arange(batch_size) + first_row) % 2
        hf.set_active_adapters(model, ["a", "b"], row_adapter=rows)


def dataset(count: int, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (count, SEQ), generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    mask = torch.ones(count, SEQ, dtype=torch.long)
    mask[1::3, -2:] = 0  # some padding
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(count)]


def batch(examples: list[dict]) -> dict:
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
