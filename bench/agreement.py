"""How far one provider's output is from the baseline's (the max_rel_err_vs_<baseline> column)."""

from __future__ import annotations

from typing import Any

import torch


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def max_rel_err(out: Any, ref: Any) -> float | None:
    """max |out - ref| / max |ref| over all tensors (in float32); None when there is nothing to compare."""
    a, b = _tensors(out), _tensors(ref)
    if not a or len(a) != len(b):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        x, y = x.detach().float(), y.detach().float()
        scale = y.abs().max().item() or 1.0
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst
