"""AdapterFusion benchmark: attention over N frozen bottleneck adapters' outputs at one site.

One fusion site (AdapterHub's BertFusion, "dynamic" preset): x [T, H] is the adapter input, query
[T, H] the sublayer output the fusion attends with, residual [T, H]; N frozen
``pefops.nn.BottleneckAdapter`` (rank r, ReLU) and one ``pefops.nn.AdapterFusion(H, "dynamic")``
(query, key and value projections; its weights randomised at set-up so that the softmax is neither
uniform nor one-hot and the value matrix is not the identity).

Providers (all share the same inputs, adapters and fusion layer, built once per configuration):

* ``eager``    -- AdapterHub's way: every adapter's ``up_projection(x)`` (s·up(act(down(x)))),
  ``torch.stack`` to [T, N, H], then ``pefops.ops.adapter_fusion_eager`` (the BertFusion formula:
  query projection, key and value projections of every adapter output: 2N + 1 H×H GEMMs, plus
  [T, N, H]-sized keys and values).
* ``compile``  -- ``torch.compile`` of that eager function (default mode; the runner raises dynamo's
  recompile limit). A compile failure skips the provider with its message.
* ``pefops``   -- ``fusion(x, query, residual, adapters)``: the module's fused algebra
  (``pefops.ops.adapter_fusion``: 3 H×H + 3 H×(N·r) GEMMs, no [T, N, H] tensor). The module stacks
  the N adapters' weights on every call (``stack_adapters``, under no_grad), which is timed with it.
* ``nofusion`` -- the same layer with ONE adapter and no fusion: ``adapters[0](x, residual)``
  (residual + s·up(act(down(x))), pefops' fused bottleneck adapter). The baseline of the overhead
  target: (pefops − nofusion) / (eager − nofusion) ≤ 1/3. It computes a different function, so its
  call returns its output inside a dict: the runner's numerical check against eager skips it.

Modes: ``fwd`` (under ``torch.no_grad()``), ``fwd+bwd`` (forward, then ``torch.autograd.grad``
against a pre-allocated random upstream gradient for x, query, residual and the fusion layer's
parameters but key.bias, whose gradient is identically zero; the adapters are frozen). nofusion's
fwd+bwd asks for x and residual only (the rest does not take part).

Counts (e = element size; R = N·r): the fused path's compulsory traffic and GEMM flops, the same
for eager, compile and pefops (GB/s and TFLOP/s are effective rates):
* fwd bytes: read x, query, residual, write out (4·T·H·e) + the weights (3·H² + 2·H fusion,
  N·(2·H·r + r + H) adapters); flops 2·T·H·H·3 + 2·T·H·R·3 (query, key, value; down, scores, mix).
* fwd+bwd: + read dy, x, query; write dx, dquery, dresidual (6·T·H·e) + read the weights again and
  write the fusion weights' grads (3·H² + 2·H); flops 18·T·H² + 12·T·H·R (backward: 6 H×H GEMMs,
  dx and the two products through U: 3 H×R GEMMs; no adapter weight grads).
* nofusion: fwd 3·T·H·e (x, residual, out) + adapter weights, 4·T·H·r flops; fwd+bwd adds dy read,
  x read, dx and dresidual written, 4·T·H·r more flops (dx only, weights frozen).
The [T, R] and [T, N] intermediates are neglected. The eager formula's own flop count is larger:
fwd 2·T·H²·(2N + 1) + 4·T·H·R (+ 4·T·N·H for scores and context), see bench/NOTES.md.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from bench.interface import NotApplicable, OpBenchmark, ProviderUnavailable, Work
from bench.setup_helpers import (CompileGuard, backend_note, common_config, device_randn, measured_call, on_device,
                                 required_ints)

OP = "adapter_fusion"
PROVIDERS = ("eager", "compile", "pefops", "nofusion")
NOTES = {"compile": "torch.compile(eager function), default mode",  # fixed row notes
         "nofusion": "adapters[0](x, residual): one adapter, no fusion (time floor)"}
HEADLINE = {"tokens": 16384, "hidden": 1024, "adapters": 8, "r": 64}


def eager_fusion(x: torch.Tensor, query: torch.Tensor, residual: torch.Tensor, adapters, fusion) -> torch.Tensor:
    """AdapterHub's order: every adapter's output, stacked to [T, N, H], then BertFusion."""
    from pefops.ops import adapter_fusion_eager

    ups = torch.stack([adapter.up_projection(x) for adapter in adapters], dim=-2)
    return adapter_fusion_eager(
        x, query, residual, ups,
        query_weight=fusion.query.weight, query_bias=fusion.query.bias,
        key_weight=fusion.key.weight, key_bias=fusion.key.bias, value_weight=fusion.value.weight,
        temperature=fusion.T, dropout_p=0.0, training=False, residual_before=fusion.config.residual_before,
        value_before_softmax=fusion.config.value_before_softmax,
    )


def _full_config(config: dict) -> dict:
    # no backend setting: the fusion module and its adapters take pefops' own choice
    return {**required_ints(OP, config, ("tokens", "hidden", "adapters")), "r": int(config.get("r", 64)),
            **common_config(config)}


class AdapterFusionSetup:
    """Inputs, N frozen adapters and the fusion layer for one configuration, shared by every provider."""

    def __init__(self, config: dict):
        try:
            from pefops.nn import AdapterFusion, BottleneckAdapter
        except Exception as error:  # noqa: BLE001 - nothing can run without the modules
            raise RuntimeError(f"pefops.nn.AdapterFusion is not importable ({type(error).__name__}: {error})") from None
        self.config = c = _full_config(config)
        self.device, self.dtype = c["device"], c["dtype"]
        T, H, N, r = c["tokens"], c["hidden"], c["adapters"], c["r"]
        self.shape = {"tokens": T, "hidden": H, "adapters": N, "r": r}

        gen = torch.Generator().manual_seed(c["seed"])

        def randn(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen) * scale

        adapters = []
        for _ in range(N):
            adapter = BottleneckAdapter(H, r, activation="relu")
            with torch.no_grad():
                # every adapter different and non-zero (AdapterHub's init has zero biases)
                adapter.down_proj.weight.copy_(randn(r, H, scale=H ** -0.5))
                adapter.down_proj.bias.copy_(randn(r, scale=0.1))
                adapter.up_proj.weight.copy_(randn(H, r, scale=r ** -0.5))
                adapter.up_proj.bias.copy_(randn(H, scale=0.1))
            adapters.append(adapter.requires_grad_(False).to(device=self.device, dtype=self.dtype).eval())
        self.adapters = adapters

        fusion = AdapterFusion(H, "dynamic")
        with torch.no_grad():
            # "dynamic" starts with W_v = I and tiny W_q, W_k (a uniform softmax over adapters):
            # randomise so the scores are O(1) (q ~ N(0, 1), k ~ N(0, ~2/H)·|up|) and W_v is not I
            fusion.query.weight.copy_(randn(H, H, scale=H ** -0.5))
            fusion.query.bias.copy_(randn(H, scale=0.02))
            fusion.key.weight.copy_(randn(H, H, scale=2.0 / H))
            fusion.key.bias.copy_(randn(H, scale=0.02))
            fusion.value.weight.add_(randn(H, H, scale=0.02))
        self.fusion = fusion.to(device=self.device, dtype=self.dtype).eval()

        randn_on_device = device_randn(self.device, self.dtype, c["seed"] + 1)
        self.x = randn_on_device(T, H).requires_grad_(True)
        self.query = randn_on_device(T, H).requires_grad_(True)
        self.residual = randn_on_device(T, H).requires_grad_(True)
        self.grad_out = randn_on_device(T, H)
        # key.bias is left out: q·b_k is added to every adapter's score alike and cancels in the
        # softmax, so its gradient is exactly zero and both paths return rounding noise (the
        # numerical check would compare noise with noise); its sum costs nothing either way
        self.fusion_params = [p for name, p in self.fusion.named_parameters()
                              if p.requires_grad and name != "key.bias"]
        self.grad_inputs = [self.x, self.query, self.residual] + self.fusion_params
        self._compiled = None
        self._compile_guard = CompileGuard()

    # ------------------------------------------------------------------ forwards per provider

    def _forward_fn(self, provider: str) -> Callable[[], Any]:
        x, query, residual = self.x, self.query, self.residual
        adapters, fusion = self.adapters, self.fusion
        if provider == "eager":
            return lambda: eager_fusion(x, query, residual, adapters, fusion)
        if provider == "compile":
            if self._compiled is None:
                def site(x, query, residual):
                    return eager_fusion(x, query, residual, adapters, fusion)

                self._compiled = torch.compile(site)
            compiled = self._compiled
            return lambda: compiled(x, query, residual)
        if provider == "pefops":
            return lambda: fusion(x, query, residual, adapters)
        if provider == "nofusion":
            adapter = adapters[0]
            return lambda: adapter(x, residual)
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if mode not in ("fwd", "fwd+bwd"):
            raise NotApplicable
        inputs = [self.x, self.residual] if provider == "nofusion" else self.grad_inputs
        call = measured_call(self._forward_fn(provider), mode, inputs, self.grad_out)
        if provider == "nofusion":
            # another function than eager's: a dict hides it from the runner's numerical check
            plain = call

            def call():  # noqa: F811
                return {"nofusion": plain()}
        return self._compile_guard.checked(call) if provider == "compile" else call

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        T, H, N, r = c["tokens"], c["hidden"], c["adapters"], c["r"]
        e = self.dtype.itemsize
        one_adapter = (2 * H * r + r + H) * e
        if provider == "nofusion":
            fwd_bytes = 3 * T * H * e + one_adapter
            if mode == "fwd":
                return Work(bytes=fwd_bytes, flops=4 * T * H * r)
            return Work(bytes=fwd_bytes + 4 * T * H * e + one_adapter, flops=8 * T * H * r)
        R = N * r
        fusion_weights = (3 * H * H + 2 * H) * e
        weights = fusion_weights + N * one_adapter
        fwd_bytes = 4 * T * H * e + weights
        fwd_flops = 6 * T * H * H + 6 * T * H * R
        if mode == "fwd":
            return Work(bytes=fwd_bytes, flops=fwd_flops)
        bwd_bytes = 6 * T * H * e + weights + fusion_weights
        return Work(bytes=fwd_bytes + bwd_bytes, flops=18 * T * H * H + 12 * T * H * R)

    def describe(self, provider: str, mode: str = "fwd") -> str | None:
        N = self.config["adapters"]
        if provider == "eager":
            return f"{N} x up_projection, stack [T, {N}, H], adapter_fusion_eager ({2 * N + 1} H×H GEMMs)"
        if provider == "pefops":
            c = self.config
            # the fused algebra's backend: what the forward selects
            note = backend_note(OP, self.device, self.dtype, "fwd",
                                {"tokens": c["tokens"], "hidden": c["hidden"], "adapters": N}, None)
            try:  # the scores / softmax / weighting step, where pefops has it as its own op
                importlib.import_module("pefops.ops.fusion_mix")  # registers the op
            except Exception:  # noqa: BLE001 - informational only
                pass
            else:
                mix = backend_note("fusion_mix", self.device, self.dtype, mode, {"units": N * c["r"], "adapters": N},
                                   None)
                note += ", fusion_mix=" + mix.removeprefix("backend=")
            return f"AdapterFusion module, fused algebra, {note} (adapters stacked per call)"
        return NOTES.get(provider)


def setup_adapter_fusion(config: dict) -> AdapterFusionSetup:
    """Build the inputs once for every provider. ``config``: tokens, hidden, adapters (N), and
    optionally r (default 64), seed, device, dtype."""
    return AdapterFusionSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """GPU: tokens 16384, r 64, bf16; the headline (N 8, H 1024) first, then the N sweep at H 1024,
    then H 4096 and 768 (the runner's time budget cuts the tail; every new N or H is a new
    torch.compile graph); --quick on GPU: the headline and N 16 at H 1024. CPU quick: N 2 and 8 at
    H 256, tokens 512 and 2048, and N 8 at H 768, tokens 512, fp32 (about a minute on one thread);
    CPU --full: H 512 and N 2/4/8 at tokens 2048 and 8192."""
    if device.startswith("cuda"):
        order = [(8, 1024), (2, 1024), (16, 1024), (8, 4096), (2, 4096), (8, 768), (4, 1024), (16, 4096),
                 (2, 768), (4, 768), (16, 768), (4, 4096)]
        if quick:
            order = order[:1] + [(16, 1024)]
        shapes = [{"tokens": 16384, "hidden": h, "adapters": n, "r": 64} for n, h in order]
    elif quick:
        shapes = [{"tokens": t, "hidden": 256, "adapters": n, "r": 64} for n in (2, 8) for t in (512, 2048)]
        # one wider layer: the fused algebra's saving grows with H / (N·r) (see bench/NOTES.md)
        shapes += [{"tokens": 512, "hidden": 768, "adapters": 8, "r": 64}]
    else:
        shapes = [{"tokens": t, "hidden": 512, "adapters": n, "r": 64} for n in (2, 4, 8) for t in (2048, 8192)]
    return on_device(device, dtype, shapes)


# speed-ups against eager, GB/s and TFLOP/s of pefops (OpBenchmark's defaults); no copy reference
BENCHMARK = OpBenchmark(name=OP, configs=configs, setup=setup_adapter_fusion, providers=PROVIDERS,
                        bandwidth_reference=None,
                        shape_columns=(("tokens", "T"), ("hidden", "H"), ("adapters", "N"), ("r", "r")))
