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
from pefops.nn import BottleneckAdapter

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
        return active is not None and active in self.adapters

    def forward(self, h: torch.Tensor, r: Optional[torch.Tensor], layer_norm: Optional[nn.Module]) -> torch.Tensor:
        """post_ln sites return the block output; pre_norm sites return the new sublayer output (the
        block adds r itself)."""
        pre_norm = self.site.style == "pre_norm"
        if isinstance(self.active, Fuse) and self.is_active():
            return self._fused_forward(h, r, layer_norm, pre_norm)
        name = self.active
        if name is None or name not in self.adapters:
            if pre_norm:
                return h
            return layer_norm(h + r) if layer_norm is not None else h + r
        adapter, config = self.adapters[name], self.configs[name]
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

    def _fused_forward(self, h, r, layer_norm, pre_norm):
        """AdapterHub's compose_fuse: the last fused adapter's pre_forward gives the input, the
        residual and (query_before_ln) the query; the fusion layer attends over the adapters' up
        projections; the last adapter's post_forward adds r and the model's LayerNorm."""
        fuse = self.active
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
    h = module.dropout(module.dense(hidden_states))
    return adapter_layer(h, input_tensor, module.LayerNorm)


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


def _layers(model):
    base = getattr(model, "base_model", model)
    architecture = architecture_of(model)
    return base, architecture, get_submodule(base, architecture.layers)


def _adapter_layers(model):
    """Install the AdapterLayers once (idempotent) and yield (layer_index, site, AdapterLayer)."""
    base, architecture, layers = _layers(model)
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


def _hidden_size(model) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd")


# ---------------------------------------------------------------------------------- public API


def add_adapter(model, name: str, config: Union[str, dict, BottleneckConfig, None] = "seq_bn",
                set_active: bool = False) -> BottleneckConfig:
    """Add a bottleneck adapter `name` to every layer (except config.leave_out) at the sites the
    config asks for (mh_adapter: after attention; output_adapter: after the feed-forward block)."""
    config = resolve_config(config)
    if not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots; got {name!r}")
    hidden_size = _hidden_size(model)
    reference = next(model.parameters())
    added = 0
    for index, site, adapter_layer in _adapter_layers(model):
        if name in adapter_layer.adapters:
            raise ValueError(f"model already has an adapter named {name!r}; remove it first")
        wanted = config.mh_adapter if site.location == "mh_adapter" else config.output_adapter
        if wanted and index not in config.leave_out:
            adapter_layer.add(name, config, hidden_size, index, reference)
            added += 1
    if added == 0:
        raise ValueError(f"config places no adapter in this model (mh_adapter={config.mh_adapter}, "
                         f"output_adapter={config.output_adapter}, leave_out={list(config.leave_out)})")
    _adapter_registry(model)[name] = config
    if set_active:
        set_active_adapters(model, name)
    return config


def _adapter_registry(model) -> dict:
    if not hasattr(model, "_pefops_adapters"):
        model._pefops_adapters = {}
    return model._pefops_adapters


def _fusion_registry(model) -> dict:
    if not hasattr(model, "_pefops_fusions"):
        model._pefops_fusions = {}
    return model._pefops_fusions


def list_adapters(model) -> dict[str, BottleneckConfig]:
    return dict(_adapter_registry(model))


def set_active_adapters(model, names: Union[str, list, tuple, "Fuse", None]):
    """Activate one adapter by name, a Fuse of adapters with a fusion layer, or None (base model)."""
    if isinstance(names, Fuse):
        if names.name not in _fusion_registry(model):
            raise ValueError(f"no fusion {names.name!r}; add it with add_adapter_fusion(model, {names!r})")
        for _, _, adapter_layer in _adapter_layers(model):
            adapter_layer.active = names
        model._pefops_active_adapter = names
        return
    if isinstance(names, (list, tuple)):
        if len(names) > 1:
            raise ValueError("one bottleneck adapter can be active at a time here; got " + ", ".join(map(str, names)))
        names = names[0] if names else None
    if names is not None and names not in _adapter_registry(model):
        raise ValueError(f"no adapter named {names!r}; the model has {sorted(_adapter_registry(model)) or 'none'}")
    for _, _, adapter_layer in _adapter_layers(model):
        adapter_layer.active = names
    model._pefops_active_adapter = names


def active_adapter(model) -> Optional[str]:
    return getattr(model, "_pefops_active_adapter", None)


def adapter_parameters(model, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter `name`, by their full names in the model."""
    if name not in _adapter_registry(model):
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(_adapter_registry(model)) or 'none'}")
    marker = f".adapters.{name}."
    return {n: p for n, p in model.named_parameters() if marker in n}


def train_adapter(model, name: str) -> int:
    """Freeze everything but adapter `name`, activate it, put the model in training mode; returns
    (and logs) the number of trainable parameters."""
    parameters = adapter_parameters(model, name)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    set_active_adapters(model, name)
    model.train()
    trainable = sum(p.numel() for p in parameters.values())
    total = sum(p.numel() for p in model.parameters())
    logger.info("training adapter %r: %d trainable parameters of %d (%.3f%%)", name, trainable, total, 100.0 * trainable / total)
    return trainable


def remove_adapter(model, name: str):
    if name not in _adapter_registry(model):
        raise ValueError(f"no adapter named {name!r}")
    for _, _, adapter_layer in _adapter_layers(model):
        if name in adapter_layer.adapters:
            adapter_layer.remove(name)
    del _adapter_registry(model)[name]
    if active_adapter(model) == name:
        set_active_adapters(model, None)
