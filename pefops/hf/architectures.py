"""Every per-model fact every pefops.hf method needs: one table, one entry per transformers model type.

Adding a model is one entry in ARCHITECTURES; a method the entry leaves out (None or empty) is not
offered for that model type, and `architecture_of(model, feature)` says so, listing the model types
that have it. Paths are attribute paths ("encoder.layer", "layer.0.SelfAttention"; digits index a
ModuleList), from the base model (`model.base_model`) for stacks and embeddings, from one layer for
everything inside a layer.

Bottleneck adapter sites come in two styles:
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
from typing import Optional, Union


@dataclass(frozen=True)
class Site:
    """One bottleneck adapter site in every layer."""

    location: str  # AdapterHub's location key: "mh_adapter" (after attention) or "output_adapter" (after FFN)
    style: str  # "post_ln" or "pre_norm"
    module: str  # post_ln: the module whose forward is replaced; pre_norm: the projection that is hooked
    residual_norm: Optional[str]  # pre_norm: the norm whose input is the residual stream r
    adapterhub_prefix: str  # the key prefix inside one layer in AdapterHub checkpoints, before ".<name>."
    attribute: str  # where pefops attaches the AdapterLayer on the layer module
    # post_ln: the replaced module's own sub-modules, LayerNorm(dropout(dense(h)) + input_tensor)
    dense: str = "dense"
    dropout: str = "dropout"
    layer_norm: str = "LayerNorm"


@dataclass(frozen=True)
class PrefixGroup:
    """Attention modules that get a prefix: one per layer of a stack."""

    kind: str  # "self" (decoder-only / encoder-only), "encoder", "decoder" or "cross" (T5)
    attention: str  # path inside one layer to the module that calls the attention function
    layers: Optional[str] = None  # the stack; None: the architecture's `layers`


@dataclass(frozen=True)
class Prefix:
    """What prefix-tuning needs."""

    groups: tuple[PrefixGroup, ...]
    head_dim: str  # config attribute with the head size ("" = hidden_size // num_attention_heads)
    positions: bool  # whether peft_compatible_positions is supported (positions are arange + offset)


@dataclass(frozen=True)
class SideWeights:
    """Where ladder side-tuning finds the base weights it prunes its side network from. Weights are
    read Linear-oriented ([out, in]); a GPT-2 Conv1D's is transposed. A path that names the same
    module for query, key and value is a fused [q; k; v] projection, split in three. A tuple of
    paths: the first that the layer has."""

    embedding: str  # the token embedding module, from the base model
    query: str
    key: str
    value: str
    output: str  # attention output projection
    fc_in: Union[str, tuple[str, ...]]  # feed-forward input projection
    fc_out: str  # feed-forward output projection
    layers: Optional[str] = None  # the stack the side network ladders over; None: the architecture's `layers`


@dataclass(frozen=True)
class LSHPatch:
    """A transformers layer whose forward apply_lsh_attention replaces, both as "<module>:<name>"
    (imported when applied, so the table needs neither transformers nor pefops.hf.lsh_attention)."""

    layer: str  # the transformers class, e.g. "transformers.models.reformer.modeling_reformer:LSHSelfAttention"
    forward: str  # the replacement forward, e.g. "pefops.hf.lsh_attention:reformer_lsh_forward"


@dataclass(frozen=True)
class Architecture:
    """One model type. Each method's field: None / () when pefops does not offer it for this type."""

    layers: Optional[str] = None  # the base model's ModuleList of transformer layers (one-stack models)
    sites: tuple[Site, ...] = ()  # bottleneck adapters (attention site, feed-forward site)
    prefix: Optional[Prefix] = None  # prefix-tuning
    prompt: bool = False  # prompt tuning (needs only the input embeddings and forward pre-hooks)
    side: Optional[SideWeights] = None  # side-tuning and ladder side-tuning
    causal: bool = False  # a decoder: its attention (and a side network's) is causal
    lsh_patches: tuple[LSHPatch, ...] = ()  # apply_lsh_attention

    def stack(self, path: Optional[str]) -> str:
        """A method's own stack path, or the architecture's layers."""
        return path if path is not None else self.layers


_BERT_LIKE = dict(
    layers="encoder.layer",
    sites=(
        Site("mh_adapter", "post_ln", "attention.output", None, "attention.output.adapters", "attention_adapters"),
        Site("output_adapter", "post_ln", "output", None, "output.adapters", "output_adapters"),
    ),
    prompt=True,
    side=SideWeights("embeddings.word_embeddings", "attention.self.query", "attention.self.key",
                     "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"),
)
_BERT_SELF_ATTENTION = (PrefixGroup("self", "attention.self"),)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(**_BERT_LIKE, prefix=Prefix(_BERT_SELF_ATTENTION, "", positions=True)),
    # RoBERTa numbers positions from padding_idx + 1 over non-pad tokens: no simple shift by P
    "roberta": Architecture(**_BERT_LIKE, prefix=Prefix(_BERT_SELF_ATTENTION, "", positions=False)),
    "gpt2": Architecture(
        layers="h",
        sites=(
            Site("mh_adapter", "pre_norm", "attn.c_proj", "ln_1", "attention_adapters.adapters", "attention_adapters"),
            Site("output_adapter", "pre_norm", "mlp.c_proj", "ln_2", "output_adapters.adapters", "output_adapters"),
        ),
        prefix=Prefix((PrefixGroup("self", "attn"),), "", positions=True),
        prompt=True,
        side=SideWeights("wte", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        causal=True,
    ),
    "llama": Architecture(
        layers="layers",
        sites=(
            Site("mh_adapter", "pre_norm", "self_attn.o_proj", "input_layernorm", "attention_adapters.adapters",
                 "attention_adapters"),
            Site("output_adapter", "pre_norm", "mlp.down_proj", "post_attention_layernorm", "output_adapters.adapters",
                 "output_adapters"),
        ),
        prefix=Prefix((PrefixGroup("self", "self_attn"),), "head_dim", positions=True),
        prompt=True,
        side=SideWeights("embed_tokens", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"),
        causal=True,
    ),
    # two stacks (encoder.block, decoder.block), so no one `layers`: no bottleneck adapters or mask-tuning
    "t5": Architecture(
        prefix=Prefix(
            (PrefixGroup("encoder", "layer.0.SelfAttention", layers="encoder.block"),
             PrefixGroup("decoder", "layer.0.SelfAttention", layers="decoder.block"),
             PrefixGroup("cross", "layer.1.EncDecAttention", layers="decoder.block")),
            "d_kv", positions=False),
        prompt=True,
        # T5 v1.0 feeds forward through `wi`; the gated v1.1 through `wi_0` (gate) and `wi_1` (linear)
        side=SideWeights("shared", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                         "layer.0.SelfAttention.o", ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_1"),
                         "layer.1.DenseReluDense.wo", layers="encoder.block"),
    ),
    "reformer": Architecture(
        lsh_patches=(LSHPatch("transformers.models.reformer.modeling_reformer:LSHSelfAttention",
                              "pefops.hf.lsh_attention:reformer_lsh_forward"),),
    ),
}

# an Architecture field -> the start of the error when a model type lacks it
FEATURES = {
    "layers": "bottleneck adapters and mask-tuning support",
    "sites": "bottleneck adapters support",
    "prefix": "prefix-tuning supports",
    "prompt": "prompt tuning supports",
    "side": "side_tune supports",
    "lsh_patches": "apply_lsh_attention supports",
}


def model_type_of(model) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def supported_model_types(feature: str) -> list[str]:
    """The model types whose entry has `feature` (an Architecture field), sorted."""
    if feature not in FEATURES:
        raise ValueError(f"unknown architecture feature {feature!r}; expected one of {sorted(FEATURES)}")
    return sorted(model_type for model_type, architecture in ARCHITECTURES.items() if getattr(architecture, feature))


def architecture_of(model, feature: str = "layers") -> Architecture:
    """The table entry of `model` (by model.config.model_type). Raises a ValueError naming the model
    types that have `feature` when the model's type is not in the table or its entry lacks it."""
    supported = supported_model_types(feature)
    model_type = model_type_of(model)
    if model_type not in supported:
        raise ValueError(f"{FEATURES[feature]} model types {', '.join(supported)}; got {model_type!r}")
    return ARCHITECTURES[model_type]


def get_submodule(root, path: str):
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module
