"""AdapterFusion layer (Pfeiffer et al. 2021) with AdapterHub's options, names and initialisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from pefops.nn.bottleneck_adapter import BottleneckAdapter
from pefops.ops.adapter_fusion import adapter_fusion, adapter_fusion_eager, fusion_regularization_loss, stack_adapters


@dataclass(frozen=True)
class FusionConfig:
    """AdapterHub's AdapterFusionConfig fields; defaults are the "dynamic" preset."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    dropout_prob: Optional[float] = None

    def __post_init__(self):
        for name in ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
                     "value_before_softmax", "value_initialized"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"fusion config {name} must be true or false; got {getattr(self, name)!r}")
        dropout = self.dropout_prob
        if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                    or not 0 <= dropout < 1):
            raise ValueError(f"fusion config dropout_prob must be None or a number in [0, 1); got {dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


FUSION_PRESETS = {
    "dynamic": FusionConfig(),
    "static": FusionConfig(value=False, regularization=False, value_initialized=False),
}


def resolve_fusion_config(config) -> FusionConfig:
    if isinstance(config, FusionConfig):
        return config
    if isinstance(config, str):
        if config not in FUSION_PRESETS:
            raise ValueError(f"unknown fusion config {config!r}; expected one of {', '.join(FUSION_PRESETS)}")
        return FUSION_PRESETS[config]
    if isinstance(config, dict):
        known = set(FusionConfig.__dataclass_fields__)
        unknown = set(config) - known - {"architecture"}
        if unknown:
            raise ValueError(f"unknown fusion config keys {sorted(unknown)}")
        return FusionConfig(**{k: v for k, v in config.items() if k in known})
    raise ValueError(f"fusion config must be 'dynamic', 'static', a dict or a FusionConfig; got {type(config).__name__}")


class AdapterFusion(nn.Module):
    """Attention over N adapters' outputs with a query from the sublayer, as AdapterHub's BertFusion.

    forward(x, query, residual, adapters) runs the N frozen BottleneckAdapters on x and returns
    context (+ residual). Plain adapters (no adapter LayerNorms, no gating, one activation) take the
    fused path (pefops.ops.adapter_fusion: no [tokens, N, H] tensor, 3 H×H products instead of
    2N + 1); others run AdapterHub's formula on their stacked outputs. With `temperature` the
    softmax temperature starts at 50 and falls by 0.05 every forward call to 1, as AdapterHub's.
    """

    def __init__(self, hidden_size: int, config="dynamic", dropout_prob: float = 0.0):
        super().__init__()
        self.config = resolve_fusion_config(config)
        self.hidden_size = hidden_size
        # AdapterHub's rule: the config's dropout_prob, or (None or 0) the model's attention dropout
        self.dropout_prob = self.config.dropout_prob or dropout_prob
        self.query = nn.Linear(hidden_size, hidden_size) if self.config.query else None
        self.key = nn.Linear(hidden_size, hidden_size) if self.config.key else None
        self.value = nn.Linear(hidden_size, hidden_size, bias=False) if self.config.value else None
        self.T = 50.0 if self.config.temperature else 1.0
        self.reduction = self.T / 1000.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in (self.query, self.key, self.value):
            if layer is not None:
                layer.weight.normal_(0.0, 0.02)
                if layer.bias is not None:
                    layer.bias.zero_()
        if self.value is not None and self.config.value_initialized:
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def regularization_loss(self) -> torch.Tensor:
        """0.01 · ‖I − W_v‖² (AdapterHub's fusion regulariser); zero without a value matrix."""
        if self.value is None:
            return torch.zeros((), device=self.key.weight.device if self.key is not None else None)
        return fusion_regularization_loss(self.value.weight)

    def forward(self, x: torch.Tensor, query: torch.Tensor, residual: torch.Tensor,
                adapters: Sequence[BottleneckAdapter]) -> torch.Tensor:
        if not adapters:
            raise ValueError("AdapterFusion needs at least one adapter")
        for name, tensor in (("x", x), ("query", query), ("residual", residual)):
            if tensor.shape[-1] != self.hidden_size:
                raise ValueError(f"AdapterFusion over hidden size {self.hidden_size}: {name} has shape {tuple(tensor.shape)}")
        wrong = [i for i, a in enumerate(adapters) if getattr(a, "hidden_size", None) != self.hidden_size]
        if wrong:
            raise ValueError(f"AdapterFusion over hidden size {self.hidden_size}: adapters {wrong} have another width")
        temperature = self.T
        self.T = max(self.T - self.reduction, 1.0)
        options = dict(
            query_weight=None if self.query is None else self.query.weight,
            query_bias=None if self.query is None else self.query.bias,
            key_weight=None if self.key is None else self.key.weight,
            key_bias=None if self.key is None else self.key.bias,
            value_weight=None if self.value is None else self.value.weight,
            temperature=temperature, dropout_p=self.dropout_prob, training=self.training,
            residual_before=self.config.residual_before,
        )
        if _fusable(adapters):
            stacked = self._stacked(adapters)
            return adapter_fusion(x, query, residual, *stacked, activation=adapters[0].activation,
                                  negative_slope=adapters[0].negative_slope, **options)
        ups = torch.stack([adapter.up_projection(x) for adapter in adapters], dim=-2)
        return adapter_fusion_eager(x.new_empty(0), query, residual, ups,
                                    value_before_softmax=self.config.value_before_softmax, **options)

    def _stacked(self, adapters: Sequence[BottleneckAdapter]):
        """The fused layout of the (frozen) adapters, stacked once and reused while every tensor it
        was made from is the same object with the same data and version: an in-place update (an
        optimizer step, load_state_dict), a moved or replaced adapter, or a new adapter list makes
        it again. Memory: one copy of the adapters' weights, 2·N·r·H + N·(r + H) values."""
        sources = []
        for a in adapters:
            sources += [a.down_proj.weight, a.down_proj.bias, a.up_proj.weight, a.up_proj.bias, a.scaling]
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) if isinstance(t, torch.Tensor) else t
                    for t in sources)
        cached = self.__dict__.get("_stack_cache")
        if (cached is not None and cached[1] == key and len(cached[0]) == len(sources)
                and all(a is b for a, b in zip(cached[0], sources))):
            return cached[2]
        with torch.no_grad():  # the adapters are frozen in fusion: their stacked layout carries no graph
            stacked = stack_adapters([a.down_proj.weight for a in adapters], [a.down_proj.bias for a in adapters],
                                     [a.up_proj.weight for a in adapters], [a.up_proj.bias for a in adapters],
                                     [a.scaling for a in adapters])
        self.__dict__["_stack_cache"] = (tuple(sources), key, stacked)
        return stacked

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, {self.config}"


def _fusable(adapters: Sequence[BottleneckAdapter]) -> bool:
    first = adapters[0]
    return all(
        a.adapter_norm_before is None and a.adapter_norm_after is None and a.gate is None
        and a.activation == first.activation and a.negative_slope == first.negative_slope
        and not (a.training and a.dropout > 0)
        for a in adapters
    )
