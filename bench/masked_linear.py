"""Masked linear benchmark (mask tuning): y = x @ (W ⊙ M).T + b with a frozen weight W [N, K].

Providers (all share the same inputs, built once per configuration by ``setup_masked_linear``):

* ``eager``   -- PyTorch as a user writes mask tuning by hand: materialise W ⊙ M, then ``F.linear``.
  fwd (inference): ``F.linear(x, torch.where(mask, W, 0), b)`` with a bool mask [N, K];
  fwd+bwd (training): ``M = (S > threshold)`` and the straight-through trick
  ``F.linear(x, (W * (M + S - S.detach())).to(x.dtype), b)``, so dS = (dyᵀ x) ⊙ W.
* ``compile`` -- ``torch.compile`` of those eager functions (default mode, default automatic dynamic
  shapes; the runner raises dynamo's recompile limit). A compile failure skips the provider with
  its message.
* ``dense``   -- ``F.linear(x, W_eff, b)`` with the masked weight merged once at set-up: the same
  dense GEMM as an unmasked layer (cuBLAS / MKL do not skip zeros), so its time is the floor of
  ``F.linear(x, W, b)`` while its output still equals the masked layer's (the numerical check
  against eager stays meaningful). fwd only. A bare function call: no module in between.
* ``linear``  -- an ``nn.Linear`` module holding that merged weight and the bias, called as a module:
  the like-for-like floor of the ``frozen`` provider (both pay ``nn.Module.__call__`` and their
  parameter reads per call; ``dense`` pays neither). fwd only.
* ``pefops``  -- ``pefops.ops.masked_linear`` with the packed 1-bit mask (fwd) and
  ``pefops.ops.masked_linear_scores`` (fwd+bwd: gradients for x, scores and bias); whichever
  backend pefops selects, or the one forced by the config's ``backend``.
* ``copy``    -- ``dst.copy_(W)`` on an [N, K] tensor of W's dtype: the device copy bandwidth in the
  same run, the reference for the memory-bound decode rows ("% of copy GB/s").

Modes: ``fwd`` (inference under ``torch.no_grad()``), ``fwd+bwd`` (training: forward from the
scores, then ``torch.autograd.grad`` for x, scores and bias against a pre-allocated upstream
gradient). The weight is frozen (``requires_grad=False``) everywhere.

Byte counts are the compulsory traffic of one pass per operand, the same for every provider that
computes the op (GB/s is an effective bandwidth), e = element size of x / W, Kb = ceil(K / 8):

* fwd: read W (N·K·e) + read the bits (N·Kb) + read x (rows·K·e) + write y (rows·N·e);
  flops 2·rows·N·K.
* fwd+bwd: fwd + read the fp32 scores to pack the mask (N·K·4); backward: read dy (rows·N·e), read
  x (rows·K·e), read W (N·K·e) and the bits (N·Kb) once for both products, write dx (rows·K·e), write
  the fp32 dscores (N·K·4); flops 6·rows·N·K (forward, dx = dy (W ⊙ M), dS = dyᵀ x).
* dense (fwd): read W, x, write y (no bits); copy: read + write W (2·N·K·e).

The bias (N·e) and the bits written by packing (N·Kb) are neglected.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.interface import NotApplicable, OpBenchmark, ProviderUnavailable, Work
from bench.setup_helpers import (CompileGuard, backend_kwargs, backend_note, common_config, copy_call, measured_call,
                                 on_device, provider_module, required_ints)

OP = "masked_linear"
# frozen: pefops.nn.MaskedLinear after freeze (inference): W ⊙ M merged once per mask version and a
# dense F.linear at prefill sizes (every size on CPU), the fused decode kernel for <= 16 rows on a GPU
PROVIDERS = ("eager", "compile", "dense", "linear", "pefops", "frozen", "copy")
NOTES = {  # the providers' row notes that depend on nothing but the provider
    "compile": "torch.compile(eager function), default mode",
    "dense": "F.linear(x, W_eff, b), mask merged once: the dense GEMM floor",
    "linear": "nn.Linear module holding W_eff: the module-call floor",
    "copy": "dst.copy_(W), [N, K]",
}
# (out_features N, in_features K): LLaMA-7B's attention projections, MLP up/gate and MLP down
GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GPU_ROWS = (1, 8192, 16, 2048, 8)  # the decode and prefill headlines first (decode is the cheaper one to tune)
CPU_SHAPES = ((1024, 1024), (2048, 1024))
CPU_ROWS = (1, 16, 512, 2048)


# ------------------------------------------------------------------------------ eager (by hand)


def eager_masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Inference: W ⊙ M materialised from a bool mask, then a dense GEMM."""
    return F.linear(x, torch.where(mask, weight, 0), bias)


def eager_masked_linear_scores(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: float,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """Training: M = (S > threshold) with the straight-through estimator, dS = (dyᵀ x) ⊙ W.
    The product W * (M + S - S.detach()) is formed in the scores' (fp32) precision, then cast."""
    mask = (scores > threshold).to(scores.dtype)
    effective = weight * (mask + scores - scores.detach())
    return F.linear(x, effective.to(x.dtype), bias)


# ------------------------------------------------------------------------------ set-up


def _threshold_for(density: float) -> float:
    """The threshold t with P(S > t) = density for standard normal scores."""
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1); got {density}")
    return float(math.sqrt(2.0) * torch.erfinv(torch.tensor(1.0 - 2.0 * density, dtype=torch.float64)))


def _full_config(config: dict) -> dict:
    return {
        **required_ints(OP, config, ("rows", "out_features", "in_features")),
        "density": float(config.get("density", 0.5)),  # fraction of the weight kept by the mask
        "bias": bool(config.get("bias", True)),
        **common_config(config),
    }


class MaskedLinearSetup:
    """Weight, scores, mask (bool and packed), bias, input and upstream gradient for one
    configuration, shared by every provider."""

    def __init__(self, config: dict):
        self.config = c = _full_config(config)
        self.device, self.dtype = c["device"], c["dtype"]
        rows, N, K = c["rows"], c["out_features"], c["in_features"]
        self.shape: dict[str, Any] = {"rows": rows, "out_features": N, "in_features": K}
        if c["density"] != 0.5:
            self.shape["density"] = c["density"]
        if not c["bias"]:
            self.shape["bias"] = False
        self.threshold = _threshold_for(c["density"])

        # drawn on the device itself (an 11008 x 4096 fp32 draw on the host per config is slow)
        gen = torch.Generator(device=self.device).manual_seed(c["seed"])

        def randn(*shape, dtype=None, scale=1.0):
            t = torch.randn(*shape, generator=gen, device=self.device, dtype=torch.float32)
            return (t * scale).to(dtype or self.dtype)

        self.weight = randn(N, K, scale=K ** -0.5)  # frozen: requires_grad False
        self.scores = randn(N, K, dtype=torch.float32).requires_grad_(True)  # trained in fp32
        self.bias = randn(N, scale=0.1).requires_grad_(True) if c["bias"] else None
        self.x = randn(rows, K).requires_grad_(True)
        self.grad_out = randn(rows, N)
        with torch.no_grad():
            self.mask = self.scores > self.threshold  # bool [N, K]
            self.merged = torch.where(self.mask, self.weight, 0)  # W ⊙ M, for the dense floor
        self.packed = None  # built on first use by pefops (pack_mask), so a missing pefops only skips it
        self.grad_inputs = [self.x, self.scores] + ([self.bias] if self.bias is not None else [])
        self._compiled: dict[str, Callable] = {}
        self._compile_guard = CompileGuard()

    # ------------------------------------------------------------------ forwards per provider

    def _pefops(self):
        ops = provider_module("pefops.ops")
        if self.packed is None:
            self.packed = ops.pack_mask(self.mask)
        return ops.masked_linear, ops.masked_linear_scores

    def _forward_fn(self, provider: str, mode: str) -> Callable[[], torch.Tensor]:
        x, w, b = self.x, self.weight, self.bias
        mask, scores, threshold = self.mask, self.scores, self.threshold
        if provider == "dense":
            if mode != "fwd":
                raise NotApplicable
            merged = self.merged
            return lambda: F.linear(x, merged, b)
        if provider == "linear":
            if mode != "fwd":
                raise NotApplicable
            N, K = self.merged.shape
            linear = torch.nn.Linear(K, N, bias=b is not None, device=self.device, dtype=self.dtype)
            linear.requires_grad_(False)
            with torch.no_grad():
                linear.weight.copy_(self.merged)
                if b is not None:
                    linear.bias.copy_(b)
            return lambda: linear(x)
        if provider == "eager":
            if mode == "fwd":
                return lambda: eager_masked_linear(x, w, mask, b)
            return lambda: eager_masked_linear_scores(x, w, scores, threshold, b)
        if provider == "compile":
            if mode not in self._compiled:
                self._compiled[mode] = torch.compile(eager_masked_linear if mode == "fwd"
                                                     else eager_masked_linear_scores)
            compiled = self._compiled[mode]
            if mode == "fwd":
                return lambda: compiled(x, w, mask, b)
            return lambda: compiled(x, w, scores, threshold, b)
        if provider == "pefops":
            masked_linear, masked_linear_scores = self._pefops()
            kwargs = backend_kwargs(self.config["backend"])
            packed = self.packed
            if mode == "fwd":
                return lambda: masked_linear(x, w, packed, b, **kwargs)
            return lambda: masked_linear_scores(x, w, scores, threshold, b, **kwargs)
        if provider == "frozen":
            if mode != "fwd":
                raise NotApplicable
            self._pefops()
            from pefops.nn import MaskedLinear

            layer = MaskedLinear(w, None if b is None else b.detach())
            layer.set_mask(self.packed)
            layer.merged_weight()  # the one-time merge belongs to set-up, as the dense provider's
            return lambda: layer(x)
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if provider == "copy":
            return copy_call(self.weight, mode)
        if mode not in ("fwd", "fwd+bwd"):
            raise NotApplicable
        call = measured_call(self._forward_fn(provider, mode), mode, self.grad_inputs, self.grad_out)
        return self._compile_guard.checked(call) if provider == "compile" else call

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        rows, N, K = c["rows"], c["out_features"], c["in_features"]
        e = self.dtype.itemsize
        weight, bits = N * K * e, N * ((K + 7) // 8)
        x_bytes, y_bytes = rows * K * e, rows * N * e
        if provider == "copy":
            return Work(bytes=2 * weight)
        if provider in ("dense", "linear"):
            return Work(bytes=weight + x_bytes + y_bytes, flops=2 * rows * N * K)
        fwd_bytes = weight + bits + x_bytes + y_bytes
        if mode == "fwd":
            return Work(bytes=fwd_bytes, flops=2 * rows * N * K)
        scores = N * K * 4
        bwd_bytes = y_bytes + x_bytes + weight + bits + x_bytes + scores  # dy, x, W, bits, dx, dS
        return Work(bytes=fwd_bytes + scores + bwd_bytes, flops=6 * rows * N * K)

    def describe(self, provider: str, mode: str = "fwd") -> str | None:
        if provider == "eager":
            return ("F.linear(x, torch.where(mask, W, 0), b)" if mode == "fwd"
                    else "F.linear(x, W * (M + S - S.detach()), b), straight-through")
        if provider == "pefops":
            c = self.config
            sizes = {"rows": c["rows"], "out_features": c["out_features"], "in_features": c["in_features"],
                     "weight_contiguous": int(self.weight.is_contiguous())}
            note = backend_note(OP, self.device, self.dtype, mode, sizes, c["backend"])
            return note + (" (packed mask)" if mode == "fwd" else " (mask packed from scores per call)")
        return NOTES.get(provider)


def setup_masked_linear(config: dict) -> MaskedLinearSetup:
    """Build the inputs once for every provider. ``config``: rows, out_features, in_features, and
    optionally density (fraction kept, default 0.5), bias (default True), seed, backend, device, dtype."""
    return MaskedLinearSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """GPU: (N, K) in GPU_SHAPES x rows in GPU_ROWS, bf16, the headline (4096, 4096) decode and prefill
    rows first, then shape by shape (15 configurations; the runner's time budget cuts the tail);
    --quick on GPU: the (4096, 4096) headline rows. CPU: a small fp32 set (under a minute on one
    thread) unless --full."""
    if device.startswith("cuda"):
        shapes = GPU_SHAPES[:1] if quick else GPU_SHAPES
        rows = GPU_ROWS[:3] if quick else GPU_ROWS
    elif quick:
        shapes, rows = CPU_SHAPES, CPU_ROWS
    else:
        shapes, rows = CPU_SHAPES + ((4096, 4096),), CPU_ROWS
    return on_device(device, dtype, [{"rows": r, "out_features": n, "in_features": k} for n, k in shapes for r in rows])


# speed-ups against eager, GB/s and TFLOP/s of pefops, "% of copy GB/s" (OpBenchmark's defaults)
BENCHMARK = OpBenchmark(name=OP, configs=configs, setup=setup_masked_linear, providers=PROVIDERS,
                        shape_columns=(("rows", "rows"), ("out_features", "N"), ("in_features", "K")))
