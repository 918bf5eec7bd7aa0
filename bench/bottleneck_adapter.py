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

from bench.interface import NotApplicable, OpBenchmark, ProviderUnavailable, Work

OP = "bottleneck_adapter"
PROVIDERS = ("eager", "compile", "pefops", "copy")
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
    device = config.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.get("dtype") or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    return {
        "tokens": int(config["tokens"]),
        "hidden": int(config["hidden"]),
        "r": int(config["r"]),
        "layer_norm": bool(config.get("layer_norm", False)),
        "activation": config.get("activation", "relu"),
        "scaling": float(config.get("scaling", 1.0)),
        "residual": config.get("residual", "x"),  # "x" (residual is the input) or "separate"
        "eps": float(config.get("eps", 1e-5)),
        "seed": int(config.get("seed", 0)),
        "backend": config.get("backend"),  # forwarded to pefops as backend=
        "device": str(device),
        "dtype": dtype,
    }


class BottleneckAdapterSetup:
    """Inputs, weights and the eager module for one configuration, shared by every provider."""

    def __init__(self, config: dict):
        c = _full_config(config)
        if c["residual"] not in ("x", "separate"):
            raise ValueError(f"residual must be 'x' or 'separate', got {c['residual']!r}")
        self.config = c
        self.device = c["device"]
        self.dtype = c["dtype"]
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

        # the [T, H] tensors are drawn on the device itself: drawing 2 x 65536 x 4096 values on the
        # host for every configuration would cost more time than measuring it
        device_gen = torch.Generator(device=self.device).manual_seed(c["seed"] + 1)

        def randn(*shape):
            return torch.randn(*shape, generator=device_gen, device=self.device, dtype=self.dtype)

        self.x = randn(T, H).requires_grad_(True)
        self.residual = randn(T, H).requires_grad_(True) if c["residual"] == "separate" else None
        # The pre-allocated upstream gradient. Random rather than ones: with LayerNorm, dy = 1 gives
        # dx = 0 up to rounding, which would make the cross-provider gradient check meaningless.
        self.grad_out = randn(T, H)
        self.params = [p for p in self.module.parameters()]
        self.grad_inputs = [self.x] + ([self.residual] if self.residual is not None else []) + self.params
        self._compiled = None
        self._compile_error: str | None = None

    # ------------------------------------------------------------------ forwards per provider

    def _eager_forward(self) -> torch.Tensor:
        return self.module(self.x, self.residual)

    def _compiled_forward(self) -> torch.Tensor:
        if self._compiled is None:
            self._compiled = torch.compile(self.module)
        return self._compiled(self.x, self.residual)

    def _pefops_forward_fn(self) -> Callable[[], torch.Tensor]:
        try:
            from pefops.ops import bottleneck_adapter
        except Exception as error:  # noqa: BLE001 - any import failure means "cannot run here"
            raise ProviderUnavailable(
                f"pefops.ops.bottleneck_adapter is not importable ({type(error).__name__}: {error})") from None
        m = self.module
        down, up = m.adapter_down[0], m.adapter_up
        ln = m.adapter_norm_after
        layer_norm = (ln.weight, ln.bias, ln.eps) if ln is not None else None
        c = self.config
        kwargs = {"activation": c["activation"], "scaling": c["scaling"], "residual": self.residual,
                  "layer_norm": layer_norm}
        if c["backend"] is not None:
            kwargs["backend"] = c["backend"]
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
            if mode != "fwd":
                raise NotApplicable
            src = self.x.detach()
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)
        forward = self._forward_fn(provider)
        inputs, grad_out = self.grad_inputs, self.grad_out

        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return forward()
        elif mode == "fwd+bwd":
            def call():
                y = forward()
                return torch.autograd.grad(y, inputs, grad_out)
        elif mode == "bwd":
            # the graph the timed backward runs through, kept with retain_graph=True (the runner
            # turns off AOTAutograd's donated buffers when bwd is requested: they forbid it)
            y = self._trial(provider, forward)
            def call():
                return torch.autograd.grad(y, inputs, grad_out, retain_graph=True)
        else:
            raise NotApplicable
        if provider == "compile" and mode != "bwd":
            self._trial(provider, call)
        return call

    def _trial(self, provider: str, fn: Callable[[], Any]) -> Any:
        """Run once; a torch.compile failure becomes ProviderUnavailable (skipped with its message)."""
        if provider != "compile":
            return fn()
        if self._compile_error is not None:
            raise ProviderUnavailable(self._compile_error)
        try:
            return fn()
        except Exception as error:  # noqa: BLE001
            first = (str(error).strip().splitlines() or [""])[0][:300]
            self._compile_error = f"torch.compile failed: {type(error).__name__}: {first}"
            raise ProviderUnavailable(self._compile_error) from None

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        T, H, r = c["tokens"], c["hidden"], c["r"]
        e = torch.empty((), dtype=self.dtype).element_size()
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
        if provider == "compile":
            return "torch.compile(module), default mode"
        if provider == "copy":
            return "dst.copy_(x), [T, H]"
        if provider == "pefops":
            c = self.config
            names = []
            try:
                from pefops import backend as registry

                for step in (["forward"] if mode == "fwd" else ["forward", "backward"]):
                    problem = registry.Problem(torch.device(self.device), self.dtype, step,
                                               {"tokens": c["tokens"], "hidden": c["hidden"], "rank": c["r"]})
                    names.append(registry.select(OP, problem, c["backend"]).backend)
            except Exception:  # noqa: BLE001 - informational only
                return f"backend={c['backend'] or 'auto'}"
            return "backend=" + "/".join(dict.fromkeys(names))
        return None


def setup_bottleneck_adapter(config: dict) -> BottleneckAdapterSetup:
    """Build the inputs once for every provider. ``config``: tokens, hidden, r, and optionally
    layer_norm, activation, scaling, residual ("x" | "separate"), eps, seed, backend, device, dtype."""
    return BottleneckAdapterSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """The shapes to run. GPU: the full grid (tokens x hidden x r) in bf16 with the headline shape first
    (with and without LayerNorm); --quick on GPU: the headline pair and one small shape. CPU: a small
    fp32 set (a few minutes on 2 cores) unless the caller passes quick=False explicitly via --full."""
    cuda = device.startswith("cuda")
    base = {"device": device, "dtype": dtype or (torch.bfloat16 if cuda else torch.float32)}
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
    return [{**base, **s} for s in shapes]


BENCHMARK = OpBenchmark(
    name=OP,
    configs=configs,
    setup=setup_bottleneck_adapter,
    providers=PROVIDERS,
    modes=("fwd", "fwd+bwd"),
    baseline="eager",
    subject="pefops",
    bandwidth_reference="copy",
    shape_columns=(("tokens", "T"), ("hidden", "H"), ("r", "r"), ("layer_norm", "LN")),
)
