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
    device = config.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.get("dtype") or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    return {
        "batch": int(config["batch"]),
        "heads": int(config["heads"]),
        "kv_heads": int(config.get("kv_heads", config["heads"])),
        "seq": int(config["seq"]),
        "prefix": int(config["prefix"]),
        "head_dim": int(config["head_dim"]),
        "causal": bool(config.get("causal", True)),
        "padding": bool(config.get("padding", False)),
        "seed": int(config.get("seed", 0)),
        "backend": config.get("backend"),  # forwarded to pefops as backend=
        "device": str(device),
        "dtype": dtype,
    }


class PrefixAttentionSetup:
    """Inputs, prefix and masks for one configuration."""

    def __init__(self, config: dict):
        c = _full_config(config)
        self.config = c
        self.device = c["device"]
        self.dtype = c["dtype"]
        B, H, G, S, P, D = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["prefix"], c["head_dim"]
        self.shape = {"batch": B, "heads": H, "kv_heads": G, "seq": S, "prefix": P, "head_dim": D,
                      "causal": c["causal"], "padding": c["padding"]}

        gen = torch.Generator(device=self.device).manual_seed(c["seed"])

        def tensor(*shape):
            t = torch.randn(*shape, generator=gen, device=self.device, dtype=self.dtype)
            return t.requires_grad_(True)

        self.q = tensor(B, H, S, D)
        self.k = tensor(B, G, S, D)
        self.v = tensor(B, G, S, D)
        self.prefix_k = tensor(G, P, D)
        self.prefix_v = tensor(G, P, D)
        self.grad_inputs = [self.q, self.k, self.v, self.prefix_k, self.prefix_v]
        self.grad_out = torch.randn(B, H, S, D, generator=gen, device=self.device, dtype=self.dtype)
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
            try:
                from pefops.ops import prefix_attention
            except Exception as error:  # noqa: BLE001 - any import failure means "cannot run here"
                raise ProviderUnavailable(
                    f"pefops.ops.prefix_attention not importable: {type(error).__name__}: {error}") from None
            kwargs = {"backend": self.config["backend"]} if self.config["backend"] is not None else {}
            return lambda: prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=padding, causal=causal,
                                            **kwargs)
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if mode not in ("fwd", "fwd+bwd"):
            raise NotApplicable
        forward = self._forward_fn(provider)
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return forward()
            return call
        inputs, grad_out = self.grad_inputs, self.grad_out

        def call():
            return torch.autograd.grad(forward(), inputs, grad_out)
        return call

    def pairs(self) -> int:
        """Visible (query, key) pairs over every row and head (padding not subtracted)."""
        c = self.config
        S, P = c["seq"], c["prefix"]
        sequence_pairs = S * (S + 1) // 2 if c["causal"] else S * S
        return c["batch"] * c["heads"] * (S * P + sequence_pairs)

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        B, H, G, S, P, D = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["prefix"], c["head_dim"]
        e = torch.empty((), dtype=self.dtype).element_size()
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
            try:
                from pefops import backend as registry

                sizes = {"head_dim": c["head_dim"], "value_dim": c["head_dim"], "dropout": 0}
                names = []
                for step in (["forward"] if mode == "fwd" else ["forward", "backward"]):
                    problem = registry.Problem(torch.device(self.device), self.dtype, step, sizes)
                    names.append(registry.select(OP, problem, c["backend"]).backend)
            except Exception:  # noqa: BLE001 - informational only
                return f"backend={c['backend'] or 'auto'}"
            return "backend=" + "/".join(dict.fromkeys(names))
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
    cuda = device.startswith("cuda")
    base = {"device": device, "dtype": dtype or (torch.bfloat16 if cuda else torch.float32)}
    if cuda:
        shapes = [{**HEADLINE, "seq": seq, "prefix": prefix} for seq in (2048, 512) for prefix in (200, 20)]
        if not quick:
            shapes += [{**HEADLINE, "seq": 512, "prefix": 20, "causal": False, "padding": True},
                       {**HEADLINE, "kv_heads": 4}]
    else:
        shapes = [{"batch": 2, "heads": 4, "seq": 128, "prefix": 20, "head_dim": 32}]
        if not quick:
            shapes += [{"batch": 4, "heads": 8, "seq": 512, "prefix": 64, "head_dim": 64}]
    return [{**base, **s} for s in shapes]


BENCHMARK = OpBenchmark(
    name=OP,
    configs=configs,
    setup=setup_prefix_attention,
    providers=PROVIDERS,
    modes=("fwd", "fwd+bwd"),
    baseline="concat_sdpa",
    subject="pefops",
    bandwidth_reference=None,
    shape_columns=(("batch", "B"), ("heads", "H"), ("kv_heads", "Hkv"), ("seq", "S"), ("prefix", "P"),
                   ("head_dim", "D"), ("causal", "causal"), ("padding", "pad")),
    memory_columns=True,
)
