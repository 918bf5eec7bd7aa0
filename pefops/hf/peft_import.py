"""Import PEFT 0.21 prefix-tuning and prompt-tuning checkpoints (save_pretrained's directory:
adapter_config.json + adapter_model.safetensors) into pefops.

What PEFT stores: "prompt_embeddings", the prompt encoder's output for the P virtual tokens — for
prefix-tuning the flat prefix [P, num_layers * 2 * token_dim] (the MLP itself is dropped, so the
import is a projection=False PrefixEncoder holding that output), for prompt tuning the virtual
embeddings [P, hidden]. Task heads in modules_to_save ("base_model.score.weight", ...) are loaded
into the model too. The prefix import sets peft_compatible_positions=True: PEFT's prefix sits in
the KV cache, so real tokens are numbered from P, and the logits match PEFT's only with that shift.
"""

from __future__ import annotations

from pathlib import Path

from pefops.hf.checkpoint_io import check_tensor, field, read_json_object, read_safetensors
from pefops.hf.prefix_tuning import (
    PrefixTuning,
    _commit_prefix,
    _plan_prefix,
    check_trainable_modules,
    set_trainable_modules,
)
from pefops.hf.prompt_tuning import PromptTuning, _commit_prompt, _plan_prompt
from pefops.hf.transaction import copy_into, transactional

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _read(directory, peft_type: str):
    directory = Path(directory)
    config_path, weights_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory} must hold PEFT's {PEFT_CONFIG} and {PEFT_WEIGHTS} (save_pretrained; "
                         "pickled adapter_model.bin files are not read)")
    config = read_json_object(config_path)
    if config.get("peft_type") != peft_type:
        raise ValueError(f"{config_path} holds a {config.get('peft_type')!r} adapter; expected {peft_type!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{config_path}: only decoder-only / encoder-only PEFT prompt checkpoints "
                         "(num_transformer_submodules=1) are imported; encoder-decoder ones are not")
    field(config, "num_virtual_tokens", config_path, int, positive=True)
    tensors = read_safetensors(weights_path)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{weights_path} has no 'prompt_embeddings' tensor")
    return config, tensors, config_path, weights_path


def _plan_heads(model, tensors: dict, path) -> list:
    """modules_to_save entries, stored under "base_model.<name>" for prompt-learning models:
    [(parameter name, parameter, tensor)], every name and shape checked."""
    state = dict(model.named_parameters())
    planned = []
    for key, tensor in tensors.items():
        if key == "prompt_embeddings":
            continue
        plain = key.replace(".modules_to_save.default", "")
        candidates = (plain, plain.removeprefix("base_model."), plain.removeprefix("base_model.model."))
        name = next((candidate for candidate in candidates if candidate in state), None)
        if name is None:
            raise ValueError(f"{path}: tensor {key!r} matches no parameter of the model")
        check_tensor(path, key, tensor, state[name].shape)
        planned.append((name, state[name], tensor))
    return planned


def _head_modules(heads: list) -> tuple[str, ...]:
    """The imported heads' modules train on, as PEFT's modules_to_save do (and save_prefix keeps them)."""
    return tuple(dict.fromkeys(name.rsplit(".", 1)[0] for name, _, _ in heads))


@transactional
def load_peft_prefix(model, directory) -> PrefixTuning:
    """Apply prefix-tuning to `model` from a PEFT PREFIX_TUNING checkpoint (GPT-2, LLaMA, BERT): the
    flat prefix PEFT saved, positions shifted by P as PEFT's cache offset does. Returns the
    PrefixTuning (projection=False: the checkpoint has no MLP). Everything is checked before the
    model changes."""
    config, tensors, config_path, weights_path = _read(directory, "PREFIX_TUNING")
    flat = tensors["prompt_embeddings"]
    tuning, sites = _plan_prefix(model, config["num_virtual_tokens"], False, 512, True, False, False, None, ())
    encoder = tuning.encoder
    expected = (encoder.num_layers, encoder.num_kv_heads * encoder.head_dim, encoder.num_kv_heads)
    found = (config.get("num_layers"), config.get("token_dim"), config.get("num_attention_heads"))
    if expected != found:
        raise ValueError(f"{config_path}: the PEFT prefix has (num_layers, token_dim, kv heads) {found}; this model "
                         f"needs {expected}")
    check_tensor(weights_path, "prompt_embeddings", flat, encoder.embedding.weight.shape)
    heads = _plan_heads(model, tensors, weights_path)
    modules = check_trainable_modules(model, _head_modules(heads))
    _commit_prefix(model, tuning, sites)  # validated: the commit
    copy_into([(encoder.embedding.weight, flat)] + [(parameter, tensor) for _, parameter, tensor in heads])
    tuning.trainable_modules = set_trainable_modules(model, modules)
    return tuning


@transactional
def load_peft_prompt(model, directory) -> PromptTuning:
    """Apply prompt tuning to `model` from a PEFT PROMPT_TUNING checkpoint: the virtual embeddings
    PEFT saved (and its task head, if any). Returns the PromptTuning. Everything is checked before
    the model changes."""
    config, tensors, config_path, weights_path = _read(directory, "PROMPT_TUNING")
    embeddings = tensors["prompt_embeddings"]
    count = config["num_virtual_tokens"]
    hidden = model.get_input_embeddings().weight.shape[1]
    check_tensor(weights_path, "prompt_embeddings", embeddings, (count, hidden))
    tuning = _plan_prompt(model, count, "random", None, 0.02, None, ())
    heads = _plan_heads(model, tensors, weights_path)
    modules = check_trainable_modules(model, _head_modules(heads))
    _commit_prompt(model, tuning)  # validated: the commit
    copy_into([(tuning.prompt.embedding.weight, embeddings)] + [(parameter, tensor) for _, parameter, tensor in heads])
    tuning.trainable_modules = set_trainable_modules(model, modules)
    return tuning
