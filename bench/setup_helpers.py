"""What the op families' set-up objects share (bench/interface.py says what a set-up provides):
configuration defaults, the inputs drawn on the device, the measured call of each mode, the
``copy`` bandwidth provider, torch.compile failures, importing what a provider needs, and the note
naming the backend pefops selects."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, Sequence

import torch

from bench.interface import NotApplicable, ProviderUnavailable


def default_dtype(device: str, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype`, or the benchmarks' default: bfloat16 on a GPU, float32 on the CPU."""
    return dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def on_device(device: str, dtype: torch.dtype | None, shapes: Sequence[dict]) -> list[dict]:
    """The configurations of `configs(device, dtype, quick)`: every shape with the device and dtype."""
    base = {"device": device, "dtype": default_dtype(device, dtype)}
    return [{**base, **shape} for shape in shapes]


def required_ints(op: str, config: dict, names: Sequence[str]) -> dict[str, int]:
    """The sizes a configuration must give, as ints; a clear error naming what is missing."""
    missing = [name for name in names if name not in config]
    if missing:
        raise ValueError(f"{op} configuration {config} lacks {', '.join(missing)}; "
                         f"expected every one of {', '.join(names)}")
    return {name: int(config[name]) for name in names}


def common_config(config: dict) -> dict:
    """The settings every family's configuration shares: seed (default 0), backend (forwarded to
    pefops as backend=; default None, pefops' own choice), device (default cuda when available) and
    dtype (default_dtype)."""
    device = str(config.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    return {"seed": int(config.get("seed", 0)), "backend": config.get("backend"), "device": device,
            "dtype": default_dtype(device, config.get("dtype"))}


def backend_kwargs(backend: str | None) -> dict:
    """backend= for a pefops op when the configuration forces one (else pefops selects)."""
    return {} if backend is None else {"backend": backend}


def device_randn(device: str, dtype: torch.dtype, seed: int) -> Callable[..., torch.Tensor]:
    """randn(*shape) drawn on the device itself, from one generator seeded with `seed`: drawing the
    [tokens, hidden] tensors on the host for every configuration would take longer than measuring."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    return randn


def measured_call(forward: Callable[[], Any], mode: str, inputs: Sequence[torch.Tensor],
                  grad_out: torch.Tensor) -> Callable[[], Any]:
    """One measured call of `forward`: ``fwd`` runs it under ``torch.no_grad()``; ``fwd+bwd`` runs it
    and then ``torch.autograd.grad`` for `inputs` against the pre-allocated upstream `grad_out`.
    Any other mode: NotApplicable."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return forward()
    elif mode == "fwd+bwd":
        def call():
            return torch.autograd.grad(forward(), inputs, grad_out)
    else:
        raise NotApplicable
    return call


def copy_call(source: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """The ``copy`` provider: ``dst.copy_(source)``, the device's copy bandwidth in the same run (the
    "% of copy GB/s" column). fwd only."""
    if mode != "fwd":
        raise NotApplicable
    src = source.detach()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


class CompileGuard:
    """The ``compile`` provider's first torch.compile failure in one set-up: that call and every later
    one raise ProviderUnavailable with its message (skipped, not compiled again)."""

    def __init__(self):
        self.error: str | None = None

    def trial(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` once (it compiles); a failure becomes ProviderUnavailable."""
        if self.error is not None:
            raise ProviderUnavailable(self.error)
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - any compile failure skips the provider
            first = (str(error).strip().splitlines() or [""])[0][:300]
            self.error = f"torch.compile failed: {type(error).__name__}: {first}"
            raise ProviderUnavailable(self.error) from None

    def checked(self, call: Callable[[], Any]) -> Callable[[], Any]:
        """`call` after one trial run (which compiles it): the measured call of the compile provider."""
        self.trial(call)
        return call


def provider_module(name: str) -> ModuleType:
    """The module a provider needs (``pefops.ops``, transformers' Reformer), or ProviderUnavailable
    saying why it cannot be imported: any import failure means "cannot run here"."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001
        raise ProviderUnavailable(f"{name} is not importable ({type(error).__name__}: {error})") from None


def backend_note(op: str, device: str, dtype: torch.dtype, mode: str, sizes: dict, backend: str | None) -> str:
    """"backend=triton/torch": what pefops' registry selects for the forward (and, unless `mode` is
    fwd, the backward) of `op` at these sizes; "backend=<forced or auto>" where it cannot say."""
    try:
        from pefops import backend as registry

        names = []
        for step in (["forward"] if mode == "fwd" else ["forward", "backward"]):
            problem = registry.Problem(torch.device(device), dtype, step, sizes)
            names.append(registry.select(op, problem, backend).backend)
    except Exception:  # noqa: BLE001 - informational only
        return f"backend={backend or 'auto'}"
    return "backend=" + "/".join(dict.fromkeys(names))
