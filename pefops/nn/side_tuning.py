"""Side-tuning (Zhang et al. 2019) and ladder side-tuning (Sung et al. 2022) modules.

The base network is frozen and run under no-grad, so it keeps no activations for backward: only
the small side network's activations are stored. That is where the memory saving comes from.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pefops.ops.gated_blend import alpha_blend, ladder_gate


def _blend_output(base_out, side_out, alpha):
    """Blend tensors, or the `last_hidden_state` of transformers outputs (keeping the base's type)."""
    if isinstance(base_out, torch.Tensor):
        side_tensor = side_out if isinstance(side_out, torch.Tensor) else side_out.last_hidden_state
        return alpha_blend(base_out, side_tensor, alpha)
    side_tensor = side_out if isinstance(side_out, torch.Tensor) else side_out.last_hidden_state
    # transformers' ModelOutput keeps attribute and key in step on assignment
    base_out.last_hidden_state = alpha_blend(base_out.last_hidden_state, side_tensor, alpha)
    return base_out


class SideTuned(nn.Module):
    """out = sigmoid(alpha) * base(x) + (1 - sigmoid(alpha)) * side(x), alpha learnable (starts at
    `alpha_init`, 0 → an even blend). The base is frozen and run under torch.no_grad()."""

    def __init__(self, base: nn.Module, side: nn.Module, alpha_init: float = 0.0, learn_alpha: bool = True):
        super().__init__()
        self.base = base
        self.side = side
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.alpha = nn.Parameter(torch.tensor([float(alpha_init)]), requires_grad=learn_alpha)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            base_out = self.base(*args, **kwargs)
        side_out = self.side(*args, **kwargs)
        return _blend_output(base_out, side_out, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={torch.sigmoid(self.alpha.detach()).item():.3f} (sigmoid), learn_alpha={self.alpha.requires_grad}"


class SideBlock(nn.Module):
    """A small pre-LayerNorm transformer layer of the side network (attention through SDPA)."""

    def __init__(self, width: int, num_heads: int, intermediate: int, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"side width {width} is not divisible by {num_heads} heads")
        self.num_heads, self.causal, self.dropout = num_heads, causal, dropout
        self.norm_attention = nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.output = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.fc_in = nn.Linear(width, intermediate)
        self.fc_out = nn.Linear(intermediate, width)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, length, width = x.shape
        h = self.norm_attention(x)
        heads = lambda t: t.view(batch, length, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].to(torch.bool)
            if self.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + self.output(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc_out(F.gelu(self.fc_in(self.norm_mlp(x))))


class LadderSideNetwork(nn.Module):
    """The side network of ladder side-tuning, at width hidden / reduction_factor.

    forward(hidden_states, attention_mask) takes the base's hidden states (embeddings then every
    layer, L + 1 tensors [B, T, hidden], detached) and returns [B, T, output_size]:
        side_0 = down_0(h_0)
        side_i = block_i(ladder_gate(down_i(h_i), side_{i-1}, alpha_i, T))   i = 1..L
        out    = up(norm(side_L))
    With ladder=False only h_0 enters (plain side-tuning's independent side network on the base's
    embeddings)."""

    def __init__(self, hidden_size: int, num_layers: int, reduction_factor: float = 8, num_heads: Optional[int] = None,
                 output_size: Optional[int] = None, temperature: float = 0.1, causal: bool = False, ladder: bool = True,
                 base_num_heads: int = 12):
        super().__init__()
        width = max(1, int(hidden_size // reduction_factor))
        if num_heads is None:
            num_heads = max(1, base_num_heads // int(max(1, reduction_factor)))
            while width % num_heads:
                num_heads -= 1
        self.hidden_size, self.width, self.num_layers = hidden_size, width, num_layers
        self.temperature, self.ladder = float(temperature), ladder
        count = num_layers + 1 if ladder else 1
        self.downs = nn.ModuleList(nn.Linear(hidden_size, width) for _ in range(count))
        self.gates = nn.Parameter(torch.zeros(num_layers)) if ladder else None
        self.blocks = nn.ModuleList(SideBlock(width, num_heads, 4 * width, causal=causal) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, output_size or hidden_size)

    def forward(self, hidden_states: Sequence[torch.Tensor], attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        expected = self.num_layers + 1 if self.ladder else 1
        if len(hidden_states) < expected:
            raise ValueError(f"the ladder side network needs {expected} hidden states (embeddings + {self.num_layers} "
                             f"layers); got {len(hidden_states)}")
        dtype = self.up.weight.dtype
        side = self.downs[0](hidden_states[0].detach().to(dtype))
        for index, block in enumerate(self.blocks):
            if self.ladder:
                down = self.downs[index + 1](hidden_states[index + 1].detach().to(dtype))
                side = ladder_gate(down, side, self.gates[index : index + 1], self.temperature)
            side = block(side, attention_mask)
        return self.up(self.norm(side))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, width={self.width}, layers={self.num_layers}, ladder={self.ladder}"
