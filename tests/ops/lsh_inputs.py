"""Shared inputs for the LSH attention tests: a transformers LSHSelfAttention and its projections.

`run_transformers(case)` runs transformers' own module (the anchor) and `run_pefops(case, op)` runs a
pefops op on that module's query_key / value projections of the same hidden states; both return the
output [B, S, hidden] and the gradients of (out * grad).sum() w.r.t. the hidden states and the two
projection weights, so a test compares everything the layer defines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import ReformerConfig  # noqa: E402
from transformers.models.reformer.modeling_reformer import LSHSelfAttention  # noqa: E402


@dataclass
class LshCase:
    seq: int
    chunk: int = 32
    num_hashes: int = 2
    num_buckets: Union[int, list] = 8
    before: int = 1
    after: int = 0
    causal: bool = False
    padding: Optional[str] = None  # None | "ones" (mask of ones) | "tail" (rows padded at the end) | "holes"
    batch: int = 2
    heads: int = 2
    head_dim: int = 8
    seed: int = 3
    dtype: torch.dtype = torch.float32
    dropout: float = 0.0
    device: str = "cpu"

    def __str__(self):
        mask = f"-mask_{self.padding}" if self.padding else ""
        return (f"S{self.seq}-L{self.chunk}-nh{self.num_hashes}-nb{self.num_buckets}-b{self.before}a{self.after}"
                f"{'-causal' if self.causal else ''}{mask}-B{self.batch}-H{self.heads}-D{self.head_dim}")

    @property
    def padded_seq(self):
        if self.seq > self.chunk and self.seq % self.chunk:
            return (self.seq + self.chunk - 1) // self.chunk * self.chunk
        return self.seq


def make_module(case: LshCase) -> LSHSelfAttention:
    torch.manual_seed(case.seed)
    config = ReformerConfig(
        hidden_size=case.heads * case.head_dim, num_attention_heads=case.heads, attention_head_size=case.head_dim,
        lsh_attn_chunk_length=case.chunk, num_hashes=case.num_hashes, num_buckets=case.num_buckets,
        lsh_num_chunks_before=case.before, lsh_num_chunks_after=case.after, hash_seed=case.seed + 100,
        is_decoder=case.causal, lsh_attention_probs_dropout_prob=case.dropout, attn_layers=["lsh"],
        max_position_embeddings=4 * case.padded_seq,
    )
    module = LSHSelfAttention(config, layer_idx=0).to(device=case.device, dtype=case.dtype)
    return module.train() if case.dropout else module.eval()


def make_inputs(case: LshCase):
    """hidden [B, S, hidden], attention mask [B, S] long or None, output grad [B, S, hidden]."""
    generator = torch.Generator().manual_seed(case.seed)
    hidden = torch.randn(case.batch, case.seq, case.heads * case.head_dim, generator=generator).to(case.dtype)
    grad = torch.randn(hidden.shape, generator=generator).to(case.dtype)
    mask = None
    if case.padding is not None:
        mask = torch.ones(case.batch, case.seq, dtype=torch.long)
        if case.padding == "tail":
            mask[-1, case.seq * 2 // 3:] = 0
        elif case.padding == "holes":
            mask = (torch.rand(case.batch, case.seq, generator=generator) > 0.3).long()
            mask[:, 0] = 1
    return hidden.to(case.device), None if mask is None else mask.to(case.device), grad.to(case.device)


def _grads(out, grad, hidden, module):
    loss = (out.float() * grad.float()).sum()
    return torch.autograd.grad(loss, (hidden, module.query_key.weight, module.value.weight))


def run_transformers(case: LshCase, module=None):
    """The anchor: transformers' module, on hidden states zero-padded to a multiple of the chunk with
    mask 0 (as ReformerModel pads) when S is not one; real positions returned."""
    module = make_module(case) if module is None else module
    hidden, mask, grad = make_inputs(case)
    hidden = hidden.clone().requires_grad_()
    padded = case.padded_seq
    module_hidden, module_mask = hidden, mask
    if padded != case.seq:
        module_hidden = torch.nn.functional.pad(hidden, (0, 0, 0, padded - case.seq))
        base = torch.ones(case.batch, case.seq, dtype=torch.long, device=case.device) if mask is None else mask
        module_mask = torch.nn.functional.pad(base, (0, padded - case.seq))
    if case.dropout:
        torch.manual_seed(case.seed + 7)  # the dropout draws after the rotations' reseeding
    out = module(module_hidden, attention_mask=module_mask).hidden_states[:, :case.seq]
    return (out, *_grads(out, grad, hidden, module))


def run_pefops(case: LshCase, op, module=None, **options):
    """`op(qk, v, **lsh options)` on the module's projections; the same outputs and grads."""
    module = make_module(case) if module is None else module
    hidden, mask, grad = make_inputs(case)
    hidden = hidden.clone().requires_grad_()
    batch, seq = hidden.shape[:2]

    def heads(x):
        return x.view(batch, seq, case.heads, case.head_dim).transpose(1, 2)

    qk, v = heads(module.query_key(hidden)), heads(module.value(hidden))
    kwargs = dict(num_hashes=case.num_hashes, num_buckets=case.num_buckets, chunk_length=case.chunk,
                  num_chunks_before=case.before, num_chunks_after=case.after, causal=case.causal,
                  attention_mask=mask, hash_seed=case.seed + 100, dropout_p=case.dropout)
    kwargs.update(options)
    if case.dropout:
        torch.manual_seed(case.seed + 7)
    out = op(qk, v, **kwargs).transpose(1, 2).reshape(batch, seq, -1)
    return (out, *_grads(out, grad, hidden, module))


NAMES = ("out", "d_hidden", "d_query_key.weight", "d_value.weight")
