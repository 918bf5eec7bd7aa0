"""Drop-in torch.nn modules built on pefops.ops, one file per op family."""

from pefops.nn.adapter_fusion import AdapterFusion, FusionConfig
from pefops.nn.bottleneck_adapter import BottleneckAdapter
from pefops.nn.lsh_attention import LSHSelfAttention
from pefops.nn.masked_linear import MaskedLinear
from pefops.nn.prefix_tuning import PrefixEncoder, PromptEmbedding
from pefops.nn.side_tuning import LadderSideNetwork, SideBlock, SideTuned

__all__ = ["AdapterFusion", "FusionConfig", "BottleneckAdapter", "LSHSelfAttention", "LadderSideNetwork", "MaskedLinear", "PrefixEncoder", "PromptEmbedding", "SideBlock", "SideTuned"]
