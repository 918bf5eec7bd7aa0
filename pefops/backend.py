"""Backend registry and selection.

Each op family registers one `Implementation` per backend with its declared capabilities. Selection
tries cuda → triton → torch and takes the first that reports no reasons against the call. A backend
forced by `backend=` or the `PEFOPS_BACKEND` environment variable is used or the call fails with a
`BackendNotSupportedError` listing why; an automatic choice never fails because an optional backend
is missing (the torch reference serves everything).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

BACKEND_ORDER = ("cuda", "triton", "torch")
ENV_VARIABLE = "PEFOPS_BACKEND"


class BackendNotSupportedError(RuntimeError):
    """A forced backend cannot serve a call; the message lists every reason."""


@dataclass(frozen=True)
class Problem:
    """What selection needs to know about one call."""

    device: torch.device
    dtype: torch.dtype
    mode: str = "forward"  # "forward" or "backward"
    sizes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    has_backward: bool
    # functions of this backend by role, e.g. {"forward": f, "backward": g}
    functions: Mapping[str, Callable]
    # reasons the backend is unusable on this machine at all (missing package, no compiler)
    environment_reasons: Callable[[], list[str]] = lambda: []
    # reasons against one call (shape limits); receives the problem
    limits: Callable[[Problem], list[str]] = lambda problem: []

    def not_supported_reasons(self, problem: Problem, forced: bool = False) -> list[str]:
        reasons = list(self.environment_reasons())
        if reasons:
            return reasons
        device_type = problem.device.type
        if self.backend == "triton" and device_type == "cpu":
            reasons += triton_cpu_reasons(forced)
        elif device_type not in self.devices:
            reasons.append(f"device {device_type!r} not supported (supports {', '.join(self.devices)})")
        if problem.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(problem.dtype).removeprefix('torch.')} not supported (supports {names})")
        if problem.mode == "backward" and not self.has_backward:
            reasons.append("has no backward")
        return reasons + list(self.limits(problem))


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(implementation: Implementation) -> Implementation:
    if implementation.backend not in BACKEND_ORDER:
        raise ValueError(f"unknown backend {implementation.backend!r}; expected one of {BACKEND_ORDER}")
    _REGISTRY.setdefault(implementation.op, {})[implementation.backend] = implementation
    clear_selection_cache()
    return implementation


def register_torch_and_triton(op: str, *, dtypes: tuple, torch_functions: Mapping[str, Callable],
                              triton_functions: Mapping[str, Callable],
                              triton_limits: Callable[[Problem], list[str]] = lambda problem: []) -> None:
    """The pair most op families register: the torch reference on CPU and CUDA in `dtypes` and float64
    (for gradcheck), and Triton kernels on CUDA in `dtypes`, both with a backward."""
    register(Implementation(
        op=op, backend="torch", devices=("cpu", "cuda"), dtypes=tuple(dtypes) + (torch.float64,), has_backward=True,
        functions=torch_functions,
    ))
    register(Implementation(
        op=op, backend="triton", devices=("cuda",), dtypes=tuple(dtypes), has_backward=True,
        functions=triton_functions, environment_reasons=triton_environment_reasons, limits=triton_limits,
    ))


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> dict[str, Implementation]:
    if op not in _REGISTRY:
        raise KeyError(f"no op {op!r} is registered; registered: {registered_ops()}")
    return _REGISTRY[op]


def forced_backend(backend: str | None = None) -> str | None:
    """The backend forced by the argument, else by PEFOPS_BACKEND, else None (automatic)."""
    name = backend if backend else os.environ.get(ENV_VARIABLE, "")
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKEND_ORDER:
        source = "backend=" if backend else f"{ENV_VARIABLE}="
        raise ValueError(f"{source}{name!r} is not a backend; expected one of {', '.join(BACKEND_ORDER)} or 'auto'")
    return name


_SELECTION_CACHE: dict[tuple, Implementation] = {}
_SELECTION_CACHE_SIZE = 4096


# Token counts change every call (sequence lengths, batch sizes): the memo keys them by power-of-two
# bucket above EXACT_TOKEN_LIMIT, so a training run fills a handful of entries, not one per length.
# Exact below it, where every limit on them lies (the CUDA decode kernels: at most 16 rows); a limit
# on a token count above it would have to be a bucket boundary (a power of two).
BUCKETED_SIZES = ("tokens", "rows")
EXACT_TOKEN_LIMIT = 64


def _size_key(name: str, value):
    if name in BUCKETED_SIZES and isinstance(value, int) and value > EXACT_TOKEN_LIMIT:
        return ("bucket", 1 << (value - 1).bit_length())
    return value


def select(op: str, problem: Problem, backend: str | None = None) -> Implementation:
    """The implementation that serves `problem`: the forced one, or the first free of reasons.
    Successful choices are memoised (the reasons checks cost more than a small op)."""
    forced = forced_backend(backend)
    key = (op, problem.device.type, problem.dtype, problem.mode,
           tuple(sorted((name, _size_key(name, value)) for name, value in problem.sizes.items())), forced,
           triton_interpreter_enabled())
    cached = _SELECTION_CACHE.get(key)
    if cached is not None:
        return cached
    implementation = _select_uncached(op, problem, forced)
    if len(_SELECTION_CACHE) >= _SELECTION_CACHE_SIZE:
        _SELECTION_CACHE.clear()
    _SELECTION_CACHE[key] = implementation
    return implementation


def eager_torch(op: str, problem: Problem, backend: str | None = None) -> bool:
    """True for an eager call (not traced by torch.compile, no backend forced by `backend=` or
    PEFOPS_BACKEND) that the torch backend serves. Ops run their differentiable reference directly under
    autograd then: the same ATen calls eager PyTorch makes, without the custom op's Python dispatch
    (tens of µs a call) or recomputation in backward. Compiled graphs and forced backends go through
    the custom op."""
    if forced_backend(backend) is not None or compiling():
        return False
    return select(op, problem).backend == "torch"


def clear_selection_cache() -> None:
    """Forget memoised choices, e.g. after registering an implementation."""
    _SELECTION_CACHE.clear()


def _select_uncached(op: str, problem: Problem, forced: str | None) -> Implementation:
    candidates = implementations(op)
    if forced is not None:
        implementation = candidates.get(forced)
        if implementation is None:
            raise BackendNotSupportedError(f"backend {forced!r} has no implementation of {op}")
        reasons = implementation.not_supported_reasons(problem, forced=True)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {forced!r} cannot run {op} {problem.mode} on {problem.device.type}/"
                f"{str(problem.dtype).removeprefix('torch.')}: " + "; ".join(reasons)
            )
        return implementation
    all_reasons = []
    for name in BACKEND_ORDER:
        implementation = candidates.get(name)
        if implementation is None:
            continue
        reasons = implementation.not_supported_reasons(problem)
        if not reasons:
            return implementation
        all_reasons.append(f"{name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(f"no backend can run {op} {problem.mode}: " + " | ".join(all_reasons))


def explain(op: str, problem: Problem) -> list[tuple[str, list[str]]]:
    """For each registered backend of `op`, in selection order, the reasons it cannot serve."""
    candidates = implementations(op)
    return [
        (name, candidates[name].not_supported_reasons(problem)) for name in BACKEND_ORDER if name in candidates
    ]


# ----------------------------------------------------------------------------- environment checks


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_cpu_reasons(forced: bool) -> list[str]:
    # The interpreter runs kernels on CPU tensors slowly, one program at a time: a test tool, so it
    # serves only calls that force backend="triton".
    if not triton_interpreter_enabled():
        return ["CPU tensors run on Triton only under TRITON_INTERPRET=1 (set before import)"]
    if not forced:
        return ["the Triton interpreter (TRITON_INTERPRET=1) serves CPU tensors only when backend='triton' is forced"]
    return []


@functools.lru_cache(maxsize=None)
def triton_environment_reasons() -> list[str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return [f"triton is not importable ({error}); install it with `pip install triton`"]
    return []


@functools.lru_cache(maxsize=None)
def import_kernels(module_name: str):
    """pefops.kernels.<module_name>, imported on first use so that import pefops never needs triton."""
    return importlib.import_module(f"pefops.kernels.{module_name}")


def cuda_extension_environment_reasons() -> list[str]:
    """Cheap reasons the CUDA extension cannot serve here (no build attempted)."""
    from pefops import csrc

    return csrc.unavailable_reasons()


def cuda_extension_load_reasons(symbol: str) -> list[str]:
    """Loads (building just-in-time on first use) the CUDA extension; a failed build or a missing
    function is a reason, not an error, so an automatic choice falls back."""
    from pefops import csrc

    try:
        module = csrc.load()
    except RuntimeError as error:
        return [f"the CUDA extension could not be built or loaded: {error}"]
    if not hasattr(module, symbol):
        return [f"the CUDA extension has no {symbol} (stale build?)"]
    return []


def compiling() -> bool:
    """True while torch.compile traces (custom ops must be used then, not eager shortcuts)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())
