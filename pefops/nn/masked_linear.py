"""Drop-in binary-masked linear layer for mask-tuning (Zhao et al. 2020)."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pefops.ops.common import check_index_tensor, describe, host_to_device
from pefops.ops.masked_linear import (
    MAX_DECODE_ROWS,
    build_routing_plan,
    masked_linear,
    masked_linear_routed,
    masked_linear_scores,
    pack_mask,
    packed_columns,
    unpack_mask,
)
from pefops.ops.row_partition import merge_rows, split_rows


MERGE_ENV = "PEFOPS_MASKED_MERGE"


def merging_enabled() -> bool:
    """PEFOPS_MASKED_MERGE=0 turns the merged-weight inference path off everywhere. Read when a frozen
    layer's call would build its merged weight (the first call after freeze / set_mask / a weight or
    mask change), not on every call: the per-call check of an existing merge costs no environment read."""
    value = os.environ.get(MERGE_ENV)
    return value is None or value.strip().lower() not in ("0", "off", "false", "no")


def _split_rows(row_task: torch.Tensor):
    """None when every row has a task mask; else (rows without a mask, rows with one, those rows'
    task indices), computed once per routing."""
    dense = row_task < 0
    if row_task.numel() == 0 or not bool(dense.any()):  # once per set_row_masks, not per forward
        return None
    dense_rows, masked_rows = dense.nonzero().flatten(), (~dense).nonzero().flatten()
    return dense_rows, masked_rows, row_task[masked_rows]


class MaskedLinear(nn.Module):
    """y = x @ (W ⊙ M).T + b with W frozen and M a learned binary mask.

    Training form: real-valued `scores` S, M = (S > threshold), straight-through gradients.
    Inference form (after `freeze()`): M stored as 1-bit packed uint8 `mask`, scores dropped.
    The weight is the wrapped layer's own tensor (never copied); a GPT-2 `Conv1D` weight
    ([in, out]) is used through a transposed view. The bias is never masked and trains when
    `train_bias` is set.

    Frozen inference (`merge_weight`, on by default; PEFOPS_MASKED_MERGE=0 turns it off): for
    prefill sizes (more than MAX_DECODE_ROWS rows on a GPU, every size on the CPU) the masked weight
    W ⊙ M is materialised once per (mask, weight) version and the call is a dense F.linear; GPU
    decode (≤ 16 rows) and training keep the fused kernels. Memory: one dense copy of the weight,
    out·in elements in its dtype (33.6 MB for a 4096² bf16 layer), held while the layer is frozen.
    Per call, an existing merge is checked by identity and version of the mask and weight tensors read
    straight from the module's parameter/buffer tables (no nn.Module.__getattr__, no environment read,
    no backend selection), so a 1-row CPU call costs about what an nn.Linear call does.
    """

    merge_weight: bool = True

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, threshold: float = 1e-2,
                 init_sparsity: float = 0.5, weight_is_in_out: bool = False, train_bias: bool = False):
        super().__init__()
        if not 0.0 < init_sparsity < 1.0:
            raise ValueError(f"init_sparsity must be in (0, 1); got {init_sparsity}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)  # always in _parameters (as nn.Linear), read from there per call
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(train_bias)
        self.weight_is_in_out = weight_is_in_out
        self.threshold = float(threshold)
        self.init_sparsity = float(init_sparsity)
        out_features, in_features = self._weight_out_in().shape
        self.in_features, self.out_features = in_features, out_features
        self.scores = nn.Parameter(torch.empty(out_features, in_features, device=weight.device, dtype=torch.float32))
        self.register_buffer("mask", None)
        self.reset_scores()

    @classmethod
    def from_linear(cls, linear: nn.Module, threshold: float = 1e-2, init_sparsity: float = 0.5,
                    train_bias: bool = False) -> "MaskedLinear":
        """Wrap an nn.Linear, or a transformers Conv1D (weight [in, out]), sharing its weight."""
        if isinstance(linear, nn.Linear):
            return cls(linear.weight, linear.bias, threshold=threshold, init_sparsity=init_sparsity, train_bias=train_bias)
        if type(linear).__name__ == "Conv1D" and hasattr(linear, "nf"):
            return cls(linear.weight, linear.bias, threshold=threshold, init_sparsity=init_sparsity,
                       weight_is_in_out=True, train_bias=train_bias)
        raise ValueError(f"MaskedLinear.from_linear takes nn.Linear or transformers Conv1D; got {type(linear).__name__}")

    def _weight_out_in(self) -> torch.Tensor:
        return self.weight.t() if self.weight_is_in_out else self.weight

    @torch.no_grad()
    def reset_scores(self) -> None:
        """The authors' initialisation: uniform on (-0.02, (0.02 + threshold) / init_sparsity - 0.02),
        so a fraction init_sparsity of the scores starts at or below the threshold (masked out)."""
        if self.scores is None:
            raise RuntimeError("this layer is frozen (scores dropped); it has no scores to reset")
        low = -0.02
        high = (0.02 + self.threshold) / self.init_sparsity - 0.02
        self.scores.uniform_(low, high)

    @property
    def frozen(self) -> bool:
        return self.scores is None

    def packed_mask(self) -> torch.Tensor:
        """The current mask, packed: uint8 [out, ceil(in / 8)]."""
        if self.frozen:
            return self.mask
        return pack_mask(self.scores.detach(), self.threshold)

    @torch.no_grad()
    def freeze(self) -> "MaskedLinear":
        """Pack the mask and drop the scores: the inference form."""
        if not self.frozen:
            self.mask = self.packed_mask()
            self.scores = None
        return self

    @torch.no_grad()
    def set_mask(self, packed: torch.Tensor) -> None:
        """Switch to another task's packed mask (inference form); the weight is not touched."""
        expected = (self.out_features, packed_columns(self.in_features))
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise ValueError(f"mask must be uint8 {expected}; got {packed.dtype} {tuple(packed.shape)}")
        self.scores = None
        self.mask = packed.to(self.weight.device).contiguous()

    @torch.no_grad()
    def set_row_masks(self, packed_masks: Optional[torch.Tensor], row_task: Optional[torch.Tensor] = None) -> None:
        """Mixed-task batch: sequence b of the next inputs uses packed_masks[row_task[b]] (uint8
        [tasks, out, ceil(in / 8)]); row_task[b] = -1: the shared weight without any mask (a row of
        another method or of the base model). Rows of -1 run one dense GEMM, the others the routed
        masked GEMM, so W ⊙ M is never made for them. None clears it (back to the layer's own mask)."""
        if packed_masks is None:
            self._row_masks = None
            return
        expected = (self.out_features, packed_columns(self.in_features))
        if packed_masks.dtype != torch.uint8 or packed_masks.dim() != 3 or tuple(packed_masks.shape[1:]) != expected:
            raise ValueError(f"row masks must be uint8 [tasks, {expected[0]}, {expected[1]}]; got "
                             f"{packed_masks.dtype} {tuple(packed_masks.shape)}")
        check_index_tensor(row_task, "row_task", "[batch] of indices into packed_masks (int64)")
        if row_task.dim() != 1:
            raise ValueError(f"row_task must be a 1-D integer tensor [batch]; got {describe(row_task)}")
        tasks = packed_masks.shape[0]
        if row_task.device.type == "cpu" and row_task.numel():  # free on the CPU; CUDA indices are checked per call
            low, high = int(row_task.min()), int(row_task.max())
            if low < -1 or high >= tasks:
                raise ValueError(f"row_task values must be in [-1, {tasks}) ({tasks} task masks; -1: no mask); got "
                                 f"{low}..{high}")
        # the layer's own copy: the caller editing its tensor in place later must not reroute the rows.
        # A CPU index (task ids from a data loader) stays on the CPU: the routed GEMM plans it on the host
        # and sends the plan without waiting for the device; only the row sets the gathers read move now.
        # The routed GEMM's plan is made here, with the routing, not in the forward.
        row_task = row_task.detach().to(dtype=torch.long, copy=True)
        device = self.weight.device
        split = _split_rows(row_task)
        if split is None:
            plan = build_routing_plan(row_task, tasks, device) if row_task.numel() else None
        else:
            dense_rows, masked_rows, masked_task = split
            plan = build_routing_plan(masked_task, tasks, device) if masked_task.numel() else None
            split = (host_to_device(dense_rows, device), host_to_device(masked_rows, device), masked_task)
        self._row_masks = (packed_masks.to(device).contiguous(), row_task, split, plan)

    def _current_merge(self) -> Optional[torch.Tensor]:
        """The cached W ⊙ M if it was made from the layer's present mask and weight tensors, at their
        present versions and storage; else None. A few dict reads and integer compares (per call)."""
        cached = self.__dict__.get("_merged")
        if cached is None:
            return None
        mask, weight = self._buffers["mask"], self._parameters["weight"]
        if (cached[0] is mask and cached[1] is weight
                and cached[2] == (mask._version, weight._version, mask.data_ptr(), weight.data_ptr())):
            return cached[3]
        return None

    def merged_weight(self) -> torch.Tensor:
        """W ⊙ M [out, in] (contiguous, the weight's dtype) of a frozen layer, made once and reused
        while the mask and the weight are the same tensors with the same data and version (an in-place
        update, `.data` reassignment, set_mask or a new weight parameter makes it again)."""
        merged = self._current_merge()
        if merged is not None:
            return merged
        if not self.frozen:
            raise RuntimeError("merged_weight is for a frozen layer (call freeze() or set_mask() first)")
        mask, weight = self._buffers["mask"], self._parameters["weight"]
        with torch.no_grad():
            # where, not a product: a masked inf/NaN weight is dropped, as the kernels drop it
            merged = torch.where(unpack_mask(mask, self.in_features), self._weight_out_in(), 0).contiguous()
        self.__dict__["_merged"] = (mask, weight, (mask._version, weight._version, mask.data_ptr(), weight.data_ptr()),
                                    merged)
        return merged

    def density(self) -> float:
        """Fraction of weights kept."""
        return unpack_mask(self.packed_mask(), self.in_features).float().mean().item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        if (params["scores"] is None and self.merge_weight and self.__dict__.get("_row_masks") is None
                and (x.is_cpu or x.numel() > MAX_DECODE_ROWS * x.shape[-1])):
            # frozen inference at prefill sizes (every size on CPU): the merged weight, a dense GEMM
            merged = self._current_merge()
            if merged is None and merging_enabled():
                merged = self.merged_weight()
            if merged is not None:
                return F.linear(x if x.dtype == merged.dtype else x.to(merged.dtype), merged, params["bias"])
        weight = self._weight_out_in()
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        row_masks = getattr(self, "_row_masks", None)
        if row_masks is not None:
            packed_masks, row_task, split, plan = row_masks
            if split is None:  # every row has a task mask
                return masked_linear_routed(x, weight, packed_masks, row_task, self.bias, _plan=plan)
            dense_rows, masked_rows, masked_task = split
            if x.shape[0] != row_task.numel():
                raise ValueError(f"row_task must be an integer tensor [{x.shape[0]}] (one task per sequence); "
                                 f"set_row_masks routed {row_task.numel()} rows")
            if not masked_rows.numel():
                return F.linear(x, weight, self.bias)
            x_dense, x_masked = split_rows(x, (dense_rows, masked_rows))
            pieces = (F.linear(x_dense, weight, self.bias),
                      masked_linear_routed(x_masked, weight, packed_masks, masked_task, self.bias, _plan=plan))
            return merge_rows(pieces, (dense_rows, masked_rows), x.shape[0])
        if self.frozen:
            return masked_linear(x, weight, self.mask, self.bias)
        self.__dict__.pop("_merged", None)
        return masked_linear_scores(x, weight, self.scores, self.threshold, self.bias)

    def extra_repr(self) -> str:
        form = "frozen (1-bit mask)" if self.frozen else f"scores, threshold={self.threshold}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{form}")
