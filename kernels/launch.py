"""Launch settings every kernel family shares (no @triton.jit code here)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast dot operands to fp32, input precision). fp32 follows torch's TF32 switch; the
    interpreter's bf16 dot is wrong (seen on triton 3.8), so it upcasts there."""
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"
    return interpreting() and dtype == torch.bfloat16, "ieee"
