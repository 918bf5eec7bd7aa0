"""Prompt tuning (Lester et al. 2021) in transformers models (GPT-2, LLaMA, BERT, RoBERTa, T5), as PEFT
does it: P trainable virtual embeddings are prepended to the input embeddings, the attention mask
gets P ones in front, labels P ignored (-100) entries, token_type_ids P zeros, and position_ids are
dropped (the model numbers the P + S inputs 0..P+S-1). Outputs have P + S positions, as PEFT's.

Forward pre-hooks do it, so model(...), the training loop and generate() run unchanged. Decoder-only
and encoder-only models: a hook on the model prepends the prompt when the cache is empty (prefill);
later decoding steps only extend the mask, because the cache already holds the prompt. T5: the
prompt goes in front of the encoder input only (Lester et al.'s setting): a hook on the encoder
stack prepends it, one on the decoder stack extends the cross-attention mask. (PEFT's SEQ_2_SEQ_LM
prompt tuning also prepends a second prompt to the decoder inputs in forward, but not in generate;
that variant is not reproduced.)
"""

from __future__ import annotations

import torch
from torch import nn

from pefops.hf.architectures import architecture_of, model_type_of
from pefops.hf.sharding import CHANGES_PARAMETERS, refuse_sharded
from pefops.hf.transaction import transactional
from pefops.hf.virtual_tokens import check_trainable_modules, set_trainable_modules, tokens_disabled
from pefops.nn.prefix_tuning import PromptEmbedding

ATTRIBUTE = "prompt_tuning"


class PromptTuning(nn.Module):
    """The virtual prompt of one model (`model.prompt_tuning`) and the hook that prepends it."""

    def __init__(self, prompt: PromptEmbedding, model_type: str):
        super().__init__()
        self.prompt = prompt
        self.model_type = model_type
        self.trainable_modules: tuple[str, ...] = ()
        self.enabled = True
        self._hooks: list = []
        self._word_embeddings: list = []  # [the model's input embedding], kept out of the module tree

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens

    def config_dict(self) -> dict:
        return {"method": "prompt_tuning", "model_type": self.model_type,
                "num_virtual_tokens": self.prompt.num_virtual_tokens, "hidden": self.prompt.hidden,
                "trainable_modules": list(self.trainable_modules)}

    def extra_repr(self) -> str:
        return f"model_type={self.model_type}, enabled={self.enabled}"

    def encoder_decoder_hooks(self, model):
        """T5: the prompt in front of the encoder input, the cross-attention mask extended to match."""
        encoder, decoder = model.get_encoder(), model.get_decoder()
        self._hooks.append(encoder.register_forward_pre_hook(self.pre_hook, with_kwargs=True))
        self._hooks.append(decoder.register_forward_pre_hook(self.decoder_pre_hook, with_kwargs=True))

    def decoder_pre_hook(self, decoder, args, kwargs):
        mask, states = kwargs.get("encoder_attention_mask"), kwargs.get("encoder_hidden_states")
        if not self.enabled or mask is None or states is None or mask.dim() != 2:
            return None
        if mask.shape[1] + self.num_virtual_tokens == states.shape[1]:  # encoder output holds the prompt
            kwargs["encoder_attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], self.num_virtual_tokens)),
                                                          mask], dim=1)
        return args, kwargs

    def pre_hook(self, model, args, kwargs):
        if not self.enabled:
            return None
        kwargs, _ = prepend_virtual_tokens(args, kwargs, self._word_embeddings[0], self.num_virtual_tokens,
                                           self.prompt)
        if "position_ids" in kwargs:  # as PEFT: the model numbers the prompt and the tokens itself
            kwargs["position_ids"] = None
        return (), kwargs


def prepend_virtual_tokens(args, kwargs, word_embeddings, count: int, virtual, keep=None) -> tuple[dict, int]:
    """The step every prompt hook shares (prompt tuning alone, and the prompt rows of a mixed-task batch,
    hf/row_prompt.py): the model's keyword inputs with a block of `count` virtual embeddings in front of
    the token embeddings. virtual(batch) -> [batch, count, hidden] is called at prefill only (an empty
    cache): later decoding steps find the block in the cache and only extend the mask. keep [batch,
    count] bool: the slots each row sees (None: all; a missing mask then stays missing). At prefill,
    token labels get `count` ignored (-100) entries in front (and a row that sees no slot gets -100 on its
    first token too: nothing of its own precedes it, so alone it is no target), token_type_ids zeros.
    position_ids are left to the caller. Returns (kwargs, tokens in the cache before this forward)."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise ValueError("with prompt tuning, pass the model's inputs by keyword (only input_ids may be positional)")
        kwargs["input_ids"] = args[0]
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if input_ids is None:
            raise ValueError("prompt tuning needs input_ids or inputs_embeds")
        embeds = word_embeddings(input_ids)
    batch, length = embeds.shape[0], embeds.shape[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = 0 if cache is None else int(cache.get_seq_length())
    if past == 0:  # prefill; later steps find the prompt in the cache
        embeds = torch.cat([virtual(batch).to(embeds.dtype), embeds], dim=1)
        labels = kwargs.get("labels")
        # token labels (language modelling) get -100 for the prompt; per-sequence labels stay
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
            if keep is not None:
                labels = labels.clone()
                labels[:, 0] = labels[:, 0].masked_fill(~keep.any(dim=1), -100)
            kwargs["labels"] = torch.cat([labels.new_full((batch, count), -100), labels], dim=1)
        token_type_ids = kwargs.get("token_type_ids")
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros((batch, count)), token_type_ids], dim=1)
    kwargs["inputs_embeds"] = embeds
    mask = kwargs.get("attention_mask")
    if mask is None and keep is not None:  # hidden slots need a mask: every token visible
        mask = torch.ones((batch, max(past - count, 0) + length), dtype=torch.long, device=embeds.device)
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"prompt tuning extends 2-D attention masks [batch, keys]; got shape {tuple(mask.shape)}")
        front = mask.new_ones((batch, count)) if keep is None else keep.to(mask.dtype)
        kwargs["attention_mask"] = torch.cat([front, mask], dim=1)
    return kwargs, past


@transactional
def apply_prompt_tuning(model, num_virtual_tokens: int, init="random", tokenizer=None, init_std: float = 0.02,
                        generator=None, trainable_modules=()) -> PromptTuning:
    """Prepend `num_virtual_tokens` trainable input embeddings to every input of a GPT-2, LLaMA, BERT or
    RoBERTa model (T5: to every encoder input); freeze the base. init: "random" (normal, std
    init_std), "vocab" (embeddings of random vocabulary tokens), or a text (its tokens' embeddings,
    cycled to P; needs tokenizer) or a list of token ids. trainable_modules: submodules that train too
    (a task head; PEFT's modules_to_save), saved by save_prefix. Returns the PromptTuning module (also
    `model.prompt_tuning`)."""
    refuse_sharded(model, "apply_prompt_tuning", CHANGES_PARAMETERS)
    owner = _plan_prompt(model, num_virtual_tokens, init, tokenizer, init_std, generator, trainable_modules)
    _commit_prompt(model, owner)
    return owner


def _plan_prompt(model, num_virtual_tokens, init, tokenizer, init_std, generator, trainable_modules) -> PromptTuning:
    """Every check apply_prompt_tuning makes, and the PromptTuning it would add; the model is not changed."""
    architecture_of(model, "prompt")
    model_type = model_type_of(model)
    if getattr(model, ATTRIBUTE, None) is not None:
        raise ValueError("the model already has prompt tuning: call remove_prompt_tuning first")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive int; got {num_virtual_tokens!r}")
    word_embeddings = model.get_input_embeddings()
    prompt = PromptEmbedding(num_virtual_tokens, word_embeddings.weight.shape[1], init=init,
                             word_embeddings=word_embeddings, tokenizer=tokenizer, init_std=init_std,
                             generator=generator)
    prompt = prompt.to(device=word_embeddings.weight.device, dtype=torch.float32)
    owner = PromptTuning(prompt, model_type)
    owner._word_embeddings.append(word_embeddings)
    owner.trainable_modules = check_trainable_modules(model, trainable_modules)
    return owner


def _commit_prompt(model, owner: PromptTuning) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    set_trainable_modules(model, owner.trainable_modules)
    if getattr(model.config, "is_encoder_decoder", False):
        owner.encoder_decoder_hooks(model)
    else:
        owner._hooks.append(model.register_forward_pre_hook(owner.pre_hook, with_kwargs=True))
    setattr(model, ATTRIBUTE, owner)


def _owner(model) -> PromptTuning:
    owner = getattr(model, ATTRIBUTE, None)
    if not isinstance(owner, PromptTuning):
        raise ValueError("the model has no prompt tuning: call apply_prompt_tuning (or load_prefix) first")
    return owner


def prompt_disabled(model):
    """Run the model without its virtual prompt inside the block."""
    return tokens_disabled(_owner(model))


@transactional
def remove_prompt_tuning(model) -> PromptTuning:
    refuse_sharded(model, "remove_prompt_tuning", CHANGES_PARAMETERS)
    owner = _owner(model)
    for hook in owner._hooks:
        hook.remove()
    owner._hooks.clear()
    delattr(model, ATTRIBUTE)
    return owner
