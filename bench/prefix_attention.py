"""Prefix-attention benchmark: attention over learned prefix keys/values and the sequence.

q [B, Hq, S, D], k / v [B, Hkv, S, D], prefix_k / prefix_v [Hkv, P, D] (one prefix shared by the
batch, as prefix-tuning learns it). Causal (decoder) by default: every prefix slot visible to every
query, the sequence bottom-right causal; optionally key padding (the last quarter of the keys of
every other row hidden).

Providers (all share the same inputs, built once per configuration):

* ``concat_sdpa`` -- what PEFT's prefix-tuning costs: the prefix enters as a fake KV cache, so each
  call expands it over the batch and concatenates it in front of K and V ([B, Hkv, P + S, D]), builds
  the [B or 1, 1, S, P + S] bool mask (prefix columns visible, causal shifted by P, padding), and runs
  ``F.scaled_dot_product_attention`` on the concatenation (``enable_gqa`` when Hkv < Hq). The
  explicit mask keeps SDPA off its flash kernel, as in transformers with a prefix cache.
* ``pefops`` -- ``pefops.ops.prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=padding,
  causal=...)`` (whichever backend pefops selects, or the config's ``backend``): no concatenation,
  no expansion, no [S, P + S] mask in memory.

Modes: ``fwd`` (under ``torch.no_grad()``), ``fwd+bwd`` (forward, then ``torch.autograd.grad``
against a pre-allocated random upstream gradient for q, k, v, prefix_k and prefix_v).

Counts (e = element size; pairs = the visible (query, key) pairs of all heads and rows:
B·Hq·(S·P + S(S+1)/2) causal, B·Hq·S·(P + S) otherwise; padding not subtracted). The same for both
providers. Flops: 2·pairs·(D + Dv) forward, 3.5× that fwd+bwd (the backward's useful products
QKᵀ, dV, dP, dQ, dK: 2·pairs·(3D + 2Dv)), FlashAttention's convention. Bytes: the compulsory
traffic of a fused implementation: fwd reads q, k, v, the prefix (and the [B, S] padding mask),
writes out and the fp32 row lse; fwd+bwd adds reading q, k, v, prefix, out, dout, lse and writing
dq, dk, dv, dprefix.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.interface import NotApplicable, OpBenchmark, ProviderUnavailable, Work
from bench.setup_helpers import (backend_kwargs, backend_note, common_config, device_randn, measured_call, on_device,
                                 provider_module, required_ints)

OP = "prefix_attention"
PROVIDERS = ("concat_sdpa", "pefops")
HEADLINE = {"batch": 16, "heads": 16, "kv_heads": 16, "seq": 2048, "prefix": 200, "head_dim": 64}


def concat_sdpa(q, k, v, prefix_k, prefix_v, causal: bool, key_padding: torch.Tensor | None) -> torch.Tensor:
    """PEFT's path: the prefix as a KV cache in front of the sequence, concatenated and expanded
    over the batch each call, with the mask transformers builds for it (prefix columns visible,
    causal bottom-right over P + S keys, padding), then SDPA."""
    batch, q_heads, seq = q.shape[:3]
    prefix = prefix_k.shape[1]
    keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    total = prefix + k.shape[2]
    mask = None
    if causal:
        rows = torch.arange(seq, device=q.device).unsqueeze(1)
        mask = (torch.arange(total, device=q.device).unsqueeze(0) <= rows + (total - seq)).view(1, 1, seq, total)
    if key_padding is not None:
        keep = torch.cat([key_padding.new_ones(batch, prefix), key_padding], dim=1).view(batch, 1, 1, total)
        mask = keep if mask is None else mask & keep
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=k.shape[1] != q_heads)


def _full_config(config: dict) -> dict:
    sizes = required_ints(OP, config, ("batch", "heads", "seq", "prefix", "head_dim"))
    return {
        **sizes,
        "kv_heads": int(config.get("kv_heads", sizes["heads"])),
        "causal": bool(config.get("causal", True)),
        "padding": bool(config.get("padding", False)),
        **common_config(config),
    }


class PrefixAttentionSetup:
    """Inputs, prefix and masks for one configuration."""

    def __init__(self, config: dict):
        self.config = c = _full_config(config)
        self.device, self.dtype = c["device"], c["dtype"]
        B, H, G, S, P, D = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["prefix"], c["head_dim"]
        self.shape = {"batch": B, "heads": H, "kv_heads": G, "seq": S, "prefix": P, "head_dim": D,
                      "causal": c["causal"], "padding": c["padding"]}

        randn = device_randn(self.device, self.dtype, c["seed"])
        self.q = randn(B, H, S, D).requires_grad_(True)
        self.k = randn(B, G, S, D).requires_grad_(True)
        self.v = randn(B, G, S, D).requires_grad_(True)
        self.prefix_k = randn(G, P, D).requires_grad_(True)
        self.prefix_v = randn(G, P, D).requires_grad_(True)
        self.grad_inputs = [self.q, self.k, self.v, self.prefix_k, self.prefix_v]
        self.grad_out = randn(B, H, S, D)
        self.key_padding = None
        if c["padding"]:
            # every other row has its last quarter of keys padded
            keep = torch.ones(B, S, dtype=torch.bool, device=self.device)
            keep[1::2, S - S // 4:] = False
            self.key_padding = keep

    # ------------------------------------------------------------------ forwards per provider

    def _forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        q, k, v, prefix_k, prefix_v = self.grad_inputs
        causal, padding = self.config["causal"], self.key_padding
        if provider == "concat_sdpa":
            return lambda: concat_sdpa(q, k, v, prefix_k, prefix_v, causal, padding)
        if provider == "pefops":
            prefix_attention = provider_module("pefops.ops").prefix_attention
            kwargs = backend_kwargs(self.config["backend"])
            return lambda: prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=padding, causal=causal,
                                            **kwargs)
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if mode not in ("fwd", "fwd+bwd"):
            raise NotApplicable
        return measured_call(self._forward_fn(provider), mode, self.grad_inputs, self.grad_out)

    def pairs(self) -> int:
        """Visible (query, key) pairs over every row and head (padding not subtracted)."""
        c = self.config
        S, P = c["seq"], c["prefix"]
        sequence_pairs = S * (S + 1) // 2 if c["causal"] else S * S
        return c["batch"] * c["heads"] * (S * P + sequence_pairs)

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        B, H, G, S, P, D = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["prefix"], c["head_dim"]
        e = self.dtype.itemsize
        q_bytes = out_bytes = B * H * S * D * e
        kv_bytes = 2 * B * G * S * D * e
        prefix_bytes = 2 * G * P * D * e
        lse_bytes = B * H * S * 4
        mask_bytes = B * S if c["padding"] else 0
        fwd_bytes = q_bytes + kv_bytes + prefix_bytes + mask_bytes + out_bytes + lse_bytes
        fwd_flops = 2 * self.pairs() * (D + D)
        if mode == "fwd":
            return Work(bytes=fwd_bytes, flops=fwd_flops)
        bwd_reads = q_bytes + kv_bytes + prefix_bytes + mask_bytes + out_bytes + out_bytes + lse_bytes
        bwd_writes = q_bytes + kv_bytes + prefix_bytes
        return Work(bytes=fwd_bytes + bwd_reads + bwd_writes, flops=fwd_flops + 2 * self.pairs() * (3 * D + 2 * D))

    def describe(self, provider: str, mode: str = "fwd") -> str | None:
        c = self.config
        masks = ("causal" if c["causal"] else "") + (" + key padding" if c["padding"] else "")
        if provider == "concat_sdpa":
            return f"cat(prefix expanded, k/v) + [*, S, P+S] bool mask ({masks or 'none'}) + SDPA"
        if provider == "pefops":
            sizes = {"head_dim": c["head_dim"], "value_dim": c["head_dim"], "dropout": 0}
            return backend_note(OP, self.device, self.dtype, mode, sizes, c["backend"])
        return None


def setup_prefix_attention(config: dict) -> PrefixAttentionSetup:
    """Build the inputs once for every provider. ``config``: batch, heads, seq, prefix, head_dim, and
    optionally kv_heads, causal (default True), padding, seed, backend, device, dtype."""
    return PrefixAttentionSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """GPU: batch 16, 16 heads x 64, seq 512 / 2048 x prefix 20 / 200, causal, bf16 (the issue's
    shapes; the headline seq 2048, prefix 200 first); --full adds the encoder case (not causal, key
    padding) and grouped-query heads (4 kv heads). CPU quick: batch 2, 4 heads x 32, seq 128, prefix
    20, fp32; CPU --full adds batch 4, 8 heads x 64, seq 512, prefix 64."""
    if device.startswith("cuda"):
        shapes = [{**HEADLINE, "seq": seq, "prefix": prefix} for seq in (2048, 512) for prefix in (200, 20)]
        if not quick:
            shapes += [{**HEADLINE, "seq": 512, "prefix": 20, "causal": False, "padding": True},
                       {**HEADLINE, "kv_heads": 4}]
    else:
        shapes = [{"batch": 2, "heads": 4, "seq": 128, "prefix": 20, "head_dim": 32}]
        if not quick:
            shapes += [{"batch": 4, "heads": 8, "seq": 512, "prefix": 64, "head_dim": 64}]
    return on_device(device, dtype, shapes)


# fwd and fwd+bwd, GB/s and TFLOP/s of pefops (OpBenchmark's defaults); no copy reference
BENCHMARK = OpBenchmark(
    name=OP, configs=configs, setup=setup_prefix_attention, providers=PROVIDERS, baseline="concat_sdpa",
    bandwidth_reference=None,
    shape_columns=(("batch", "B"), ("heads", "H"), ("kv_heads", "Hkv"), ("seq", "S"), ("prefix", "P"),
                   ("head_dim", "D"), ("causal", "causal"), ("padding", "pad")),
    memory_columns=True,
)
