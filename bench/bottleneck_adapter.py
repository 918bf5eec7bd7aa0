"""Bottleneck adapter benchmark: y = residual + scaling * (act(x Wd^T + bd) Wu^T + bu) (-> LayerNorm).

Providers (all share the same inputs and weights, built once per configuration):

* ``eager``   -- PyTorch as AdapterHub writes it (adapters/methods/modeling.py, ``Adapter``):
  ``nn.Sequential(nn.Linear(H, r), act)`` -> ``nn.Linear(r, H)`` -> ``* scaling`` -> ``+ residual``
  -> ``nn.LayerNorm`` when the case has LN. Six to seven kernels, each a full pass over [T, H].
* ``compile`` -- ``torch.compile`` of that eager module (default mode, default automatic dynamic
  shapes; dynamo's recompile limit is raised by the runner so no shape falls back to eager).
  If compilation fails the provider is skipped with the error message.
* ``pefops``  -- ``pefops.ops.bottleneck_adapter`` (whichever backend pefops selects, or the one
  forced by the config's ``backend``).
* ``copy``    -- ``y.copy_(x)`` on a [T, H] tensor of the same dtype: the device-to-device copy
  bandwidth measured in the same run, the floor a memory-bound fused kernel is compared against.

Modes: ``fwd`` (forward under ``torch.no_grad()``), ``fwd+bwd`` (forward, then
``torch.autograd.grad`` of the output against a pre-allocated upstream gradient, for x and every
adapter parameter), ``bwd`` (backward only, the graph kept with ``retain_graph=True``).

Byte counts are the compulsory traffic of a fused implementation, so GB/s is an "effective"
bandwidth comparable across providers: fwd reads x (and a separate residual), writes y, reads the
weights; bwd reads dy and x, writes dx (and d residual), reads the weights and writes their grads.
[T, r] intermediates and LayerNorm statistics are neglected. Flops: 4*T*H*r forward (two GEMMs),
8*T*H*r backward (dx: two GEMMs, dWd and dWu: two GEMMs), 12*T*H*r for fwd+bwd.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import nn

from bench.interface import OpBenchmark, ProviderUnavailable, Work
from bench.setup_helpers import (CompileGuard, backend_kwargs, backend_note, common_config, copy_call, device_randn,
                                 measured_call, on_device, provider_module, required_ints)

OP = "bottleneck_adapter"
PROVIDERS = ("eager", "compile", "pefops", "copy")
NOTES = {"compile": "torch.compile(module), default mode", "copy": "dst.copy_(x), [T, H]"}  # fixed row notes
HEADLINE = {"tokens": 16384, "hidden": 4096, "r": 64}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


class EagerBottleneckAdapter(nn.Module):
    """The adapter the way AdapterHub's ``Adapter`` module computes it (no dropout, no gating)."""

    def __init__(self, hidden: int, r: int, activation: str = "relu", scaling: float = 1.0,
                 layer_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, r), ACTIVATIONS[activation]())
        self.adapter_up = nn.Linear(r, hidden)
        self.scaling = scaling
        self.adapter_norm_after = nn.LayerNorm(hidden, eps=eps) if layer_norm else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if residual is None else residual
        down = self.adapter_down(x)
        up = self.adapter_up(down)
        output = up * self.scaling
        output = output + residual
        if self.adapter_norm_after is not None:
            output = self.adapter_norm_after(output)
        return output


def _full_config(config: dict) -> dict:
    return {
        **required_ints(OP, config, ("tokens", "hidden", "r")),
        "layer_norm": bool(config.get("layer_norm", False)),
        "activation": config.get("activation", "relu"),
        "scaling": float(config.get("scaling", 1.0)),
        "residual": config.get("residual", "x"),  # "x" (residual is the input) or "separate"
        "eps": float(config.get("eps", 1e-5)),
        **common_config(config),
    }


class BottleneckAdapterSetup:
    """Inputs, weights and the eager module for one configuration, shared by every provider."""

    def __init__(self, config: dict):
        c = _full_config(config)
        if c["residual"] not in ("x", "separate"):
            raise ValueError(f"residual must be 'x' or 'separate', got {c['residual']!r}")
        self.config = c
        self.device, self.dtype = c["device"], c["dtype"]
        T, H, r = c["tokens"], c["hidden"], c["r"]
        self.shape = {"tokens": T, "hidden": H, "r": r, "layer_norm": c["layer_norm"]}
        if c["activation"] != "relu":
            self.shape["activation"] = c["activation"]
        if c["scaling"] != 1.0:
            self.shape["scaling"] = c["scaling"]
        if c["residual"] != "x":
            self.shape["residual"] = c["residual"]

        gen = torch.Generator().manual_seed(c["seed"])
        module = EagerBottleneckAdapter(H, r, c["activation"], c["scaling"], c["layer_norm"], c["eps"])
        with torch.no_grad():
            # Non-zero everywhere (AdapterHub initialises up to zero; that would make the numerical
            # checks between providers vacuous, and it changes no timing).
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p.shape[-1], 1) ** 0.5))
            if module.adapter_norm_after is not None:
                module.adapter_norm_after.weight.add_(1.0)
        self.module = module.to(device=self.device, dtype=self.dtype)

        randn = device_randn(self.device, self.dtype, c["seed"] + 1)
        self.x = randn(T, H).requires_grad_(True)
        self.residual = randn(T, H).requires_grad_(True) if c["residual"] == "separate" else None
        # The pre-allocated upstream gradient. Random rather than ones: with LayerNorm, dy = 1 gives
        # dx = 0 up to rounding, which would make the cross-provider gradient check meaningless.
        self.grad_out = randn(T, H)
        self.params = [p for p in self.module.parameters()]
        self.grad_inputs = [self.x] + ([self.residual] if self.residual is not None else []) + self.params
        self._compiled = None
        self._compile_guard = CompileGuard()

    # ------------------------------------------------------------------ forwards per provider

    def _eager_forward(self) -> torch.Tensor:
        return self.module(self.x, self.residual)

    def _compiled_forward(self) -> torch.Tensor:
        if self._compiled is None:
            self._compiled = torch.compile(self.module)
        return self._compiled(self.x, self.residual)

    def _pefops_forward_fn(self) -> Callable[[], torch.Tensor]:
        bottleneck_adapter = provider_module("pefops.ops").bottleneck_adapter
        m = self.module
        down, up = m.adapter_down[0], m.adapter_up
        ln = m.adapter_norm_after
        layer_norm = (ln.weight, ln.bias, ln.eps) if ln is not None else None
        c = self.config
        kwargs = {"activation": c["activation"], "scaling": c["scaling"], "residual": self.residual,
                  "layer_norm": layer_norm, **backend_kwargs(c["backend"])}
        x = self.x

        def forward() -> torch.Tensor:
            return bottleneck_adapter(x, down.weight, down.bias, up.weight, up.bias, **kwargs)

        return forward

    def _forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        if provider == "eager":
            return self._eager_forward
        if provider == "compile":
            return self._compiled_forward
        if provider == "pefops":
            return self._pefops_forward_fn()
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if provider == "copy":
            return copy_call(self.x, mode)
        forward = self._forward_fn(provider)
        if mode == "bwd":
            # the graph the timed backward runs through, kept with retain_graph=True (the runner
            # turns off AOTAutograd's donated buffers when bwd is requested: they forbid it)
            y = self._compile_guard.trial(forward) if provider == "compile" else forward()
            inputs, grad_out = self.grad_inputs, self.grad_out

            def call():
                return torch.autograd.grad(y, inputs, grad_out, retain_graph=True)
            return call
        call = measured_call(forward, mode, self.grad_inputs, self.grad_out)
        return self._compile_guard.checked(call) if provider == "compile" else call

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        T, H, r = c["tokens"], c["hidden"], c["r"]
        e = self.dtype.itemsize
        if provider == "copy":
            return Work(bytes=2 * T * H * e)
        sep = 1 if c["residual"] == "separate" else 0
        weights = (2 * H * r + r + H + (2 * H if c["layer_norm"] else 0)) * e
        fwd_bytes = (2 + sep) * T * H * e + weights
        bwd_bytes = (3 + sep) * T * H * e + 2 * weights
        if mode == "fwd":
            return Work(bytes=fwd_bytes, flops=4 * T * H * r)
        if mode == "bwd":
            return Work(bytes=bwd_bytes, flops=8 * T * H * r)
        return Work(bytes=fwd_bytes + bwd_bytes, flops=12 * T * H * r)

    def describe(self, provider: str, mode: str = "fwd") -> str | None:
        if provider == "pefops":
            c = self.config
            sizes = {"tokens": c["tokens"], "hidden": c["hidden"], "rank": c["r"]}
            return backend_note(OP, self.device, self.dtype, mode, sizes, c["backend"])
        return NOTES.get(provider)


def setup_bottleneck_adapter(config: dict) -> BottleneckAdapterSetup:
    """Build the inputs once for every provider. ``config``: tokens, hidden, r, and optionally
    layer_norm, activation, scaling, residual ("x" | "separate"), eps, seed, backend, device, dtype."""
    return BottleneckAdapterSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """The shapes to run. GPU: the full grid (tokens x hidden x r) in bf16 with the headline shape first
    (with and without LayerNorm); --quick on GPU: the headline pair and one small shape. CPU: a small
    fp32 set (a few minutes on 2 cores) unless the caller passes quick=False explicitly via --full."""
    cuda = device.startswith("cuda")
    headline = [{**HEADLINE, "layer_norm": False}, {**HEADLINE, "layer_norm": True}]
    if cuda and quick:
        shapes = headline + [{"tokens": 4096, "hidden": 768, "r": 16}]
    elif cuda:
        grid = [{"tokens": t, "hidden": h, "r": r}
                for h, r, t in itertools.product((768, 1024, 4096), (16, 64, 256), (4096, 16384, 65536))]
        shapes = headline + [s for s in grid if s != HEADLINE]
    elif quick:
        shapes = [{"tokens": t, "hidden": 768, "r": r} for r in (16, 64) for t in (512, 2048)]
        shapes += [{"tokens": 2048, "hidden": 768, "r": 64, "layer_norm": True}]
    else:
        shapes = [{"tokens": t, "hidden": h, "r": r}
                  for h, r, t in itertools.product((768, 1024), (16, 64), (2048, 8192))]
        shapes += [{"tokens": 8192, "hidden": 1024, "r": 64, "layer_norm": True}]
    return on_device(device, dtype, shapes)


# speed-ups against eager, GB/s and TFLOP/s of pefops, "% of copy GB/s" (OpBenchmark's defaults)
BENCHMARK = OpBenchmark(name=OP, configs=configs, setup=setup_bottleneck_adapter, providers=PROVIDERS,
                        shape_columns=(("tokens", "T"), ("hidden", "H"), ("r", "r"), ("layer_norm", "LN")))
