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

import json
from pathlib import Path

import torch

from pefops.hf.prefix_tuning import PrefixTuning, apply_prefix_tuning, set_trainable_modules
from pefops.hf.prompt_tuning import PromptTuning, apply_prompt_tuning

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _read(directory, peft_type: str):
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / PEFT_CONFIG).is_file() or not (directory / PEFT_WEIGHTS).is_file():
        raise ValueError(f"{directory} must hold PEFT's {PEFT_CONFIG} and {PEFT_WEIGHTS} (save_pretrained; "
                         "pickled adapter_model.bin files are not read)")
    config = json.loads((directory / PEFT_CONFIG).read_text())
    if config.get("peft_type") != peft_type:
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter; expected {peft_type!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError("only decoder-only / encoder-only PEFT prompt checkpoints (num_transformer_submodules=1) "
                         "are imported; encoder-decoder ones are not")
    tensors = load_file(str(directory / PEFT_WEIGHTS))
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{directory / PEFT_WEIGHTS} has no 'prompt_embeddings' tensor")
    return config, tensors


def _load_heads(model, tensors: dict) -> list[str]:
    """modules_to_save entries, stored under "base_model.<name>" for prompt-learning models."""
    state = dict(model.named_parameters())
    loaded = []
    for key, tensor in tensors.items():
        if key == "prompt_embeddings":
            continue
        plain = key.replace(".modules_to_save.default", "")
        candidates = (plain, plain.removeprefix("base_model."), plain.removeprefix("base_model.model."))
        name = next((candidate for candidate in candidates if candidate in state), None)
        if name is None:
            raise ValueError(f"the PEFT checkpoint has a tensor {key!r} that matches no parameter of the model")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} in the checkpoint, "
                             f"{tuple(state[name].shape)} in the model")
        with torch.no_grad():
            state[name].copy_(tensor.to(state[name].dtype))
        loaded.append(name)
    return loaded


def _heads_trainable(model, parameter_names: list[str]) -> tuple[str, ...]:
    """The imported heads' modules train on, as PEFT's modules_to_save do (and save_prefix keeps them)."""
    modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in parameter_names))
    return set_trainable_modules(model, modules)


def load_peft_prefix(model, directory) -> PrefixTuning:
    """Apply prefix-tuning to `model` from a PEFT PREFIX_TUNING checkpoint (GPT-2, LLaMA, BERT): the
    flat prefix PEFT saved, positions shifted by P as PEFT's cache offset does. Returns the
    PrefixTuning (projection=False: the checkpoint has no MLP)."""
    config, tensors = _read(directory, "PREFIX_TUNING")
    flat = tensors["prompt_embeddings"]
    count = config["num_virtual_tokens"]
    tuning = apply_prefix_tuning(model, count, projection=False, peft_compatible_positions=True)
    encoder = tuning.encoder
    expected = (encoder.num_layers, encoder.num_kv_heads * encoder.head_dim, encoder.num_kv_heads)
    found = (config.get("num_layers"), config.get("token_dim"), config.get("num_attention_heads"))
    if expected != found:
        from pefops.hf.prefix_tuning import remove_prefix_tuning

        remove_prefix_tuning(model)
        raise ValueError(f"the PEFT prefix has (num_layers, token_dim, kv heads) {found}; this model needs {expected}")
    encoder.load_flat(flat.to(encoder.embedding.weight.device))
    tuning.trainable_modules = _heads_trainable(model, _load_heads(model, tensors))
    return tuning


def load_peft_prompt(model, directory) -> PromptTuning:
    """Apply prompt tuning to `model` from a PEFT PROMPT_TUNING checkpoint: the virtual embeddings
    PEFT saved (and its task head, if any). Returns the PromptTuning."""
    config, tensors = _read(directory, "PROMPT_TUNING")
    embeddings = tensors["prompt_embeddings"]
    count = config["num_virtual_tokens"]
    hidden = model.get_input_embeddings().weight.shape[1]
    if tuple(embeddings.shape) != (count, hidden):
        raise ValueError(f"PEFT prompt_embeddings have shape {tuple(embeddings.shape)}; this model needs "
                         f"({count}, {hidden})")
    tuning = apply_prompt_tuning(model, count)
    with torch.no_grad():
        tuning.prompt.embedding.weight.copy_(embeddings.to(tuning.prompt.embedding.weight))
    tuning.trainable_modules = _heads_trainable(model, _load_heads(model, tensors))
    return tuning
