"""Launch settings every kernel family shares (no @triton.jit code here)."""

from __future__ import annotations

import os

import torch

# PEFOPS_AUTOTUNE_CONFIGS: how many configs an autotuned kernel may try per new key.
#   unset / "all"  every config its pruner keeps (the default)
#   "0" / "off"    none: the heuristic config of the launcher runs, as under the interpreter
#   N >= 1         at most the N kept configs nearest the heuristic one
# A first run on a bare machine (bench/gpu_check.sh) sets it low: each config is a compilation of
# several seconds, and the bottleneck forward keeps up to 36 per key.
AUTOTUNE_ENV = "PEFOPS_AUTOTUNE_CONFIGS"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_limit() -> int | None:
    """The most configs an autotuner tries (None: no limit; 0: none, the heuristic config runs)."""
    value = os.environ.get(AUTOTUNE_ENV, "").strip().lower()
    if value in ("", "all"):
        return None
    if value in ("off", "no", "false", "heuristic"):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"{AUTOTUNE_ENV} must be 'all', 'off' or a count of configs; got {value!r}") from None


def autotuning() -> bool:
    """Whether the launchers call the autotuned kernels (not under the interpreter, nor with
    PEFOPS_AUTOTUNE_CONFIGS=0)."""
    return not interpreting() and autotune_limit() != 0


def limit_configs(configs: list, like: dict | None = None, num_warps: int | None = None) -> list:
    """An early_config_prune step after a family's own pruning: at most PEFOPS_AUTOTUNE_CONFIGS of
    `configs`, the nearest to the heuristic block sizes `like` (and warps) first (distance in
    powers of two), ties kept in list order."""
    limit = autotune_limit()
    if limit is None or len(configs) <= max(limit, 1):
        return configs
    like = like or {}

    def distance(config):
        d = sum(abs(int(config.kwargs.get(k, v)).bit_length() - int(v).bit_length()) for k, v in like.items())
        if num_warps is not None:
            d += abs(int(config.num_warps).bit_length() - int(num_warps).bit_length())
        return d

    return sorted(configs, key=distance)[:max(limit, 1)]


def token_bucket(tokens: int) -> int:
    """The power-of-two bucket of a token count in autotuning keys (16 .. 2**20): one tuning per
    bucket, not per exact count, and not one for every count either."""
    bucket = 16
    while bucket < tokens and bucket < 1 << 20:
        bucket <<= 1
    return bucket


_SM_COUNTS: dict = {}


def multiprocessors(device) -> int:
    """The device's SM count (cached; 132 for an H100/H200 SXM when the device is not CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def fill_the_device(configs: list, tokens: int, device, programs_per_sm: int = 2) -> list:
    """Of configs with a BLOCK_M, those whose grid cdiv(tokens, BLOCK_M) gives every SM at least
    `programs_per_sm` programs; when none does, those with the smallest BLOCK_M (the largest grid)."""
    if not configs or "BLOCK_M" not in configs[0].kwargs:
        return configs
    target = programs_per_sm * multiprocessors(device)
    full = [c for c in configs if -(-tokens // c.kwargs["BLOCK_M"]) >= target]
    if full:
        return full
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] == smallest]


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast dot operands to fp32, input precision). fp32 follows torch's TF32 switch; the
    interpreter's bf16 dot is wrong (seen on triton 3.8), so it upcasts there."""
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"
    return interpreting() and dtype == torch.bfloat16, "ieee"
