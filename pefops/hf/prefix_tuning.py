"""Prefix-tuning in transformers models (GPT-2, LLaMA, BERT, RoBERTa, T5), the prefix inside attention.

PEFT passes the prefix as a pre-filled KV cache. Here the prefix enters the attention computation
itself: `apply_prefix_tuning` registers two attention functions in transformers' AttentionInterface
("pefops_prefix_sdpa" / "pefops_prefix_eager", one per base implementation, each with the base's mask
function) and switches the model to the one matching its configured implementation. The function
looks up the calling attention module's prefix site and runs `pefops.ops.prefix_attention` over
[prefix ; keys]; modules without a site (and every module while the prefix is disabled) run the base
implementation unchanged. Consequences:
- the KV cache holds real tokens only, so generate() works with every cache class, and the cache
  length equals the number of real tokens;
- masks are transformers' own (padding, causal, static-cache 4-D); the prefix columns are always
  visible, also to padded query rows;
- positions of real tokens are unchanged (0..S-1), unless peft_compatible_positions=True, which
  shifts them by P as PEFT's cache offset does (GPT-2, LLaMA, BERT);
- T5's relative position bias is folded into the additive mask, which the op extends with zero
  columns for the prefix (the prefix has no relative position).
- gradient checkpointing and torch.compile see an ordinary attention function.

T5 sites: encoder self-attention and decoder self-attention get a prefix (Li & Liang's encoder and
decoder prefixes). Decoder cross-attention gets none by default, as in PEFT 0.21, which builds a
cross-attention prefix and then discards it (it resets the cross-attention cache);
cross_attention=True adds one (Li & Liang's original BART code has it).

At initialisation the prefix is NOT a no-op: every prefix slot takes softmax mass from the real keys
(even a zero prefix). What holds exactly: with the prefix disabled (`prefix_disabled`) or removed
(`remove_prefix_tuning`) the model computes exactly what it computed before.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
from torch import nn

from pefops.hf.architectures import ARCHITECTURES, Architecture, architecture_of, get_submodule, model_type_of
from pefops.hf.prompt_tuning import ATTRIBUTE as PROMPT_ATTRIBUTE, _commit_prompt, _plan_prompt
from pefops.hf.sharding import CHANGES_PARAMETERS, host_copy, refuse_sharded, writes_files
from pefops.hf.transaction import copy_into, transactional
from pefops.hf.virtual_tokens import (
    check_trainable_modules,
    set_trainable_modules,
    tokens_disabled,
    trainable_module_parameters,
)
from pefops.nn.prefix_tuning import PrefixEncoder

SITE_ATTRIBUTE = "_pefops_prefix_site"  # on an attention module: (PrefixTuning, index into its encoder)
ROW_SITE_ATTRIBUTE = "_pefops_row_prefix_site"  # (RowPrefix, site index) while prefix tasks are routed per row
ATTRIBUTE = "prefix_tuning"  # the PrefixTuning module on the model
BASE_IMPLEMENTATIONS = ("sdpa", "eager")


def _base(model):
    return getattr(model, "base_model", model)


# ------------------------------------------------------------------------------------ attention function


def _causal_keep(sq: int, sk: int, device) -> torch.Tensor:
    # bottom-right aligned, as prefix_attention's causal
    return torch.arange(sk, device=device)[None, :] <= torch.arange(sq, device=device)[:, None] + (sk - sq)


def _fold_position_bias(position_bias, attention_mask, causal, query, key):
    """T5: one additive mask holding the relative position bias and the mask (prefix_attention then
    adds zero columns for the prefix)."""
    min_value = torch.finfo(query.dtype).min
    if attention_mask is None:
        if not causal:
            return position_bias
        keep = _causal_keep(query.shape[2], key.shape[2], query.device)
        return position_bias.masked_fill(~keep, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_value)
    return position_bias + attention_mask


def _causal_key_padding(attention_mask, query, key):
    """(key padding [B, S] bool or None, True) when the 4-D mask is exactly causal & key padding;
    (the mask, False) when it is anything else (left to the masked path as before)."""
    from pefops.hf.lsh_attention import key_padding_from_mask

    try:
        key_keep, is_causal = key_padding_from_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2], True)
    except ValueError:
        return attention_mask, False
    return key_keep, is_causal


def _base_function(base: str, module):
    """The implementation the model had: transformers' sdpa function, or the eager function of the
    module's own modeling file (T5's adds the position bias; GPT-2's is plain)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if base == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    return sdpa_attention_forward


def _prefix_attention_function(module, query, key, value, attention_mask, *, base: str, dropout=0.0, scaling=None,
                               is_causal=None, position_bias=None, **kwargs):
    row_site = module.__dict__.get(ROW_SITE_ATTRIBUTE)  # a mixed-task batch (hf/row_prefix.py)
    site = row_site or module.__dict__.get(SITE_ATTRIBUTE)
    if site is None or (row_site is None and not site[0].enabled):
        extra = {name: arg for name, arg in (("is_causal", is_causal), ("position_bias", position_bias))
                 if arg is not None}
        return _base_function(base, module)(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **extra, **kwargs)
    from pefops.ops.prefix_attention import prefix_attention

    owner, index = site
    prefix_k, prefix_v = owner.layer(index) if row_site is not None else owner.encoder.layer(index)
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    if (causal and attention_mask is not None and position_bias is None and query.shape[2] == key.shape[2] > 1
            and not torch.compiler.is_compiling()):
        # a padded causal batch: transformers hands over causal & key padding as one 4-D mask; as key
        # padding [B, S] + causal=True the kernels skip the blocks above the diagonal instead of reading
        # a [B, 1, S, S] mask (read once per mask object, shared by every layer). Not while torch.compile
        # traces: reading the mask on the host is data-dependent (a graph break per layer), and the
        # 4-D mask, which holds causality itself, gives the same result on the masked path
        attention_mask, causal = _causal_key_padding(attention_mask, query, key)
    else:
        # transformers passes mask None for a plain causal (or no) mask; a given mask already holds causality
        causal = causal and attention_mask is None and query.shape[2] > 1
    if position_bias is not None:
        attention_mask = _fold_position_bias(position_bias, attention_mask, causal, query, key)
        causal = False
    if row_site is not None:  # each row sees its own task's prefix slots only
        attention_mask = owner.attention_mask(attention_mask, query, key)
    out = prefix_attention(query, key, value, prefix_k, prefix_v, attention_mask=attention_mask, causal=causal,
                           scale=scaling, dropout_p=float(dropout))
    return out.transpose(1, 2), None  # [B, S, H, D] as transformers' attention functions return


def implementation_name(base: str) -> str:
    return f"pefops_prefix_{base}"


@functools.lru_cache(maxsize=None)
def register_attention_functions() -> None:
    """Register "pefops_prefix_sdpa" and "pefops_prefix_eager" (attention function + mask function)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    masks = {"sdpa": sdpa_mask, "eager": eager_mask}
    for base in BASE_IMPLEMENTATIONS:
        function = functools.partial(_prefix_attention_function, base=base)
        AttentionInterface.register(implementation_name(base), function)
        ALL_MASK_ATTENTION_FUNCTIONS.register(implementation_name(base), masks[base])


def _set_implementation(model, name: str) -> None:
    # set_attn_implementation validates and propagates to sub-models (T5's encoder/decoder stacks)
    model.set_attn_implementation(name)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation_internal = name


# ------------------------------------------------------------------------------------ the module


class PrefixTuning(nn.Module):
    """The prefix of one model: the PrefixEncoder (one "layer" per attention site) plus what
    apply_prefix_tuning changed, so it can be undone. Lives on the model as `model.prefix_tuning`."""

    def __init__(self, encoder: PrefixEncoder, sites: list[str], model_type: str, base_implementation: str,
                 peft_compatible_positions: bool, cross_attention: bool):
        super().__init__()
        self.encoder = encoder
        self.sites = list(sites)  # attention modules' names, in encoder order
        self.model_type = model_type
        self.base_implementation = base_implementation
        self.peft_compatible_positions = peft_compatible_positions
        self.cross_attention = cross_attention
        self.trainable_modules: tuple[str, ...] = ()
        self.enabled = True
        self._hooks: list = []

    @property
    def num_virtual_tokens(self) -> int:
        return self.encoder.num_virtual_tokens

    def config_dict(self) -> dict:
        encoder = self.encoder
        return {"method": "prefix_tuning", "model_type": self.model_type,
                "num_virtual_tokens": encoder.num_virtual_tokens, "projection": encoder.projection,
                "projection_hidden": encoder.projection_hidden, "embedding_dim": encoder.embedding_dim,
                "num_layers": encoder.num_layers, "num_kv_heads": encoder.num_kv_heads, "head_dim": encoder.head_dim,
                "peft_compatible_positions": self.peft_compatible_positions,
                "cross_attention": self.cross_attention, "trainable_modules": list(self.trainable_modules)}

    def extra_repr(self) -> str:
        return (f"model_type={self.model_type}, sites={len(self.sites)}, base={self.base_implementation}, "
                f"peft_compatible_positions={self.peft_compatible_positions}, enabled={self.enabled}")


def _heads(config, architecture: Architecture) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, architecture.prefix.head_dim, None) if architecture.prefix.head_dim else None
    return kv_heads, head_dim or config.hidden_size // heads


def _sites(model, architecture: Architecture, cross_attention: bool) -> list[tuple[str, nn.Module]]:
    base = _base(model)
    names = {id(module): name for name, module in model.named_modules()}
    sites = []
    for group in architecture.prefix.groups:
        if group.kind == "cross" and not cross_attention:
            continue
        try:
            layers = get_submodule(base, architecture.stack(group.layers))
        except AttributeError:
            continue  # e.g. T5EncoderModel has no decoder
        if layers is None:
            continue
        for layer in layers:
            module = get_submodule(layer, group.attention)
            sites.append((names[id(module)], module))
    return sites


def _position_hook(num_virtual_tokens: int):
    """Forward pre-hook on the base model: position_ids shifted by P, as PEFT's P cached tokens shift them."""

    def hook(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
            if inputs is None:
                inputs = kwargs["inputs_embeds"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs.shape[1], device=inputs.device) + past).unsqueeze(0)
        kwargs["position_ids"] = position_ids + num_virtual_tokens
        return args, kwargs

    return hook


@transactional
def apply_prefix_tuning(model, num_virtual_tokens: int, projection: bool = True, projection_hidden: int = 512,
                        peft_compatible_positions: bool = False, cross_attention: bool = False,
                        zero_init: bool = False, embedding_dim: Optional[int] = None,
                        trainable_modules=()) -> PrefixTuning:
    """Add a trainable prefix of `num_virtual_tokens` key/value slots to every attention layer of a
    transformers GPT-2, LLaMA, BERT, RoBERTa or T5 model; freeze the base. Returns the PrefixTuning
    module (also `model.prefix_tuning`); its parameters (and trainable_modules') are the only trainable ones.

    projection / projection_hidden / zero_init / embedding_dim: see PrefixEncoder (PEFT's
    prefix_projection / encoder_hidden_size / init_weights="zero" / token_dim).
    peft_compatible_positions: shift real tokens' positions by P as PEFT does (GPT-2, LLaMA, BERT).
    cross_attention: T5 only, also prefix the decoder's cross-attention (PEFT does not).
    trainable_modules: names of submodules that train too (a task head, e.g. "classifier"; PEFT's
    modules_to_save); save_prefix writes them with the prefix.
    The model must use the "sdpa" or "eager" attention implementation."""
    refuse_sharded(model, "apply_prefix_tuning", CHANGES_PARAMETERS)
    owner, sites = _plan_prefix(model, num_virtual_tokens, projection, projection_hidden, peft_compatible_positions,
                                cross_attention, zero_init, embedding_dim, trainable_modules)
    _commit_prefix(model, owner, sites)
    return owner


def _plan_prefix(model, num_virtual_tokens, projection, projection_hidden, peft_compatible_positions, cross_attention,
                 zero_init, embedding_dim, trainable_modules):
    """Every check apply_prefix_tuning makes, and the PrefixTuning it would add; the model is not changed."""
    architecture = architecture_of(model, "prefix")
    model_type = model_type_of(model)
    if getattr(model, ATTRIBUTE, None) is not None:
        raise ValueError("the model already has prefix-tuning: call remove_prefix_tuning first")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive int; got {num_virtual_tokens!r}")
    if peft_compatible_positions and not architecture.prefix.positions:
        shifted = [name for name, entry in ARCHITECTURES.items() if entry.prefix is not None and entry.prefix.positions]
        raise ValueError(f"peft_compatible_positions is supported for model types {', '.join(sorted(shifted))}; "
                         f"{model_type} numbers positions differently (RoBERTa: from the padding index, T5: relative "
                         "buckets)")
    if cross_attention and not any(group.kind == "cross" for group in architecture.prefix.groups):
        raise ValueError(f"cross_attention=True is for encoder-decoder models (T5); this is {model_type!r}")
    base_implementation = model.config._attn_implementation
    if base_implementation not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"prefix-tuning wraps the 'sdpa' or 'eager' attention implementation; the model uses "
                         f"{base_implementation!r} (load it with attn_implementation='sdpa')")
    sites = _sites(model, architecture, cross_attention)
    if not sites:
        raise ValueError(f"no attention layers found in this {model_type} model")
    kv_heads, head_dim = _heads(model.config, architecture)
    reference = next(model.parameters())
    encoder = PrefixEncoder(len(sites), kv_heads, head_dim, num_virtual_tokens, projection=projection,
                            projection_hidden=projection_hidden, embedding_dim=embedding_dim, zero_init=zero_init)
    encoder = encoder.to(device=reference.device, dtype=torch.float32)  # fp32 master weights, cast per call
    owner = PrefixTuning(encoder, [name for name, _ in sites], model_type, base_implementation,
                         peft_compatible_positions, cross_attention)
    for flag, value in (("projection", projection), ("peft_compatible_positions", peft_compatible_positions),
                        ("cross_attention", cross_attention), ("zero_init", zero_init)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False; got {value!r}")
    owner.trainable_modules = check_trainable_modules(model, trainable_modules)
    return owner, sites


def _commit_prefix(model, owner, sites) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    set_trainable_modules(model, owner.trainable_modules)
    register_attention_functions()
    for index, (_, module) in enumerate(sites):
        module.__dict__[SITE_ATTRIBUTE] = (owner, index)  # a plain attribute: not a registered submodule
    _set_implementation(model, implementation_name(owner.base_implementation))
    if owner.peft_compatible_positions:
        owner._hooks.append(_base(model).register_forward_pre_hook(_position_hook(owner.num_virtual_tokens),
                                                                   with_kwargs=True))
    setattr(model, ATTRIBUTE, owner)  # registered: .to(), .train(), parameters() include the prefix


def _owner(model) -> PrefixTuning:
    owner = getattr(model, ATTRIBUTE, None)
    if not isinstance(owner, PrefixTuning):
        raise ValueError("the model has no prefix-tuning: call apply_prefix_tuning (or load_prefix) first")
    return owner


def prefix_parameters(model) -> dict[str, nn.Parameter]:
    return {f"{ATTRIBUTE}.{name}": p for name, p in _owner(model).named_parameters()}


def prefix_disabled(model):
    """Run the base model without its prefix inside the block (exactly the model's original attention)."""
    return tokens_disabled(_owner(model))


@transactional
def remove_prefix_tuning(model) -> PrefixTuning:
    """Undo apply_prefix_tuning: the base attention implementation is restored, the sites and hooks
    removed. Base parameters stay frozen. Returns the removed PrefixTuning."""
    refuse_sharded(model, "remove_prefix_tuning", CHANGES_PARAMETERS)
    owner = _owner(model)
    for module in model.modules():
        module.__dict__.pop(SITE_ATTRIBUTE, None)
    for hook in owner._hooks:
        hook.remove()
    owner._hooks.clear()
    _set_implementation(model, owner.base_implementation)
    delattr(model, ATTRIBUTE)
    return owner


# ------------------------------------------------------------------------------------ save / load

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix.safetensors"
FORMAT = "pefops-prefix-1"


def _tuning_module(model):
    """The model's PrefixTuning or PromptTuning (save_prefix / load_prefix serve both)."""
    found = [getattr(model, name) for name in (ATTRIBUTE, PROMPT_ATTRIBUTE) if getattr(model, name, None) is not None]
    if len(found) != 1:
        raise ValueError("save_prefix needs a model with exactly one of prefix-tuning / prompt tuning applied; "
                         f"found {len(found)}")
    return found[0]


def save_prefix(model, directory) -> None:
    """Write the trainable prefix (or virtual prompt) to `directory`: prefix_config.json (the
    hyper-parameters apply_prefix_tuning needs) and prefix.safetensors (every parameter, the MLP
    included, so training resumes where it stopped), with the trainable modules' parameters (a task
    head) under "model.<module>.<parameter>". Other base weights are not written. A sharded (FSDP2)
    model: every rank calls it, the parameters are gathered and rank 0 writes."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from pefops.hf.task_io import base_fields

    tuning = _tuning_module(model)
    parameters = {**dict(tuning.named_parameters()), **trainable_module_parameters(model, tuning.trainable_modules)}
    tensors = {name: host_copy(p) for name, p in parameters.items()}
    if not writes_files(model):
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**base_fields(model, tuning.config_dict()["method"]), "format": FORMAT, **tuning.config_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})


def _read_prefix_config(path) -> dict:
    """prefix_config.json, every field checked (errors name the file and the field)."""
    from pefops.hf.checkpoint_io import field, read_json_object

    config = read_json_object(path)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} has format {config.get('format')!r}; expected {FORMAT!r}")
    method = config.get("method")
    if method not in ("prefix_tuning", "prompt_tuning"):
        raise ValueError(f"{path}: unknown method {method!r}")
    field(config, "model_type", path, str)
    field(config, "num_virtual_tokens", path, int, positive=True)
    modules = field(config, "trainable_modules", path, list, required=False, default=[])
    if not all(isinstance(name, str) and name for name in modules):
        raise ValueError(f"{path}: field 'trainable_modules' must list submodule names; got {modules!r}")
    if method == "prefix_tuning":
        for key in ("projection", "peft_compatible_positions", "cross_attention"):
            field(config, key, path, bool)
        field(config, "projection_hidden", path, int, required=False, positive=True)
        field(config, "embedding_dim", path, int, required=False, positive=True)
    else:
        field(config, "hidden", path, int, required=False, positive=True)
    return config


@transactional
def load_prefix(model, directory):
    """Load what save_prefix wrote. A model without prefix-tuning / prompt tuning gets it applied
    with the saved hyper-parameters; one with it must match them. The config and every tensor
    (names, exact shapes, dtypes) are checked before the model changes. Returns the tuning module."""
    from pathlib import Path

    from pefops.hf.checkpoint_io import check_names, check_tensor, read_safetensors

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME} (not written by save_prefix)")
    from pefops.hf.task_io import BASE_FIELDS, check_base_fields

    config = _read_prefix_config(config_path)
    method = config["method"]
    if config["model_type"] != getattr(model.config, "model_type", None):
        raise ValueError(f"{config_path}: the prefix was trained on a {config['model_type']!r} model; this is "
                         f"{getattr(model.config, 'model_type', None)!r}")
    check_base_fields(model, config, config_path)
    tensors = read_safetensors(weights_path)
    commit = None
    if method == "prefix_tuning":
        tuning = getattr(model, ATTRIBUTE, None)
        if tuning is None:
            try:
                tuning, sites = _plan_prefix(
                    model, config["num_virtual_tokens"], config["projection"], config.get("projection_hidden") or 512,
                    config["peft_compatible_positions"], config["cross_attention"], False,
                    config.get("embedding_dim") if config["projection"] else None,
                    tuple(config.get("trainable_modules") or ()))
            except ValueError as error:
                raise ValueError(f"{config_path}: {error}") from None
            commit = functools.partial(_commit_prefix, model, tuning, sites)
    else:
        tuning = getattr(model, PROMPT_ATTRIBUTE, None)
        if tuning is None:
            try:
                tuning = _plan_prompt(model, config["num_virtual_tokens"], "random", None, 0.02, None,
                                      tuple(config.get("trainable_modules") or ()))
            except ValueError as error:
                raise ValueError(f"{config_path}: {error}") from None
            commit = functools.partial(_commit_prompt, model, tuning)
    saved = tuning.config_dict()
    differences = {key: (value, saved.get(key)) for key, value in config.items()
                   if key != "format" and key not in BASE_FIELDS[1:] and saved.get(key) != value}
    if differences:
        raise ValueError(f"{config_path}: the model's {method} differs from the saved one (saved, model): "
                         f"{differences}")
    parameters = {**{name: p for name, p in tuning.named_parameters()},
                  **trainable_module_parameters(model, tuning.trainable_modules)}
    check_names(weights_path, tensors, parameters, method)
    for name, tensor in tensors.items():
        check_tensor(weights_path, name, tensor, parameters[name].shape)
    if commit is not None:  # validated: the commit
        refuse_sharded(model, "load_prefix into a model without prefix or prompt tuning", CHANGES_PARAMETERS)
        commit()
    copy_into((parameters[name], tensor) for name, tensor in tensors.items())
    return tuning
