"""The functional API: one module per op family, each a torch.library custom op with its reference."""

from pefops.ops.activations import NAMES as ACTIVATIONS
from pefops.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_ref
from pefops.ops.adapter_fusion import adapter_fusion, adapter_fusion_eager, stack_adapters
from pefops.ops.fusion_mix import fusion_mix, fusion_mix_ref
from pefops.ops.gated_blend import alpha_blend, gated_blend, gated_blend_ref, ladder_gate
from pefops.ops.masked_linear import (
    masked_linear,
    masked_linear_ref,
    masked_linear_routed,
    masked_linear_scores,
    masked_linear_scores_ref,
    pack_mask,
    unpack_mask,
)
from pefops.ops.multi_adapter import multi_adapter, multi_adapter_ref
from pefops.ops.lsh_attention import lsh_attention, lsh_attention_qkv, lsh_attention_ref, lsh_hash, lsh_rotations, lsh_sort
from pefops.ops.prefix_attention import prefix_attention, prefix_attention_ref

__all__ = [
    "ACTIVATIONS", "adapter_fusion", "adapter_fusion_eager", "stack_adapters", "fusion_mix", "fusion_mix_ref", "alpha_blend", "gated_blend", "gated_blend_ref", "ladder_gate", "bottleneck_adapter", "bottleneck_adapter_ref", "masked_linear", "masked_linear_ref", "masked_linear_routed",
    "masked_linear_scores", "masked_linear_scores_ref", "multi_adapter", "multi_adapter_ref", "prefix_attention", "prefix_attention_ref", "pack_mask", "unpack_mask",
    "lsh_attention", "lsh_attention_qkv", "lsh_attention_ref", "lsh_hash", "lsh_rotations", "lsh_sort",
]
