"""Where adapters go in each transformers architecture: a table, not code per model.

Two styles of site cover the supported models:
- "post_ln" (BERT, RoBERTa): a module computes LayerNorm(dropout(dense(hidden_states)) + input_tensor);
  its forward is replaced so the adapter sees h = dropout(dense(...)), r = input_tensor and the
  LayerNorm, which the fused kernel applies in its epilogue.
- "pre_norm" (GPT-2, LLaMA): the block adds the residual itself. A forward hook on the sublayer's
  output projection gives h; a pre-hook on the norm in front of the sublayer captures r (the
  residual stream); the hook returns the new sublayer output, final - r, so the block's own
  addition gives the adapted result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Site:
    location: str  # AdapterHub's location key: "mh_adapter" (after attention) or "output_adapter" (after FFN)
    style: str  # "post_ln" or "pre_norm"
    module: str  # post_ln: the module whose forward is replaced; pre_norm: the projection that is hooked
    residual_norm: Optional[str]  # pre_norm: the norm whose input is the residual stream r
    adapterhub_prefix: str  # the key prefix inside one layer in AdapterHub checkpoints, before ".<name>."
    attribute: str  # where pefops attaches the AdapterLayer on the layer module


@dataclass(frozen=True)
class Architecture:
    layers: str  # path from the base model to its ModuleList of layers
    sites: tuple  # (attention site, feed-forward site)


_BERT_LIKE = Architecture(
    layers="encoder.layer",
    sites=(
        Site("mh_adapter", "post_ln", "attention.output", None, "attention.output.adapters", "attention_adapters"),
        Site("output_adapter", "post_ln", "output", None, "output.adapters", "output_adapters"),
    ),
)

ARCHITECTURES = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "gpt2": Architecture(
        layers="h",
        sites=(
            Site("mh_adapter", "pre_norm", "attn.c_proj", "ln_1", "attention_adapters.adapters", "attention_adapters"),
            Site("output_adapter", "pre_norm", "mlp.c_proj", "ln_2", "output_adapters.adapters", "output_adapters"),
        ),
    ),
    "llama": Architecture(
        layers="layers",
        sites=(
            Site("mh_adapter", "pre_norm", "self_attn.o_proj", "input_layernorm", "attention_adapters.adapters",
                 "attention_adapters"),
            Site("output_adapter", "pre_norm", "mlp.down_proj", "post_attention_layernorm", "output_adapters.adapters",
                 "output_adapters"),
        ),
    ),
}


def architecture_of(model) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"bottleneck adapters support model types {', '.join(sorted(ARCHITECTURES))}; got {model_type!r}"
        )
    return ARCHITECTURES[model_type]


def get_submodule(root, path: str):
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module
