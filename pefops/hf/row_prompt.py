"""Prompt-tuning rows of a mixed-task batch (issue 15): row b gets the virtual tokens of its own task
(none for rows of other methods and of the base) in front of its tokens, as prompt tuning alone does.

Layout: the model's inputs (and outputs) have one front block of P_max = max(P_t) slots (over the
tasks of the routed rows; none without a prompt row), then the sequence. A task with P virtual tokens fills the LAST P slots of its rows' block; the slots in front
of them (all P_max for rows without a prompt) are zero embeddings hidden by the attention mask, so
a row's tokens attend to exactly what they attend to alone: its own P virtual tokens and its sequence.
The block is right-aligned so that a row's virtual tokens sit directly before its first token: the
language-modelling label shift then pairs the last virtual token with the first token, as alone.

Positions: every row is numbered as its task numbers it alone. A prompt row's virtual tokens are
0..P-1 and its tokens P + their position; a row without a prompt keeps its tokens' positions. A
token's position is the position_ids given (generate() gives them from the attention mask, so left
padding does not move them), else its index in the sequence, the cache counted, as the model numbers
it. (Prompt tuning alone, like PEFT, drops position_ids: a prompt row equals its task alone without
padding, or padded when no position_ids are given.) So explicit position_ids always go to the model:
absolute embeddings (BERT, GPT-2) and RoPE (LLaMA) see each row's own numbering. Models whose
positions are not "arange + offset" (RoBERTa numbers non-pad tokens from padding_idx + 1) are refused.

Labels get P_max ignored entries in front; a row without a prompt also gets -100 on its first token
(the hidden slot before it would otherwise predict it; alone nothing does). The KV cache holds the
block, as it holds the prompt alone, so decoding steps only extend the mask. Encoder-decoder models
(T5: the prompt in front of the encoder input) are refused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pefops.hf.architectures import architecture_of, model_type_of
from pefops.hf.prompt_tuning import PromptTuning, prepend_virtual_tokens
from pefops.hf.row_prefix import check_routed_batch, refuse_own_virtual_tokens, task_slots

STATE = "_pefops_row_prompt"  # in model.__dict__: (RowPrompt, hook handle) while routed


class RowPrompt:
    """The per-row prompts of one routing: `tunings[i]` is the PromptTuning of names[i] (None: no prompt)."""

    def __init__(self, tunings: list[Optional[PromptTuning]], row_task: torch.Tensor, word_embeddings):
        distinct, row_slot = task_slots(tunings, row_task)
        self.prompts = [tuning.prompt for tuning in distinct]
        self.word_embeddings = word_embeddings
        self.batch = row_task.numel()
        self.width = max(prompt.num_virtual_tokens for prompt in self.prompts)  # P_max
        lengths = torch.tensor([0] + [prompt.num_virtual_tokens for prompt in self.prompts], device=row_slot.device)
        self.row_slot = row_slot  # [B]: 0 = no prompt
        self.row_count = lengths[row_slot][:, None]  # [B, 1]: P of each row
        # [B, P_max]: each slot's position in its row's own prompt (negative: a hidden slot in front of it)
        slot_position = torch.arange(self.width, device=row_slot.device)[None, :] - (self.width - self.row_count)
        self.keep = slot_position >= 0  # the row's own slots: the last P of the block
        self.front_positions = slot_position.clamp(min=0)  # own slots 0..P-1 (hidden slots: any position)

    def block(self, batch: int) -> torch.Tensor:
        """[B, P_max, hidden]: each row's prompt, left-padded with zero slots; indexing the stacked
        prompts sends each row's gradient to its own task's embedding only. (`batch`: the interface of
        prepend_virtual_tokens; the routed batch was checked before.)"""
        padded = [F.pad(prompt.embedding.weight, (0, 0, self.width - prompt.num_virtual_tokens, 0))
                  for prompt in self.prompts]
        return torch.stack([torch.zeros_like(padded[0])] + padded)[self.row_slot]

    def pre_hook(self, model, args, kwargs):
        inputs = next((x for x in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), *args) if x is not None), None)
        if inputs is not None:  # (none: prepend_virtual_tokens says what is missing)
            check_routed_batch(self.batch, inputs.shape[0])
        given = kwargs.get("position_ids")
        kwargs, past = prepend_virtual_tokens(args, kwargs, self.word_embeddings, self.width, self.block, self.keep)
        embeds = kwargs["inputs_embeds"]
        length = embeds.shape[1] - (0 if past else self.width)  # this forward's tokens (the block excluded)
        if given is None:  # the model's own numbering of the tokens: their index, the cache counted
            start = max(past - self.width, 0)
            given = torch.arange(start, start + length, device=embeds.device)[None, :]
        positions = given.to(embeds.device) + self.row_count
        if not past:
            positions = torch.cat([self.front_positions, positions.expand(embeds.shape[0], -1)], dim=1)
        kwargs["position_ids"] = positions
        return (), kwargs


def check_row_prompt(model, tunings: list[Optional[PromptTuning]]) -> None:
    """The model must be decoder-only or encoder-only with positions "arange + offset" and carry no
    prefix or prompt itself."""
    if all(t is None for t in tunings):
        return
    refuse_own_virtual_tokens(model, "prompt")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"prompt rows of a mixed-task batch are supported in decoder-only and encoder-only models; "
                         f"{model_type_of(model)!r} is an encoder-decoder model (a T5 prompt runs alone: "
                         "hf.load_prefix / hf.load_peft_prompt)")
    prefix = architecture_of(model, "prompt").prefix
    if prefix is None or not prefix.positions:  # the same fact peft_compatible_positions needs
        raise ValueError(f"prompt rows renumber each row's positions (arange + its P); {model_type_of(model)!r} "
                         "numbers positions otherwise, so its prompt tasks cannot share a batch")


def clear_row_prompt(model) -> None:
    """Take the per-row prompt hook off the model."""
    state = model.__dict__.pop(STATE, None)
    if state is not None:
        state[1].remove()


def install_row_prompt(model, tunings: list[Optional[PromptTuning]], row_task: torch.Tensor) -> None:
    """Route the prompt tasks in `tunings` per row (after check_row_prompt; replaces any earlier routing)."""
    clear_row_prompt(model)
    used = set(row_task.tolist())  # the block is as wide as the longest prompt of a routed row, not of any name
    tunings = [tuning if index in used else None for index, tuning in enumerate(tunings)]
    if all(t is None for t in tunings):
        return
    row_prompt = RowPrompt(tunings, row_task, model.get_input_embeddings())
    # prepend: it runs before the position hook of PEFT prefix rows (on the same module in a bare base
    # model), which then shifts the positions set here
    hook = model.register_forward_pre_hook(row_prompt.pre_hook, with_kwargs=True, prepend=True)
    model.__dict__[STATE] = (row_prompt, hook)
