"""Side-tuning and ladder side-tuning for transformers encoders and decoders (BERT, RoBERTa, GPT-2,
LLaMA, T5 encoders).

`side_tune(model, method)` returns a SideTunedModel: the base runs frozen under no-grad (its
activations are never stored), a small side network at width hidden / reduction_factor trains, and
the output's last_hidden_state is sigmoid(alpha) * base + (1 - sigmoid(alpha)) * side.

Ladder initialisation follows the paper's recipe, structurally pruning every base layer to the
side width: the residual-stream units kept are the most important by the L2 norm of their embedding
column, each attention/MLP matrix keeps its most important rows by weight magnitude (the paper ranks
by Fisher information, which needs data; magnitude needs none), and the down-projections start as
the selection of the kept units, the up-projection as its transpose.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from pefops.hf.architectures import Architecture, SideWeights, architecture_of, get_submodule
from pefops.hf.checkpoint_io import check_names, check_tensor, read_safetensors
from pefops.hf.sharding import CHANGES_PARAMETERS, host_copy, refuse_sharded, writes_files
from pefops.hf.task_io import base_fields, is_single_file, weights_path, write_checkpoint
from pefops.hf.transaction import copy_into, transactional
from pefops.nn.side_tuning import LadderSideNetwork, SideTuned
from pefops.ops.gated_blend import alpha_blend

METHODS = ("side", "ladder")


def _linear_weight(layer: nn.Module, path, part: int = 0, parts: int = 1) -> torch.Tensor:
    """The weight at `path` inside `layer`, Linear-oriented [out, in] (a Conv1D's is transposed);
    `parts` > 1: the `part`-th row block of a fused projection. A tuple of paths: the first the layer has."""
    paths = (path,) if isinstance(path, str) else path
    for candidate in paths:
        try:
            module = get_submodule(layer, candidate)
        except AttributeError:
            continue
        weight = module.weight.t() if type(module).__name__ == "Conv1D" else module.weight
        return weight.chunk(parts, dim=0)[part]
    raise ValueError(f"side_tune: the {type(layer).__name__} layer has none of {list(paths)}")


def _layer_weights(layer: nn.Module, side: SideWeights) -> tuple:
    """(q, k, v, o, fc_in, fc_out) of one base layer, each [out, in]."""
    fused = side.query == side.key == side.value  # one [q; k; v] projection
    q, k, v = (_linear_weight(layer, path, index if fused else 0, 3 if fused else 1)
               for index, path in enumerate((side.query, side.key, side.value)))
    return (q, k, v, *(_linear_weight(layer, path) for path in (side.output, side.fc_in, side.fc_out)))


class SideTunedModel(nn.Module):
    """A frozen transformers model with a trainable side network. forward(**inputs) returns the
    base's output object with last_hidden_state blended with the side network's output."""

    def __init__(self, base: nn.Module, side: nn.Module, method: str, alpha_init: float = 0.0,
                 cache_base: bool = False):
        super().__init__()
        self.tuned = SideTuned(base, side, alpha_init=alpha_init)
        self.method = method
        self.cache_base = cache_base
        self._cache: dict[str, object] = {}
        self.base_calls = 0  # how often the base actually ran (the cache skips it)

    @property
    def base(self):
        return self.tuned.base

    @property
    def side(self):
        return self.tuned.side

    @property
    def config(self):
        return self.base.config

    def clear_cache(self) -> None:
        self._cache.clear()

    def _base_forward(self, input_ids, attention_mask, kwargs):
        key = None
        if self.cache_base:
            digest = hashlib.sha1(input_ids.detach().cpu().numpy().tobytes())
            if attention_mask is not None:
                digest.update(attention_mask.detach().cpu().numpy().tobytes())
            digest.update(str(tuple(input_ids.shape)).encode())
            key = digest.hexdigest()
            if key in self._cache:
                return self._cache[key]
        wants_hidden = isinstance(self.side, LadderSideNetwork)
        with torch.no_grad():
            output = self.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=wants_hidden,
                               **kwargs)
        self.base_calls += 1
        hidden_states = tuple(output.hidden_states) if wants_hidden else None
        if hidden_states is not None and self.method == "side":
            hidden_states = hidden_states[:1]  # plain side-tuning: the side network reads the embeddings only
        stored = (output.last_hidden_state, hidden_states)
        if key is not None:
            self._cache[key] = stored
        return stored

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        last_hidden, hidden_states = self._base_forward(input_ids, attention_mask, kwargs)
        if isinstance(self.side, LadderSideNetwork):
            side_out = self.side(hidden_states, attention_mask)
        else:
            side_out = self.side(input_ids=input_ids, attention_mask=attention_mask)
        from transformers.modeling_outputs import BaseModelOutput

        side_hidden = side_out if isinstance(side_out, torch.Tensor) else side_out.last_hidden_state
        return BaseModelOutput(last_hidden_state=alpha_blend(last_hidden, side_hidden, self.tuned.alpha))

    def side_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("tuned.base.")}


@transactional
def side_tune(model, method: str = "ladder", reduction_factor: float = 8, side: Optional[nn.Module] = None,
              alpha_init: float = 0.0, temperature: float = 0.1, init_from_base: bool = True,
              cache_base: bool = False) -> SideTunedModel:
    """Wrap `model` (a transformers BERT, RoBERTa, GPT-2, LLaMA or T5 encoder base model) for
    side-tuning ("side") or ladder side-tuning ("ladder"). Only side parameters (the side network
    and the blend's alpha) train. `side`: your own side network for method="side" (called with
    input_ids and attention_mask; returns a tensor or an output with last_hidden_state)."""
    refuse_sharded(model, "side_tune", CHANGES_PARAMETERS)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    architecture = architecture_of(model, "side")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or not reduction_factor > 0:
        raise ValueError(f"reduction_factor must be a positive number; got {reduction_factor!r}")
    if side is not None and not isinstance(side, nn.Module):
        raise ValueError(f"side must be an nn.Module or None; got {type(side).__name__}")
    base = getattr(model, "base_model", model)
    config = base.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or config.n_embd
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None) or config.n_head
    causal = architecture.causal
    if side is None:
        side = LadderSideNetwork(hidden, num_layers, reduction_factor, temperature=temperature, causal=causal,
                                 ladder=method == "ladder", base_num_heads=heads)
        reference = next(base.parameters())
        side = side.to(device=reference.device, dtype=torch.float32)
        if init_from_base:
            _initialise_from_base(side, base, architecture)
    elif method == "ladder" and not isinstance(side, LadderSideNetwork):
        raise ValueError("method='ladder' needs a LadderSideNetwork side (or side=None to build one)")
    wrapped = SideTunedModel(base, side, method, alpha_init=alpha_init, cache_base=cache_base)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return wrapped


@torch.no_grad()
def _initialise_from_base(side: LadderSideNetwork, base: nn.Module, architecture: Architecture) -> None:
    weights = architecture.side
    width = side.width
    embedding = get_submodule(base, weights.embedding).weight.float()
    kept = embedding.norm(dim=0).topk(width).indices.sort().values  # residual-stream units kept
    selection = torch.zeros(width, side.hidden_size, device=embedding.device)
    selection[torch.arange(width), kept] = 1.0
    for down in side.downs:
        down.weight.copy_(selection)
        down.bias.zero_()
    side.up.weight.copy_(selection.t())
    side.up.bias.zero_()
    layers = get_submodule(base, architecture.stack(weights.layers))
    for block, layer in zip(side.blocks, layers):
        q, k, v, o, fc_in, fc_out = _layer_weights(layer, weights)
        columns = lambda w: w.float()[:, kept]  # noqa: E731  inputs restricted to the kept units
        qk_rows = _top_rows(q, k, width)
        v_rows = _top_rows(v, None, width)
        _copy(block.query, columns(q), qk_rows)
        _copy(block.key, columns(k), qk_rows)
        _copy(block.value, columns(v), v_rows)
        if v_rows is not None:
            _copy(block.output, o.float()[kept][:, v_rows], None)
        hidden_rows = _top_rows(fc_in, None, block.fc_in.out_features)
        _copy(block.fc_in, columns(fc_in), hidden_rows)
        if hidden_rows is not None:
            _copy(block.fc_out, fc_out.float()[kept][:, hidden_rows], None)


def _top_rows(weight, partner, count):
    """The `count` rows of largest magnitude (summed with `partner`'s, so q and k keep matching
    rows); None when the matrix has fewer rows (grouped-query k/v): then it is left random."""
    if weight.shape[0] < count or (partner is not None and partner.shape[0] != weight.shape[0]):
        return None
    importance = weight.float().abs().sum(1)
    if partner is not None:
        importance = importance + partner.float().abs().sum(1)
    return importance.topk(count).indices.sort().values


def _copy(linear: nn.Linear, weight, rows):
    if rows is None and weight.shape != linear.weight.shape:
        return
    source = weight if rows is None else weight[rows]
    if source.shape == linear.weight.shape:
        linear.weight.copy_(source)
        linear.bias.zero_()


SIDE_FORMAT = "pefops-side-1"
CONFIG_NAME = "side_config.json"
WEIGHTS_NAME = "side.safetensors"


def save_side(model: SideTunedModel, path: str) -> None:
    """Write the side parameters only to the directory `path`: side_config.json (method, version, base
    model type and hidden size, side method) and side.safetensors. A path ending in ".safetensors"
    writes the older single file instead. A sharded (FSDP2) model: every rank calls it, rank 0 writes."""
    from safetensors.torch import save_file

    if not isinstance(model, SideTunedModel):
        raise ValueError(f"save_side takes the model side_tune returned; got {type(model).__name__}")
    tensors = {name: host_copy(p) for name, p in model.side_parameters().items()}
    if not writes_files(model):
        return
    metadata = {"format": SIDE_FORMAT, "method": model.method}
    if is_single_file(path):
        save_file(tensors, str(path), metadata=metadata)
        return
    config = {**base_fields(model, "side_tuning"), "format": SIDE_FORMAT, "side_method": model.method}
    write_checkpoint(path, CONFIG_NAME, config, WEIGHTS_NAME, tensors, metadata)


@transactional
def load_side(model: SideTunedModel, path: str) -> None:
    """Load side parameters written by save_side (a directory, or the older single file) into a
    side_tune'd model of the same shape. The whole checkpoint (base model type and hidden size, names,
    exact shapes, dtypes) is checked before any parameter is written."""
    if not isinstance(model, SideTunedModel):
        raise ValueError(f"load_side takes the model side_tune returned; got {type(model).__name__}")
    path = weights_path(model, path, "side_tuning", SIDE_FORMAT, CONFIG_NAME, WEIGHTS_NAME)
    tensors, metadata = read_safetensors(path, with_metadata=True)
    if metadata.get("format") != SIDE_FORMAT:
        raise ValueError(f"{path} is not a pefops side-network file")
    if metadata.get("method") != model.method:
        raise ValueError(f"{path} holds a {metadata.get('method')!r} side network; this model uses {model.method!r}")
    parameters = model.side_parameters()
    check_names(path, tensors, parameters, "side-network")
    for name, tensor in tensors.items():
        check_tensor(path, name, tensor, parameters[name].shape)
    copy_into((parameters[name], tensor) for name, tensor in tensors.items())
