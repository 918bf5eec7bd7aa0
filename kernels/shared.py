"""What the kernels and the ops layer share, in one place. Importable without Triton: pefops.ops
imports it when pefops is imported.

- The activation codes the kernels switch on (pefops.ops.activations maps names to them). The CUDA
  sources have the same codes and rank limit in csrc/common.cuh; tests/csrc/test_shared_constants.py
  checks that the two agree.
- MAX_RANK: the largest bottleneck size r the adapter kernels (Triton and CUDA decode) serve.
- unit_stride_rows: the row layout the launchers index (unit stride along the last dimension).
"""

from __future__ import annotations

from typing import Optional

import torch

IDENTITY, RELU, GELU, GELU_TANH, SILU, TANH, LEAKY_RELU = range(7)
NUM_ACTIVATIONS = 7

MAX_RANK = 1024


def unit_stride_rows(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor itself when its last dimension has unit stride (the kernels index rows by the
    other strides), else a contiguous copy; None stays None."""
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()
