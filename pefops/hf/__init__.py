"""transformers integration: bottleneck adapters added, activated, trained, saved and loaded with
AdapterHub's names and semantics, running on pefops' fused op. Needs transformers only for the
models themselves and safetensors for checkpoints."""

from pefops.hf.adapters import (
    AdapterLayer,
    active_adapter,
    adapter_parameters,
    add_adapter,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    train_adapter,
)
from pefops.hf.architectures import ARCHITECTURES
from pefops.hf.checkpoint import load_adapter, save_adapter
from pefops.hf.config import BottleneckConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig, resolve_config

__all__ = [
    "ARCHITECTURES", "AdapterLayer", "BottleneckConfig", "DoubleSeqBnConfig", "ParBnConfig", "SeqBnConfig",
    "active_adapter", "adapter_parameters", "add_adapter", "list_adapters", "load_adapter", "remove_adapter",
    "resolve_config", "save_adapter", "set_active_adapters", "train_adapter",
]
