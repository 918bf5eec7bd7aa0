"""Bottleneck adapter configuration: AdapterHub's BnConfig fields, names and meaning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union


@dataclass(frozen=True)
class BottleneckConfig:
    """The fields of AdapterHub's `BnConfig` (adapters 1.x), with the same defaults.

    mh_adapter / output_adapter: put an adapter after the attention / feed-forward sublayer.
    reduction_factor: hidden / bottleneck; a float, or a mapping from layer index (str) or
    "default" to a float. original_ln_before / original_ln_after: whether the model's own residual
    and LayerNorm are applied before the adapter (its input becomes LN(h + r)) / after it.
    residual_before_ln: the adapter's residual is the sublayer output (True), the sum h + r
    ("post_add"), or the adapter's own input (False). is_parallel: the adapter reads the
    sublayer's input and its output is added beside the sublayer's.
    """

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: Union[float, Mapping[str, float]]
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: Optional[int] = None
    is_parallel: bool = False
    scaling: Union[float, str] = 1.0
    use_gating: bool = False
    residual_before_ln: Union[bool, str] = True
    adapter_residual_before_ln: bool = False
    inv_adapter: Optional[str] = None
    inv_adapter_reduction_factor: Optional[float] = None
    cross_adapter: bool = False
    leave_out: tuple = field(default_factory=tuple)
    dropout: float = 0.0
    phm_layer: bool = False

    def __post_init__(self):
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln must be True, False or 'post_add'; got {self.residual_before_ln!r}")
        if self.phm_layer:
            raise ValueError("phm_layer adapters (Compacter) are not supported by pefops' bottleneck adapter")
        if self.inv_adapter is not None:
            raise ValueError("invertible adapters (inv_adapter) are not supported; set inv_adapter=None")
        if self.cross_adapter:
            raise ValueError("cross-attention adapters (cross_adapter=True) are not supported yet")
        leave_out = (self.leave_out,) if isinstance(self.leave_out, int) else self.leave_out
        try:
            leave_out = tuple(int(i) for i in leave_out)
        except (TypeError, ValueError):
            raise ValueError(f"leave_out must be a list of layer indices; got {self.leave_out!r}") from None
        object.__setattr__(self, "leave_out", leave_out)
        self._check_fields()

    def _check_fields(self):
        """Every field a layer needs, checked once here, so add_adapter never fails half-way."""
        from pefops.nn.bottleneck_adapter import INITS
        from pefops.ops.activations import activation_code

        for flag in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                     "ln_after", "is_parallel", "use_gating", "adapter_residual_before_ln"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false; got {getattr(self, flag)!r}")
        factors = self.reduction_factor
        if isinstance(factors, Mapping):
            if not factors:
                raise ValueError("reduction_factor mapping is empty")
            for key, value in factors.items():
                if key != "default" and not str(key).isdigit():
                    raise ValueError(f"reduction_factor keys are layer indices or 'default'; got {key!r}")
                _check_factor(value, f"reduction_factor[{key!r}]")
        else:
            _check_factor(factors, "reduction_factor")
        activation_code(self.non_linearity)  # raises ValueError naming the known activations
        if self.init_weights not in INITS:
            raise ValueError(f"unknown init_weights {self.init_weights!r}; expected one of {', '.join(INITS)}")
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                raise ValueError(f"scaling must be a number, 'learned' or 'channel'; got {self.scaling!r}")
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling must be a number, 'learned' or 'channel'; got {self.scaling!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {self.dropout!r}")

    def bottleneck_size(self, hidden_size: int, layer_index: int) -> int:
        factor = self.reduction_factor
        if isinstance(factor, Mapping):
            key = str(layer_index)
            if key in factor:
                factor = factor[key]
            elif "default" in factor:
                factor = factor["default"]
            else:
                raise ValueError(f"reduction_factor mapping has no entry for layer {layer_index} and no 'default'")
        return max(1, int(hidden_size // factor))

    def to_dict(self) -> dict:
        """AdapterHub's JSON form (its `architecture` key is "bottleneck")."""
        data = dataclasses.asdict(self)
        data["leave_out"] = list(self.leave_out)
        data["architecture"] = "bottleneck"
        return data

    def replace(self, **changes) -> "BottleneckConfig":
        return dataclasses.replace(self, **changes)


def _check_factor(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise ValueError(f"{what} must be a positive number; got {value!r}")


def SeqBnConfig(**changes) -> BottleneckConfig:
    """Pfeiffer et al. 2020: one adapter after the feed-forward sublayer."""
    return BottleneckConfig(**{**dict(
        original_ln_before=True, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
        ln_before=False, ln_after=False, mh_adapter=False, output_adapter=True, non_linearity="relu",
        reduction_factor=16), **changes})


def DoubleSeqBnConfig(**changes) -> BottleneckConfig:
    """Houlsby et al. 2019: adapters after both the attention and the feed-forward sublayers."""
    return BottleneckConfig(**{**dict(
        original_ln_before=False, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
        ln_before=False, ln_after=False, mh_adapter=True, output_adapter=True, non_linearity="swish",
        reduction_factor=16), **changes})


def ParBnConfig(**changes) -> BottleneckConfig:
    """He et al. 2021: a parallel adapter beside the feed-forward sublayer."""
    return BottleneckConfig(**{**dict(
        original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False, mh_adapter=False,
        output_adapter=True, reduction_factor=2, non_linearity="relu", init_weights="mam_adapter", is_parallel=True,
        scaling=4.0), **changes})


PRESETS = {
    "seq_bn": SeqBnConfig, "pfeiffer": SeqBnConfig,
    "double_seq_bn": DoubleSeqBnConfig, "houlsby": DoubleSeqBnConfig,
    "par_bn": ParBnConfig, "parallel": ParBnConfig,
}
_FIELDS = {f.name for f in dataclasses.fields(BottleneckConfig)}
# AdapterHub keys with no effect on a bottleneck adapter's function, dropped on import
_IGNORED_KEYS = {"architecture", "phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule",
                 "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm", "hypercomplex_nonlinearity",
                 "phm_rank", "phm_bias", "stochastic_depth"}


def resolve_config(config: Union[str, Mapping[str, Any], BottleneckConfig, None]) -> BottleneckConfig:
    """A preset name (optionally with "name[key=value,...]" overrides), a dict (AdapterHub JSON
    included) or a BottleneckConfig."""
    if isinstance(config, BottleneckConfig):
        return config
    if config is None:
        config = "seq_bn"
    if isinstance(config, str):
        name, _, overrides = config.partition("[")
        if name not in PRESETS:
            raise ValueError(f"unknown adapter config {name!r}; expected one of {', '.join(PRESETS)} or a BottleneckConfig")
        changes = {}
        for item in filter(None, overrides.rstrip("]").split(",")):
            key, _, value = item.partition("=")
            changes[key.strip()] = _parse_value(value.strip())
        unknown = set(changes) - _FIELDS
        if unknown:
            raise ValueError(f"unknown bottleneck config keys {sorted(unknown)} in {config!r}")
        return PRESETS[name](**changes)
    if isinstance(config, Mapping):
        data = dict(config)
        architecture = data.get("architecture", "bottleneck")
        if architecture not in (None, "bottleneck"):
            raise ValueError(f"only bottleneck adapters are supported here; config has architecture={architecture!r}")
        if data.get("stochastic_depth", 0.0):
            raise ValueError("stochastic_depth > 0 is not supported")
        unknown = set(data) - _FIELDS - _IGNORED_KEYS
        if unknown:
            raise ValueError(f"unknown bottleneck config keys {sorted(unknown)}")
        required = {f.name for f in dataclasses.fields(BottleneckConfig)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        absent = sorted(required - set(data))
        if absent:
            raise ValueError(f"bottleneck config lacks {absent}")
        return BottleneckConfig(**{k: v for k, v in data.items() if k in _FIELDS})
    raise ValueError(f"config must be a preset name, a dict or a BottleneckConfig; got {type(config).__name__}")


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text
