"""The functional API: one module per op family, each a torch.library custom op with its reference."""

from pefops.ops.activations import NAMES as ACTIVATIONS
from pefops.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_ref

__all__ = ["ACTIVATIONS", "bottleneck_adapter", "bottleneck_adapter_ref"]
