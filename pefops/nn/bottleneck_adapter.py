"""Drop-in bottleneck adapter module (Houlsby / Pfeiffer / parallel building block)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from pefops.ops import bottleneck_adapter
from pefops.ops.activations import activation_code, activation_forward

INITS = ("bert", "houlsby", "mam", "mam_adapter")


class BottleneckAdapter(nn.Module):
    """y = residual + scaling * up(act(down(x))) [→ LayerNorm], fused in one op.

    The same options and initialisations as AdapterHub's `Adapter`: `scaling` is a float,
    "learned" (one learnable scalar, starts at 1) or "channel" (one per hidden unit, start at 1);
    `init` is "bert" (normal std 0.02, zero biases), "houlsby" (normal std 1e-2 truncated at ±2e-2,
    zero biases) or "mam" (kaiming-uniform down, zero up: a no-op at initialisation).
    `ln_before` adds a LayerNorm on the adapter's input, `ln_after` one on its output (after the
    residual when `adapter_residual_before_ln`, else before it). Dropout (in training) and gating
    run the unfused path; everything else is one fused call.
    """

    def __init__(self, hidden_size: int, bottleneck_size: Optional[int] = None, *,
                 reduction_factor: Optional[float] = None, activation: str = "relu",
                 scaling: Union[float, str] = 1.0, init: str = "bert", ln_before: bool = False,
                 ln_after: bool = False, adapter_residual_before_ln: bool = False, use_gating: bool = False,
                 dropout: float = 0.0, negative_slope: float = 0.01, device=None, dtype=None):
        super().__init__()
        if (bottleneck_size is None) == (reduction_factor is None):
            raise ValueError("give exactly one of bottleneck_size and reduction_factor")
        if bottleneck_size is None:
            if reduction_factor <= 0:
                raise ValueError(f"reduction_factor must be positive; got {reduction_factor}")
            bottleneck_size = int(hidden_size // reduction_factor)
        bottleneck_size = max(1, int(bottleneck_size))  # AdapterHub's floor of one unit
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        activation_code(activation)  # validates the name
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.activation, self.negative_slope = activation.lower(), negative_slope
        self.init, self.adapter_residual_before_ln = init, adapter_residual_before_ln
        self.dropout = dropout
        self.adapter_norm_before = nn.LayerNorm(hidden_size, **factory) if ln_before else None
        self.down_proj = nn.Linear(hidden_size, bottleneck_size, **factory)
        self.up_proj = nn.Linear(bottleneck_size, hidden_size, **factory)
        self.adapter_norm_after = nn.LayerNorm(hidden_size, **factory) if ln_after else None
        self.gate = nn.Linear(hidden_size, 1, **factory) if use_gating else None
        if isinstance(scaling, str):
            if scaling not in ("learned", "channel"):
                raise ValueError(f"scaling must be a float, 'learned' or 'channel'; got {scaling!r}")
            size = 1 if scaling == "learned" else hidden_size
            self.scaling = nn.Parameter(torch.ones(size, device=device, dtype=torch.float32))
        else:
            self.scaling = float(scaling)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "bert":
            for layer in (self.down_proj, self.up_proj, self.gate):
                if layer is not None:
                    layer.weight.normal_(0.0, 0.02)
                    layer.bias.zero_()
        elif self.init == "houlsby":
            for layer in (self.down_proj, self.up_proj):
                nn.init.trunc_normal_(layer.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                layer.bias.zero_()
            if self.gate is not None:
                self.gate.weight.normal_(0.0, 0.02)
                self.gate.bias.zero_()
        else:  # mam
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            self.down_proj.bias.zero_()
            self.up_proj.weight.zero_()
            self.up_proj.bias.zero_()
            if self.gate is not None:
                self.gate.weight.normal_(0.0, 0.02)
                self.gate.bias.zero_()
        for norm in (self.adapter_norm_before, self.adapter_norm_after):
            if norm is not None:
                norm.reset_parameters()

    def _fusable(self) -> bool:
        dropping = self.training and self.dropout > 0
        return not dropping and self.gate is None and (self.adapter_norm_after is None or self.adapter_residual_before_ln)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                layer_norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """x: [..., hidden]. residual: added to the adapter's output (default x). layer_norm: a
        LayerNorm applied to the sum, fused into the kernel's epilogue (used by the transformer
        integration for the model's own post-sublayer LayerNorm)."""
        adapter_input = x if self.adapter_norm_before is None else self.adapter_norm_before(x)
        residual = x if residual is None else residual
        if not self._fusable():
            out = self._unfused(x, adapter_input, residual)
            return out if layer_norm is None else layer_norm(out)
        norm = self.adapter_norm_after
        if norm is not None and layer_norm is not None:
            # two LayerNorms in a row: fuse the adapter's own, apply the outer one after
            return layer_norm(self._fused(adapter_input, residual, norm))
        return self._fused(adapter_input, residual, norm if norm is not None else layer_norm)

    def _fused(self, adapter_input, residual, norm):
        layer_norm = None if norm is None else (norm.weight, norm.bias, norm.eps)
        return bottleneck_adapter(
            adapter_input, self.down_proj.weight, self.down_proj.bias, self.up_proj.weight, self.up_proj.bias,
            activation=self.activation, scaling=self.scaling, residual=residual, layer_norm=layer_norm,
            negative_slope=self.negative_slope,
        )

    def _unfused(self, x, adapter_input, residual):
        # AdapterHub's order: up * scaling → dropout → gate → (+residual, LN) in the configured order
        code = activation_code(self.activation)
        down = activation_forward(self.down_proj(adapter_input), code, self.negative_slope)
        output = self.up_proj(down) * self.scaling
        output = nn.functional.dropout(output, self.dropout, self.training)
        if self.gate is not None:
            gate = torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
            output = output * gate
        if self.adapter_residual_before_ln:
            output = output + residual
        if self.adapter_norm_after is not None:
            output = self.adapter_norm_after(output)
        if not self.adapter_residual_before_ln:
            output = output + residual
        return output

    def up_projection(self, x: torch.Tensor) -> torch.Tensor:
        """s * up(act(down(x))) alone (AdapterHub's `bottleneck_up`: no dropout, gate or residual),
        what AdapterFusion attends over."""
        h = x if self.adapter_norm_before is None else self.adapter_norm_before(x)
        down = activation_forward(self.down_proj(h), activation_code(self.activation), self.negative_slope)
        return self.up_proj(down) * self.scaling

    def extra_repr(self) -> str:
        scaling = self.scaling if isinstance(self.scaling, float) else f"learned[{self.scaling.numel()}]"
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"activation={self.activation}, scaling={scaling}, init={self.init}")
