"""Mixed-task batch benchmark: every sequence of a batch goes through its own bottleneck adapter.

N adapters of one shape, stacked: down_weight [N, r, H], down_bias [N, r], up_weight [N, H, r],
up_bias [N, H]; x [B, T, H] and adapter_index [B] (which adapter each sequence uses). For a
sequence of adapter i: y = x + s·(act(x Wd_iᵀ + bd_i) Wu_iᵀ + bu_i) (ReLU, s = 1).

Providers (all share the same inputs and stacked weights, built once per configuration):

* ``loop``   -- what PEFT's mixed-batch forward (``LoraLayer._mixed_batch_forward``) does: the
  adapter of every sequence is a host-side list (PEFT's ``adapter_names``); for each adapter present
  it collects that adapter's sequence indices (a Python list), selects those rows
  (``x[indices]``), runs the adapter (``F.linear`` → ReLU → ``F.linear`` → ``* scaling``, the
  adapter's slices of the stacked weights) and adds the result back into a copy of the base output
  (``out[indices] += delta``; here the base output is the residual x). One pass over the batch and
  ~6 launches per adapter present.
* ``pefops`` -- ``pefops.ops.multi_adapter(x, adapter_index, down_weight, down_bias, up_weight,
  up_bias)`` (whichever backend pefops selects, or the config's ``backend``). Skipped with a
  message when it is not importable.
* ``copy``   -- ``dst.copy_(x)`` on [B, T, H]: the device copy bandwidth of the same run (the
  "% of copy GB/s" column; the op is memory-bound at r ≤ 64).

Modes: ``fwd`` (under ``torch.no_grad()``), ``fwd+bwd`` (forward, then ``torch.autograd.grad``
against a pre-allocated random upstream gradient for x and the four stacked weight tensors).

Counts (rows = B·T, e = element size, W = N·(2·H·r + r + H)·e the stacked weights): the compulsory
traffic of a fused implementation, the same for both providers (effective GB/s): fwd reads x,
writes y (2·rows·H·e) + W; fwd+bwd adds read dy, read x, write dx (3·rows·H·e) + read W + write
the weight grads (W). Flops: 4·rows·H·r forward, 12·rows·H·r fwd+bwd (dx, dWd, dWu). The [rows, r]
intermediates are neglected.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.interface import NotApplicable, OpBenchmark, ProviderUnavailable, Work
from bench.setup_helpers import (backend_kwargs, backend_note, common_config, copy_call, device_randn, measured_call,
                                 on_device, provider_module, required_ints)

OP = "multi_adapter"
PROVIDERS = ("loop", "pefops", "copy")
HEADLINE = {"batch": 64, "seq": 512, "hidden": 4096, "r": 64, "adapters": 16}


def loop_multi_adapter(x: torch.Tensor, adapter_names: list[int], down_weight: torch.Tensor,
                       down_bias: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor,
                       scaling: float = 1.0) -> torch.Tensor:
    """PEFT's mixed-batch loop: per adapter present, select its sequences, run it, add it back."""
    result = x.clone()  # the base output (here: the residual)
    unique = sorted(set(adapter_names))
    indices = [[i for i, name in enumerate(adapter_names) if name == adapter] for adapter in unique]
    for adapter, sub_batch_indices in zip(unique, indices):
        sub_batch = x[sub_batch_indices]
        hidden = torch.relu(F.linear(sub_batch, down_weight[adapter], down_bias[adapter]))
        result[sub_batch_indices] += F.linear(hidden, up_weight[adapter], up_bias[adapter]) * scaling
    return result


def _full_config(config: dict) -> dict:
    return {**required_ints(OP, config, ("batch", "seq", "hidden", "r", "adapters")), **common_config(config)}


class MultiAdapterSetup:
    """Inputs, stacked weights and the adapter assignment for one configuration."""

    def __init__(self, config: dict):
        self.config = c = _full_config(config)
        self.device, self.dtype = c["device"], c["dtype"]
        B, T, H, r, N = c["batch"], c["seq"], c["hidden"], c["r"], c["adapters"]
        self.shape = {"batch": B, "seq": T, "hidden": H, "r": r, "adapters": N}

        gen = torch.Generator().manual_seed(c["seed"])
        # a balanced random assignment: every adapter serves B / N sequences (when N divides B),
        # in a shuffled order, so no provider sees contiguous runs of one adapter
        names = (torch.randperm(B, generator=gen) % N).tolist()
        self.adapter_names = names  # host list, as PEFT receives adapter_names
        self.adapter_index = torch.tensor(names, dtype=torch.long, device=self.device)

        def weight(*shape, scale):
            t = torch.randn(*shape, generator=gen) * scale
            return t.to(device=self.device, dtype=self.dtype).requires_grad_(True)

        # non-zero everywhere, so the cross-provider check compares real values
        self.down_weight = weight(N, r, H, scale=H ** -0.5)
        self.down_bias = weight(N, r, scale=0.1)
        self.up_weight = weight(N, H, r, scale=r ** -0.5)
        self.up_bias = weight(N, H, scale=0.1)
        self.weights = [self.down_weight, self.down_bias, self.up_weight, self.up_bias]

        randn = device_randn(self.device, self.dtype, c["seed"] + 1)
        self.x = randn(B, T, H).requires_grad_(True)
        self.grad_out = randn(B, T, H)
        self.grad_inputs = [self.x] + self.weights

    # ------------------------------------------------------------------ forwards per provider

    def _forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        x, names = self.x, self.adapter_names
        dw, db, uw, ub = self.weights
        if provider == "loop":
            return lambda: loop_multi_adapter(x, names, dw, db, uw, ub)
        if provider == "pefops":
            multi_adapter = provider_module("pefops.ops").multi_adapter
            index = self.adapter_index
            kwargs = backend_kwargs(self.config["backend"])
            return lambda: multi_adapter(x, index, dw, db, uw, ub, **kwargs)
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if provider == "copy":
            return copy_call(self.x, mode)
        if mode not in ("fwd", "fwd+bwd"):
            raise NotApplicable
        return measured_call(self._forward_fn(provider), mode, self.grad_inputs, self.grad_out)

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        rows, H, r, N = c["batch"] * c["seq"], c["hidden"], c["r"], c["adapters"]
        e = self.dtype.itemsize
        if provider == "copy":
            return Work(bytes=2 * rows * H * e)
        weights = N * (2 * H * r + r + H) * e
        fwd_bytes = 2 * rows * H * e + weights
        if mode == "fwd":
            return Work(bytes=fwd_bytes, flops=4 * rows * H * r)
        return Work(bytes=fwd_bytes + 3 * rows * H * e + 2 * weights, flops=12 * rows * H * r)

    def describe(self, provider: str, mode: str = "fwd") -> str | None:
        present = len(set(self.adapter_names))
        if provider == "loop":
            return f"PEFT-style loop over {present} adapters present (select, adapter, out[idx] += delta)"
        if provider == "copy":
            return "dst.copy_(x), [B, T, H]"
        if provider == "pefops":
            c = self.config
            sizes = {"tokens": c["batch"] * c["seq"], "hidden": c["hidden"], "rank": c["r"], "adapters": c["adapters"]}
            return backend_note(OP, self.device, self.dtype, mode, sizes, c["backend"])
        return None


def setup_multi_adapter(config: dict) -> MultiAdapterSetup:
    """Build the inputs once for every provider. ``config``: batch, seq, hidden, r, adapters, and
    optionally seed, backend, device, dtype."""
    return MultiAdapterSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """GPU: 16 adapters, batch 64 × 512 tokens, r 64, bf16, H 4096 (the headline) then H 1024.
    CPU quick: 8 adapters, batch 16 × 64 tokens, H 256, r 16, fp32 (and the same at 256 tokens);
    CPU --full: adds H 768, r 64."""
    if device.startswith("cuda"):
        shapes = [HEADLINE] if quick else [HEADLINE, {**HEADLINE, "hidden": 1024}]
    else:
        small = {"batch": 16, "seq": 64, "hidden": 256, "r": 16, "adapters": 8}
        shapes = [small, {**small, "seq": 256}]
        if not quick:
            shapes += [{"batch": 16, "seq": 256, "hidden": 768, "r": 64, "adapters": 8}]
    return on_device(device, dtype, shapes)


# fwd and fwd+bwd, GB/s and TFLOP/s of pefops, "% of copy GB/s" (OpBenchmark's defaults)
BENCHMARK = OpBenchmark(name=OP, configs=configs, setup=setup_multi_adapter, providers=PROVIDERS, baseline="loop",
                        shape_columns=(("batch", "B"), ("seq", "T"), ("hidden", "H"), ("r", "r"), ("adapters", "N")))
