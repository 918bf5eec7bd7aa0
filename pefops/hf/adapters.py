"""Bottleneck adapters in transformers models: add, activate, train, save, load (AdapterHub's API
and semantics, on transformers 5, through the fused op).

The composition at one site follows AdapterHub's BottleneckLayer (pre_forward → adapter →
post_forward). With h the sublayer output, r its residual input and LN the model's LayerNorm there:

    adapter input  x   = r (parallel) | LN(h + r) or h + r (original_ln_before) | h
    adapter residual   = h (residual_before_ln=True or parallel) | h + r ("post_add") | x (False)
    result             = LN(s*up(act(down(x))) + residual + r)   (original_ln_after; no LN: + r only)

which is one fused call with residual + r as the residual and LN in the epilogue.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Union

import torch
from torch import nn

from pefops.hf.architectures import Site, architecture_of, get_submodule
from pefops.hf.config import BottleneckConfig, resolve_config
from pefops.hf.sharding import CHANGES_PARAMETERS, refuse_sharded
from pefops.hf.transaction import transactional
from pefops.nn import BottleneckAdapter
from pefops.ops.row_partition import merge_rows, split_rows

logger = logging.getLogger("pefops.hf")


class Fuse:
    """An AdapterFusion composition of named adapters: set_active_adapters(model, Fuse("a", "b"))."""

    def __init__(self, *names: str):
        if len(names) == 1 and isinstance(names[0], (list, tuple)):
            names = tuple(names[0])
        if len(names) < 1 or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"Fuse takes adapter names; got {names!r}")
        self.names = tuple(names)

    @property
    def name(self) -> str:
        return ",".join(self.names)  # AdapterHub's fusion name

    def last(self) -> str:
        return self.names[-1]

    def __eq__(self, other) -> bool:
        return isinstance(other, Fuse) and other.names == self.names

    def __hash__(self) -> int:
        return hash(self.names)

    def __repr__(self) -> str:
        return f"Fuse({', '.join(map(repr, self.names))})"


class RowRouting:
    """Mixed-task batch: row b of the batch uses adapter names[row_adapter[b]]."""

    def __init__(self, names, row_adapter: torch.Tensor):
        self.names = tuple(names)
        if not isinstance(row_adapter, torch.Tensor) or row_adapter.dim() != 1 or row_adapter.dtype not in (
                torch.int64, torch.int32):
            raise ValueError("row_adapter must be an integer tensor [batch] of indices into names")
        if row_adapter.numel() and (int(row_adapter.min()) < 0 or int(row_adapter.max()) >= len(self.names)):
            raise ValueError(f"row_adapter values must be in [0, {len(self.names)}); got "
                             f"{int(row_adapter.min())}..{int(row_adapter.max())}")
        # the routing's own copy: the caller editing its tensor in place later must not reroute the rows
        self.row_adapter = row_adapter.detach().to(torch.int64, copy=True)
        self._rows: dict = {}

    def rows(self, positions, device) -> tuple:
        """(rows, local_index) for the adapters at `positions` of names: the batch rows routed to
        them (None: every row) and each such row's index into `positions`. Computed once per
        routing, group and device (the routing index is fixed until set_active_adapters runs again)."""
        key = (tuple(positions), str(device))
        if key not in self._rows and len(positions) == len(self.names):
            self._rows[key] = (None, self.row_adapter.to(device))  # every row: no host round trip
        if key not in self._rows:
            remap = torch.full((len(self.names),), -1, dtype=torch.long)
            remap[list(positions)] = torch.arange(len(positions))
            local = remap[self.row_adapter.cpu()]
            member = local >= 0
            if bool(member.all()):
                self._rows[key] = (None, local.to(device))
            else:
                rows = member.nonzero().flatten()
                self._rows[key] = (rows.to(device), local[rows].to(device))
        return self._rows[key]

    def __repr__(self) -> str:
        return f"RowRouting({list(self.names)}, rows={self.row_adapter.numel()})"


class AdapterLayer(nn.Module):
    """All bottleneck adapters at one site of one layer, and AdapterHub's composition around them."""

    def __init__(self, site: Site):
        super().__init__()
        self.site = site
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, BottleneckConfig] = {}
        self.fusions = nn.ModuleDict()  # AdapterFusion layers by "a,b,c"
        self.active = None  # an adapter name, a Fuse, or None
        self._residual: Optional[torch.Tensor] = None  # pre_norm sites: the residual stream, from the pre-hook

    def add(self, name: str, config: BottleneckConfig, hidden_size: int, layer_index: int, reference: torch.Tensor):
        self.adapters[name] = BottleneckAdapter(
            hidden_size, config.bottleneck_size(hidden_size, layer_index), activation=config.non_linearity,
            scaling=config.scaling, init=config.init_weights, ln_before=config.ln_before, ln_after=config.ln_after,
            adapter_residual_before_ln=config.adapter_residual_before_ln and not config.is_parallel,
            use_gating=config.use_gating, dropout=config.dropout,
        ).to(device=reference.device, dtype=reference.dtype).train(self.training)
        self.configs[name] = config

    def remove(self, name: str):
        del self.adapters[name]
        del self.configs[name]
        if self.active == name:
            self.active = None

    def is_active(self) -> bool:
        active = self.active
        if isinstance(active, Fuse):
            return active.name in self.fusions
        if isinstance(active, RowRouting):  # names: adapter names, Fuse compositions (set_row_tasks) or None
            return any(self._serves(name) for name in active.names)
        return active is not None and active in self.adapters

    def _serves(self, name) -> bool:
        """Whether a routing entry has a module at this site."""
        if isinstance(name, Fuse):
            return name.name in self.fusions
        return isinstance(name, str) and name in self.adapters

    def forward(self, h: torch.Tensor, r: Optional[torch.Tensor], layer_norm: Optional[nn.Module]) -> torch.Tensor:
        """post_ln sites return the block output; pre_norm sites return the new sublayer output (the
        block adds r itself)."""
        pre_norm = self.site.style == "pre_norm"
        if isinstance(self.active, Fuse) and self.is_active():
            return self._fused_forward(h, r, layer_norm, pre_norm)
        if isinstance(self.active, RowRouting) and self.is_active():
            return self._routed_forward(h, r, layer_norm, pre_norm)
        name = self.active
        if name is None or name not in self.adapters:
            return self._passthrough(h, r, layer_norm, pre_norm)
        return self._single_forward(self.adapters[name], self.configs[name], h, r, layer_norm, pre_norm)

    @staticmethod
    def _passthrough(h, r, layer_norm, pre_norm):
        """What the site computes without an adapter."""
        if pre_norm:
            return h
        return layer_norm(h + r) if layer_norm is not None else h + r

    def _single_forward(self, adapter, config, h, r, layer_norm, pre_norm):
        x, residual = self._adapter_input_and_residual(h, r, layer_norm, config)
        folds_residual = adapter.adapter_norm_after is None or not adapter.adapter_residual_before_ln
        if config.original_ln_after and r is not None and not pre_norm:
            if folds_residual:
                return adapter(x, residual=residual + r, layer_norm=layer_norm)
            out = adapter(x, residual=residual) + r
            return layer_norm(out) if layer_norm is not None else out
        out = adapter(x, residual=residual)
        if pre_norm and not config.original_ln_after:
            return out - r  # the block adds r back: the result is `out`, as AdapterHub's
        return out

    def _fused_forward(self, h, r, layer_norm, pre_norm, fuse=None):
        """AdapterHub's compose_fuse: the last fused adapter's pre_forward gives the input, the
        residual and (query_before_ln) the query; the fusion layer attends over the adapters' up
        projections; the last adapter's post_forward adds r and the model's LayerNorm. `fuse`: the
        composition of a mixed-task batch's rows (default: the active one)."""
        fuse = fuse if fuse is not None else self.active
        fusion = self.fusions[fuse.name]
        config = self.configs[fuse.last()]
        if config.is_parallel:
            raise ValueError("AdapterFusion over parallel (par_bn) adapters is not supported")
        x, residual = self._adapter_input_and_residual(h, r, layer_norm, config)
        query = h if fusion.config.query_before_ln else x
        out = fusion(x, query, residual, [self.adapters[name] for name in fuse.names])
        if config.original_ln_after and r is not None:
            if pre_norm:
                return out
            out = out + r
            return layer_norm(out) if layer_norm is not None else out
        return out - r if pre_norm and r is not None else out

    def _route_key(self, name: str):
        """Adapters with equal keys run together in one multi_adapter call; None: the adapter runs
        its own forward over its rows (adapter LayerNorms, gating, or dropout in training)."""
        adapter, config = self.adapters[name], self.configs[name]
        simple = (adapter.adapter_norm_before is None and adapter.adapter_norm_after is None and adapter.gate is None
                  and not (adapter.training and adapter.dropout > 0))
        if not simple:
            return None
        return (config.original_ln_before, config.original_ln_after, config.residual_before_ln, config.is_parallel,
                adapter.activation, adapter.negative_slope)

    def _routed_forward(self, h, r, layer_norm, pre_norm):
        """Mixed-task batch: row b gets exactly what running it alone with adapter
        names[row_adapter[b]] gives at this site (a row whose adapter has no module here passes
        through unchanged). Adapters of one composition and activation share one multi_adapter call;
        others (adapter LayerNorms, gating, dropout in training) run their own forward on their rows."""
        routing = self.active
        index = routing.row_adapter
        if index.numel() != h.shape[0]:
            raise ValueError(f"row_adapter has {index.numel()} entries; the batch has {h.shape[0]} rows")
        groups: dict = {}
        for position, name in enumerate(routing.names):
            if isinstance(name, Fuse) and name.name in self.fusions:
                groups[("fuse", position)] = [position]
            elif self._serves(name):
                key = self._route_key(name)
                groups.setdefault(key if key is not None else ("alone", position), []).append(position)
        served = [position for positions in groups.values() for position in positions]
        unserved = [position for position in range(len(routing.names)) if position not in served]
        row_sets, group_items = [], []
        for key, positions in groups.items():
            rows, local = routing.rows(positions, h.device)
            if rows is None:  # one group holds every row
                return self._group_forward(key, positions, local, h, r, layer_norm, pre_norm)
            if rows.numel():
                row_sets.append(rows)
                group_items.append((key, positions, local))
        if not group_items:
            return self._passthrough(h, r, layer_norm, pre_norm)
        rest = routing.rows(unserved, h.device)[0] if unserved else None
        if rest is not None and rest.numel():
            row_sets.append(rest)
        # the groups and the rest partition the batch: each row is read and written once (row_partition)
        h_parts = split_rows(h, row_sets)
        r_parts = split_rows(r, row_sets) if r is not None else (None,) * len(row_sets)
        pieces = [self._group_forward(key, positions, local, h_g, r_g, layer_norm, pre_norm)
                  for (key, positions, local), h_g, r_g in zip(group_items, h_parts, r_parts)]
        if len(pieces) < len(row_sets):
            pieces.append(self._passthrough(h_parts[-1], r_parts[-1], layer_norm, pre_norm))
            dtype = pieces[-1].dtype
        else:  # the dtype the rows without an adapter would have (autocast may make it another)
            dtype = self._passthrough(h[:0], None if r is None else r[:0], layer_norm, pre_norm).dtype
        return merge_rows([piece.to(dtype) for piece in pieces], row_sets, h.shape[0])

    def _group_forward(self, key, positions, local, h, r, layer_norm, pre_norm):
        """The rows of one routing group (h, r: theirs only) through its adapters."""
        routing = self.active
        if key[0] == "fuse":
            return self._fused_forward(h, r, layer_norm, pre_norm, fuse=routing.names[positions[0]])
        if key[0] == "alone":
            name = routing.names[positions[0]]
            return self._single_forward(self.adapters[name], self.configs[name], h, r, layer_norm, pre_norm)
        return self._multi_forward([routing.names[p] for p in positions], local, h, r, layer_norm, pre_norm)

    def _multi_forward(self, names, local_index, h, r, layer_norm, pre_norm):
        """One pefops.ops.multi_adapter call over adapters of one composition and activation."""
        from pefops.ops.multi_adapter import multi_adapter

        configs = [self.configs[n] for n in names]
        adapters = [self.adapters[n] for n in names]
        config = configs[0]
        x, residual = self._adapter_input_and_residual(h, r, layer_norm, config)
        rank = max(a.bottleneck_size for a in adapters)
        pad = lambda t, size, dim: t if t.shape[dim] == size else torch.nn.functional.pad(  # noqa: E731
            t, (0, size - t.shape[dim]) if dim == -1 else (0, 0, 0, size - t.shape[dim]))
        down_weight = torch.stack([pad(a.down_proj.weight, rank, 0) for a in adapters])
        down_bias = torch.stack([pad(a.down_proj.bias, rank, -1) for a in adapters])
        up_weight = torch.stack([pad(a.up_proj.weight, rank, -1) for a in adapters])
        up_bias = torch.stack([a.up_proj.bias for a in adapters])
        hidden = h.shape[-1]
        scaling = torch.stack([
            (a.scaling.to(h.dtype).reshape(-1).expand(hidden) if isinstance(a.scaling, torch.Tensor)
             else torch.full((hidden,), a.scaling, dtype=h.dtype, device=h.device)) for a in adapters])
        fold = config.original_ln_after and r is not None and not pre_norm
        out = multi_adapter(x, local_index, down_weight, down_bias, up_weight, up_bias,
                            activation=adapters[0].activation, negative_slope=adapters[0].negative_slope,
                            scaling=scaling, residual=residual + r if fold else residual,
                            layer_norm=(layer_norm.weight, layer_norm.bias, layer_norm.eps)
                            if fold and layer_norm is not None else None)
        if pre_norm and not config.original_ln_after:
            return out - r
        return out

    @staticmethod
    def _adapter_input_and_residual(h, r, layer_norm, config: BottleneckConfig):
        if config.is_parallel:
            return r, h
        residual = h if config.residual_before_ln is True else None
        x = h
        if config.original_ln_before:
            if layer_norm is not None:
                x = h + r
                if config.residual_before_ln == "post_add":
                    residual = x
                x = layer_norm(x)
            elif r is not None:
                x = h + r
        if config.residual_before_ln is False:
            residual = x
        if residual is None:
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True and a model LayerNorm at "
                             "this site (post-LN models such as BERT); AdapterHub fails here too")
        return x, residual

    def extra_repr(self) -> str:
        return f"location={self.site.location}, style={self.site.style}, active={self.active}"


# ---------------------------------------------------------------------------------- model patching


def _post_ln_forward(module, adapter_layer, hidden_states, input_tensor, *args, **kwargs):
    site = adapter_layer.site
    h = get_submodule(module, site.dropout)(get_submodule(module, site.dense)(hidden_states))
    return adapter_layer(h, input_tensor, get_submodule(module, site.layer_norm))


def _capture_residual(adapter_layer, module, args, kwargs):
    if adapter_layer.is_active():
        adapter_layer._residual = args[0] if args else next(iter(kwargs.values()))


def _adapt_projection_output(adapter_layer, module, args, output):
    residual, adapter_layer._residual = adapter_layer._residual, None  # hold no activation past its use
    if not adapter_layer.is_active():
        return None
    if residual is None:
        raise RuntimeError(f"no residual captured before {adapter_layer.site.module}: the pre-hook on "
                           f"{adapter_layer.site.residual_norm} did not run")
    return adapter_layer(output, residual, None)


def model_layers(model):
    """(base model, its Architecture, its ModuleList of layers) for a model with adapter sites."""
    base = getattr(model, "base_model", model)
    architecture = architecture_of(model, "sites")
    return base, architecture, get_submodule(base, architecture.layers)


def adapter_layers(model):
    """Install the AdapterLayers once (idempotent) and yield (layer_index, site, AdapterLayer)."""
    base, architecture, layers = model_layers(model)
    for index, layer in enumerate(layers):
        for site in architecture.sites:
            adapter_layer = getattr(layer, site.attribute, None)
            if adapter_layer is None:
                adapter_layer = AdapterLayer(site)
                setattr(layer, site.attribute, adapter_layer)
                target = get_submodule(layer, site.module)
                if site.style == "post_ln":
                    target.forward = functools.partial(_post_ln_forward, target, adapter_layer)
                else:
                    norm = get_submodule(layer, site.residual_norm)
                    norm.register_forward_pre_hook(functools.partial(_capture_residual, adapter_layer), with_kwargs=True)
                    target.register_forward_hook(functools.partial(_adapt_projection_output, adapter_layer))
            yield index, site, adapter_layer


def hidden_size_of(model) -> int:
    """The model's hidden size (config.hidden_size; GPT-2: n_embd)."""
    config = model.config
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd")


# ---------------------------------------------------------------------------------- public API


@transactional
def add_adapter(model, name: str, config: Union[str, dict, BottleneckConfig, None] = "seq_bn",
                set_active: bool = False) -> BottleneckConfig:
    """Add a bottleneck adapter `name` to every layer (except config.leave_out) at the sites the
    config asks for (mh_adapter: after attention; output_adapter: after the feed-forward block).
    Everything is checked before the model changes; on any error the model is as before."""
    refuse_sharded(model, "add_adapter", CHANGES_PARAMETERS)
    config = resolve_config(config)
    if not isinstance(name, str) or not name or "." in name or "," in name:
        raise ValueError(f"adapter name must be a non-empty string without dots or commas; got {name!r}")
    if name in adapter_registry(model):
        raise ValueError(f"model already has an adapter named {name!r}; remove it first")
    hidden_size = hidden_size_of(model)
    reference = next(model.parameters())
    _, architecture, layers = model_layers(model)
    planned = []
    for index in range(len(layers)):
        for site in architecture.sites:
            wanted = config.mh_adapter if site.location == "mh_adapter" else config.output_adapter
            if wanted and index not in config.leave_out:
                config.bottleneck_size(hidden_size, index)  # a reduction_factor map without this layer raises here
                planned.append((index, site.location))
    if not planned:
        raise ValueError(f"config places no adapter in this model (mh_adapter={config.mh_adapter}, "
                         f"output_adapter={config.output_adapter}, leave_out={list(config.leave_out)})")
    planned = set(planned)
    for index, site, adapter_layer in adapter_layers(model):
        if name in adapter_layer.adapters:
            raise ValueError(f"model already has an adapter module named {name!r} (layer {index}, {site.location})")
    for index, site, adapter_layer in adapter_layers(model):
        if (index, site.location) in planned:
            adapter_layer.add(name, config, hidden_size, index, reference)
    adapter_registry(model)[name] = config
    if set_active:
        set_active_adapters(model, name)
    return config


def adapter_registry(model) -> dict:
    """The model's adapters, {name: BottleneckConfig} (the dict itself: callers that add or remove
    adapters write to it)."""
    if not hasattr(model, "_pefops_adapters"):
        model._pefops_adapters = {}
    return model._pefops_adapters


def fusion_registry(model) -> dict:
    """The model's fusions, {"a,b": (fusion config, Fuse)} (the dict itself)."""
    if not hasattr(model, "_pefops_fusions"):
        model._pefops_fusions = {}
    return model._pefops_fusions


def list_adapters(model) -> dict[str, BottleneckConfig]:
    return dict(adapter_registry(model))


@transactional
def set_active_adapters(model, names: Union[str, list, tuple, "Fuse", None], row_adapter: Optional[torch.Tensor] = None):
    """Activate one adapter by name, a Fuse of adapters with a fusion layer, or None (base model).
    With `row_adapter` (LongTensor [batch]) and a list of names, row b of the next batches uses
    names[row_adapter[b]] (a mixed-task batch, one fused call per site)."""
    if row_adapter is not None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in adapter_registry(model)]
        if unknown:
            raise ValueError(f"no adapters named {unknown}; the model has {sorted(adapter_registry(model))}")
        routing = RowRouting(names, row_adapter)
        for _, _, adapter_layer in adapter_layers(model):
            adapter_layer.active = routing
        model._pefops_active_adapter = routing
        return
    if isinstance(names, Fuse):
        if names.name not in fusion_registry(model):
            raise ValueError(f"no fusion {names.name!r}; add it with add_adapter_fusion(model, {names!r})")
        for _, _, adapter_layer in adapter_layers(model):
            adapter_layer.active = names
        model._pefops_active_adapter = names
        return
    if isinstance(names, (list, tuple)):
        if len(names) > 1:
            raise ValueError("one bottleneck adapter can be active at a time here; got " + ", ".join(map(str, names)))
        names = names[0] if names else None
    if names is not None and names not in adapter_registry(model):
        raise ValueError(f"no adapter named {names!r}; the model has {sorted(adapter_registry(model)) or 'none'}")
    for _, _, adapter_layer in adapter_layers(model):
        adapter_layer.active = names
    model._pefops_active_adapter = names


def active_adapter(model) -> Optional[str]:
    return getattr(model, "_pefops_active_adapter", None)


def adapter_parameters(model, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter `name`, by their full names in the model."""
    if name not in adapter_registry(model):
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(adapter_registry(model)) or 'none'}")
    marker = f".adapters.{name}."
    return {n: p for n, p in model.named_parameters() if marker in n}


def train_only(model, parameters: dict[str, nn.Parameter], active) -> int:
    """Freeze every parameter of `model` but `parameters`, activate `active` (an adapter name or a
    Fuse), put the model in training mode; returns the number of trainable parameters. Callers wrap
    it in their own @transactional call."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    set_active_adapters(model, active)
    model.train()
    return sum(p.numel() for p in parameters.values())


@transactional
def train_adapter(model, name: str) -> int:
    """Freeze everything but adapter `name`, activate it, put the model in training mode; returns
    (and logs) the number of trainable parameters."""
    parameters = adapter_parameters(model, name)
    trainable = train_only(model, parameters, name)
    total = sum(p.numel() for p in model.parameters())
    logger.info("training adapter %r: %d trainable parameters of %d (%.3f%%)", name, trainable, total, 100.0 * trainable / total)
    return trainable


@transactional
def remove_adapter(model, name: str):
    """Delete adapter `name` everywhere. An adapter that a fusion fuses is refused (remove the
    fusion first with remove_adapter_fusion): the fusion's trained weights are not dropped silently.
    If the active setting uses the adapter (alone or in a mixed-task routing), the model falls back
    to the base (no active adapter)."""
    refuse_sharded(model, "remove_adapter", CHANGES_PARAMETERS)
    if name not in adapter_registry(model):
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(adapter_registry(model)) or 'none'}")
    users = [fusion for fusion, (_, fuse) in fusion_registry(model).items() if name in fuse.names]
    if users:
        raise ValueError(f"adapter {name!r} is fused by {users}: remove_adapter_fusion(model, ...) first")
    for _, _, adapter_layer in adapter_layers(model):
        if name in adapter_layer.adapters:
            adapter_layer.remove(name)
    del adapter_registry(model)[name]
    active = active_adapter(model)
    if active == name or (isinstance(active, RowRouting) and name in active.names):
        set_active_adapters(model, None)
