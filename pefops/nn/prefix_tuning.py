"""Prefix-tuning (Li & Liang, ACL 2021) and prompt tuning (Lester et al., EMNLP 2021) modules.

PrefixEncoder holds the trainable prefix: per layer P key and P value vectors for every key/value
head. With `projection` they are reparameterised as PEFT does (Embedding -> Linear -> Tanh -> Linear),
which the paper found to stabilise training; without it they are a plain embedding table. The
flat layout of the last dimension is PEFT's, ((layer * 2 + {0: key, 1: value}) * heads + head) * head_dim
+ d, so PEFT checkpoints (which store that flat tensor) load without reordering.

PromptEmbedding holds P virtual input embeddings that are prepended to the token embeddings.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PrefixEncoder(nn.Module):
    """The prefix key/values of `num_layers` attention layers, `num_virtual_tokens` (P) slots each.

    forward() -> a list over layers of (prefix_k, prefix_v), each [num_kv_heads, P, head_dim];
    layer(i) -> that pair for one layer only (computes only layer i's slice of the last Linear).

    projection=True: embedding [P, embedding_dim] -> Linear(embedding_dim, projection_hidden) -> Tanh
    -> Linear(projection_hidden, num_layers * 2 * num_kv_heads * head_dim), as PEFT's PrefixEncoder
    with prefix_projection=True (embedding_dim defaults to num_kv_heads * head_dim, PEFT's token_dim).
    projection=False: embedding [P, num_layers * 2 * num_kv_heads * head_dim] is the prefix itself.
    zero_init: start the last Linear (or the table) at zero, PEFT's init_weights="zero".
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int,
                 projection: bool = True, projection_hidden: int = 512, embedding_dim: Optional[int] = None,
                 zero_init: bool = False):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("num_virtual_tokens", num_virtual_tokens), ("projection_hidden", projection_hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PrefixEncoder: {name} must be a positive int; got {value!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_virtual_tokens = num_virtual_tokens
        self.projection = projection
        self.projection_hidden = projection_hidden if projection else None
        self.layer_width = 2 * num_kv_heads * head_dim  # key and value of one layer in the flat layout
        out_features = num_layers * self.layer_width
        if projection:
            self.embedding_dim = embedding_dim or num_kv_heads * head_dim
            self.embedding = nn.Embedding(num_virtual_tokens, self.embedding_dim)
            self.transform = nn.Sequential(nn.Linear(self.embedding_dim, projection_hidden), nn.Tanh(),
                                           nn.Linear(projection_hidden, out_features))
            if zero_init:
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            self.embedding_dim = out_features
            self.embedding = nn.Embedding(num_virtual_tokens, out_features)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)

    def flat(self) -> torch.Tensor:
        """All layers' prefixes in PEFT's flat layout [P, num_layers * 2 * num_kv_heads * head_dim] (what a
        PEFT checkpoint stores as "prompt_embeddings")."""
        if not self.projection:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v) of layer `index`, each [num_kv_heads, P, head_dim]."""
        if not 0 <= index < self.num_layers:
            raise ValueError(f"PrefixEncoder has {self.num_layers} layers; asked for layer {index}")
        rows = slice(index * self.layer_width, (index + 1) * self.layer_width)
        if self.projection:
            # only this layer's rows of the last Linear: L calls cost one full projection, not L
            hidden = torch.tanh(self.transform[0](self.embedding.weight))
            last = self.transform[2]
            flat = F.linear(hidden, last.weight[rows], last.bias[rows])
        else:
            flat = self.embedding.weight[:, rows]
        # [P, 2 * Hkv * D] -> [2, Hkv, P, D]
        pair = flat.view(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return pair[0], pair[1]

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        flat = self.flat()
        pairs = flat.view(self.num_virtual_tokens, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        pairs = pairs.permute(1, 2, 3, 0, 4)  # [L, 2, Hkv, P, D]
        return [(pairs[i, 0], pairs[i, 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> None:
        """Set the prefix from PEFT's flat tensor [P, num_layers * 2 * Hkv * D]; needs projection=False (the
        MLP cannot be recovered from its output)."""
        if self.projection:
            raise ValueError("load_flat needs a PrefixEncoder with projection=False: a flat prefix has no MLP")
        if tuple(flat.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(f"flat prefix has shape {tuple(flat.shape)}; "
                             f"expected {tuple(self.embedding.weight.shape)} "
                             "[num_virtual_tokens, num_layers * 2 * num_kv_heads * head_dim]")
        self.embedding.weight.copy_(flat.to(self.embedding.weight))

    def extra_repr(self) -> str:
        text = (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection}")
        if self.projection:
            text += f", projection_hidden={self.projection_hidden}"
        return text


class PromptEmbedding(nn.Module):
    """P trainable virtual token embeddings [P, hidden]; forward(batch_size) -> [batch, P, hidden].

    init: "random" (normal, std `init_std`), "vocab" (rows of `word_embeddings` at random token ids, as
    PEFT's SAMPLE_VOCAB), or a text / a sequence of token ids (the ids' embeddings, the id list cycled
    or cut to P, as PEFT's TEXT init; a text needs `tokenizer`)."""

    def __init__(self, num_virtual_tokens: int, hidden: int, init="random",
                 word_embeddings: Optional[nn.Embedding] = None, tokenizer=None, init_std: float = 0.02,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"PromptEmbedding: num_virtual_tokens must be a positive int; got {num_virtual_tokens!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.hidden = hidden
        self.embedding = nn.Embedding(num_virtual_tokens, hidden)
        self.init = init if isinstance(init, str) and init in ("random", "vocab") else "text"
        with torch.no_grad():
            if init == "random":
                self.embedding.weight.normal_(0.0, init_std, generator=generator)
            else:
                if word_embeddings is None:
                    raise ValueError(f"PromptEmbedding init={init!r} needs word_embeddings "
                                     "(the model's input embedding)")
                if word_embeddings.weight.shape[1] != hidden:
                    raise ValueError(f"word_embeddings have width {word_embeddings.weight.shape[1]}; "
                                     f"the prompt has {hidden}")
                if init == "vocab":
                    ids = torch.randint(0, word_embeddings.num_embeddings, (num_virtual_tokens,), generator=generator)
                else:
                    ids = self._text_ids(init, tokenizer)
                ids = ids.to(word_embeddings.weight.device)
                self.embedding.weight.copy_(word_embeddings(ids).float())

    def _text_ids(self, text, tokenizer) -> torch.Tensor:
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("PromptEmbedding init with a text needs a tokenizer (or pass token ids)")
            ids = list(tokenizer(text)["input_ids"])
        elif isinstance(text, Sequence) or isinstance(text, torch.Tensor):
            ids = [int(i) for i in text]
        else:
            raise ValueError(f"init must be 'random', 'vocab', a text or token ids; got {type(text).__name__}")
        if not ids:
            raise ValueError("the init text has no tokens")
        ids = (ids * math.ceil(self.num_virtual_tokens / len(ids)))[: self.num_virtual_tokens]
        return torch.tensor(ids, dtype=torch.long)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, hidden={self.hidden}, init={self.init}"
