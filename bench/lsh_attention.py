"""LSH attention benchmark (Reformer): one causal LSH self-attention layer on hidden states.

One layer of B sequences of S tokens, hidden size H·D (H heads of D), num_hashes rounds, chunks of 64
tokens attending to their chunk and the one before (num_chunks_after 0), causal (a decoder layer),
no dropout, no padding. num_buckets is what transformers' ``_set_num_buckets`` picks for S (about
2·S/64, a power of two, factorised into two factors when above 2·max(√(S/64), 64)); it is passed in
explicitly. Every provider starts from the same hidden states h [B, S, H·D] and the same two
projection weights (query_key and value, no bias) and returns [B, S, H·D]: the full layer,
projections included, so that transformers' module runs exactly as in a model.

Providers (inputs and weights built once per configuration):

* ``transformers`` -- ``transformers.models.reformer.modeling_reformer.LSHSelfAttention`` (the
  anchor), called on h; ``hash_seed`` set in its config so that every call draws the same rotations.
  Its projections are the weights shared with the other providers.
* ``pefops``       -- ``F.linear`` projections, split into heads, then
  ``pefops.ops.lsh_attention(qk, v, ..., causal=True, hash_seed=<same seed>)`` (the same rotations:
  both reseed with hash_seed and draw them with the same ``torch.randn`` call), merged back.
  Whichever backend pefops selects, or the config's ``backend``. Its output equals transformers'.
* ``sdpa``         -- the same projections, then ``F.scaled_dot_product_attention(qk, qk, v,
  is_causal=True)``: full causal attention over the whole sequence (flash attention on the GPU),
  the baseline LSH attention has to beat at long sequences. It computes a different function (full
  attention), so its output is not expected to match; the runner's max-rel-err column shows by how
  much it differs.

Modes: ``fwd`` (under ``torch.no_grad()``), ``fwd+bwd`` (forward, then ``torch.autograd.grad``
against a pre-allocated random upstream gradient for h and both projection weights).

Where transformers would not fit in device memory (its per-chunk score tensors and gathered keys and
values take roughly ``TRANSFORMERS_BYTES_PER_SCORE`` bytes per score entry, B·H·nh·S·128 entries),
its fwd / fwd+bwd is NotApplicable (no row); the other providers' notes say so. (By that estimate
every configuration listed fits an H200; the check matters on smaller GPUs.)

Counts (e = element size, T = B·S tokens, C = H·D, N = B·H·nh·S query rounds, W = 64·2 = 128 keys
per query round, R = rotation columns = sum(bucket factors)/2). The compulsory traffic of a fused
implementation that materialises the projections (GB/s and TFLOP/s are effective rates, the same
count for transformers and pefops):
* fwd bytes: read h and the weights, write qk and v, read them for attention, write out:
  5·T·C·e + 2·C²·e; LSH adds the bucket ids (int64, written and read: 16·N), the sort's two
  permutations (written and read: 32·N) and the per-round outputs and fp32 log-sum-exps written and
  read by the round combine (2·N·(D·e + 4)).
* fwd+bwd bytes: fwd + read dout, qk, v, out; write dqk, dv; read them, h and the weights for the
  projection backward; write dh and the weight grads: 10·T·C·e + 4·C²·e; LSH adds the sorted
  indices read again (16·N) and the per-round outputs / lse read and their grads written and read
  (3·N·(D·e + 4)).
* flops: projections 4·T·C² (fwd), 12·T·C² (fwd+bwd: dh and the weight grads); LSH attention
  4·N·W·D fwd (scores and probabilities @ values over each query round's whole window, masked
  entries included) + hashing 2·B·H·S·D·nh·R; SDPA 2·B·H·D·S·(S + 1) fwd (the causal half:
  S·(S+1)/2 query-key pairs, 2 matmuls). fwd+bwd attention = 3 × fwd (the four backward matmuls,
  no recomputation counted).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.interface import NotApplicable, OpBenchmark, ProviderUnavailable, Work
from bench.setup_helpers import (backend_kwargs, backend_note, common_config, device_randn, measured_call, on_device,
                                 provider_module, required_ints)

OP = "lsh_attention"
PROVIDERS = ("transformers", "pefops", "sdpa")
CHUNK = 64
CHUNKS_BEFORE, CHUNKS_AFTER = 1, 0
HASH_SEED = 1234
HEADLINE = {"batch": 1, "seq": 16384, "heads": 8, "head_dim": 64, "num_hashes": 4}
# transformers' peak bytes per score entry (B·H·nh·S·W entries) as a + b·e (e = element size), fitted
# to torch.profiler peaks on CPU (B1 H4 D64, S 1024 nh 4 and S 2048 nh 2): fp32 fwd 22.4, fwd+bwd 36.7;
# bf16 fwd 11.4, fwd+bwd 19.4 (rounded up here). Used only to skip configurations that would not fit
# the device (B8 nh8 S64k in bf16: ~56 GiB fwd, ~90 GiB fwd+bwd, which fit an H200).
TRANSFORMERS_BYTES_PER_SCORE = {"fwd": (1, 6), "fwd+bwd": (3, 9)}
MEMORY_FRACTION = 0.9  # of the device's memory that transformers may be expected to use


def default_num_buckets(seq: int) -> int | list[int]:
    """transformers' `LSHSelfAttention._set_num_buckets` rule for this benchmark's layer (chunk 64,
    max_position_embeddings = seq), as pefops.nn implements it for its own default."""
    from pefops.nn.lsh_attention import default_num_buckets as transformers_rule

    return transformers_rule(seq, CHUNK, seq)


def _factors(num_buckets: int | list[int]) -> list[int]:
    return [num_buckets] if isinstance(num_buckets, int) else list(num_buckets)


def _full_config(config: dict) -> dict:
    sizes = required_ints(OP, config, ("batch", "seq", "heads", "head_dim", "num_hashes"))
    return {
        **sizes,
        "num_buckets": config.get("num_buckets") or default_num_buckets(sizes["seq"]),
        "causal": bool(config.get("causal", True)),
        **common_config(config),
    }


def transformers_layer(c: dict):
    """transformers' LSHSelfAttention for the configuration (eval mode, no dropout), or raises
    ProviderUnavailable when transformers is not installed."""
    transformers = provider_module("transformers")
    reformer = provider_module("transformers.models.reformer.modeling_reformer")
    hidden = c["heads"] * c["head_dim"]
    config = transformers.ReformerConfig(
        hidden_size=hidden, num_attention_heads=c["heads"], attention_head_size=c["head_dim"],
        num_hashes=c["num_hashes"], num_buckets=c["num_buckets"], lsh_attn_chunk_length=CHUNK,
        lsh_num_chunks_before=CHUNKS_BEFORE, lsh_num_chunks_after=CHUNKS_AFTER, is_decoder=c["causal"],
        hash_seed=HASH_SEED, lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=c["seq"],
        attn_layers=["lsh"],
    )
    return reformer.LSHSelfAttention(config, layer_idx=0).eval()


class LshAttentionSetup:
    """Hidden states, the two projection weights and transformers' layer for one configuration."""

    def __init__(self, config: dict):
        self.config = c = _full_config(config)
        self.device, self.dtype = c["device"], c["dtype"]
        B, S, H, D, nh = c["batch"], c["seq"], c["heads"], c["head_dim"], c["num_hashes"]
        if S % CHUNK:
            raise ValueError(f"seq {S} must be a multiple of the chunk length {CHUNK} in this benchmark")
        self.shape = {"batch": B, "seq": S, "heads": H, "head_dim": D, "num_hashes": nh}
        C = H * D

        gen = torch.Generator().manual_seed(c["seed"])
        # randn / sqrt(C): unit-scale projections, so attention is neither uniform nor one-hot. nn.Parameters,
        # so that they can be transformers' layer's own weights (gradients land on the same tensors)
        self.wqk = torch.nn.Parameter((torch.randn(C, C, generator=gen) * C ** -0.5).to(self.device, self.dtype))
        self.wv = torch.nn.Parameter((torch.randn(C, C, generator=gen) * C ** -0.5).to(self.device, self.dtype))
        randn = device_randn(self.device, self.dtype, c["seed"] + 1)
        self.hidden = randn(B, S, C).requires_grad_(True)
        self.grad_out = randn(B, S, C)
        self.grad_inputs = [self.hidden, self.wqk, self.wv]
        self._layer = None

    # ------------------------------------------------------------------ helpers

    def _transformers_fits(self, mode: str) -> tuple[bool, str]:
        if not self.device.startswith("cuda"):
            return True, ""
        c = self.config
        scores = c["batch"] * c["heads"] * c["num_hashes"] * c["seq"] * CHUNK * (1 + CHUNKS_BEFORE + CHUNKS_AFTER)
        a, b = TRANSFORMERS_BYTES_PER_SCORE[mode]
        need = scores * (a + b * self.dtype.itemsize)
        total = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        fits = need <= MEMORY_FRACTION * total
        why = f"transformers {mode} skipped: about {need / 2**30:.0f} GiB needed, device has {total / 2**30:.0f} GiB"
        return fits, why

    def layer(self):
        if self._layer is None:
            layer = transformers_layer(self.config).to(self.device, self.dtype)
            layer.query_key.weight = self.wqk  # the benchmark's weights are the layer's parameters
            layer.value.weight = self.wv
            self._layer = layer
        return self._layer

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H, D = self.config["batch"], self.config["seq"], self.config["heads"], self.config["head_dim"]
        return x.view(B, S, H, D).transpose(1, 2)  # [B, H, S, D], as transformers' _split_hidden_size_dim

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, H, S, D = x.shape
        return x.transpose(1, 2).reshape(B, S, H * D)

    # ------------------------------------------------------------------ forwards per provider

    def _forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        c = self.config
        h = self.hidden
        if provider == "transformers":
            layer = self.layer()
            return lambda: layer(h).hidden_states
        wqk, wv = self.wqk, self.wv
        if provider == "pefops":
            lsh_attention = provider_module("pefops.ops.lsh_attention").lsh_attention
            kwargs = backend_kwargs(c["backend"])

            def call():
                qk, v = self._split(F.linear(h, wqk)), self._split(F.linear(h, wv))
                out = lsh_attention(qk, v, num_hashes=c["num_hashes"], num_buckets=c["num_buckets"],
                                    chunk_length=CHUNK, num_chunks_before=CHUNKS_BEFORE,
                                    num_chunks_after=CHUNKS_AFTER, causal=c["causal"], hash_seed=HASH_SEED,
                                    **kwargs)
                return self._merge(out)
            return call
        if provider == "sdpa":
            def call():
                qk, v = self._split(F.linear(h, wqk)), self._split(F.linear(h, wv))
                return self._merge(F.scaled_dot_product_attention(qk, qk, v, is_causal=c["causal"]))
            return call
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if mode not in ("fwd", "fwd+bwd"):
            raise NotApplicable
        if provider == "transformers" and not self._transformers_fits(mode)[0]:
            raise NotApplicable
        return measured_call(self._forward_fn(provider), mode, self.grad_inputs, self.grad_out)

    def work(self, provider: str, mode: str) -> Work:
        c = self.config
        B, S, H, D, nh = c["batch"], c["seq"], c["heads"], c["head_dim"], c["num_hashes"]
        e = self.dtype.itemsize
        T, C = B * S, H * D
        N = B * H * nh * S
        W = CHUNK * (1 + CHUNKS_BEFORE + CHUNKS_AFTER)
        R = sum(_factors(c["num_buckets"])) // 2
        fwd_bytes = 5 * T * C * e + 2 * C * C * e
        bwd_bytes = 10 * T * C * e + 4 * C * C * e
        proj_flops = 4 * T * C * C
        if provider == "sdpa":
            attn_flops = 2 * B * H * D * S * (S + 1)
            if mode == "fwd":
                return Work(bytes=fwd_bytes, flops=proj_flops + attn_flops)
            return Work(bytes=fwd_bytes + bwd_bytes, flops=3 * proj_flops + 3 * attn_flops)
        lsh_fwd_bytes = 48 * N + 2 * N * (D * e + 4)
        lsh_bwd_bytes = 16 * N + 3 * N * (D * e + 4)
        attn_flops = 4 * N * W * D
        hash_flops = 2 * B * H * S * D * nh * R
        if mode == "fwd":
            return Work(bytes=fwd_bytes + lsh_fwd_bytes, flops=proj_flops + attn_flops + hash_flops)
        return Work(bytes=fwd_bytes + lsh_fwd_bytes + bwd_bytes + lsh_bwd_bytes,
                    flops=3 * proj_flops + 3 * attn_flops + hash_flops)

    def describe(self, provider: str, mode: str = "fwd") -> str | None:
        c = self.config
        fits, why = self._transformers_fits(mode)
        settings = f"num_buckets={c['num_buckets']}, chunk {CHUNK}, before/after {CHUNKS_BEFORE}/{CHUNKS_AFTER}, " \
                   f"{'causal' if c['causal'] else 'bidirectional'}"
        skipped = "" if fits else f"; {why}"
        if provider == "transformers":
            return f"LSHSelfAttention on hidden states (projections included), {settings}"
        if provider == "sdpa":
            return f"projections + scaled_dot_product_attention(qk, qk, v) over all {c['seq']} tokens{skipped}"
        if provider == "pefops":
            sizes = {"head_dim": c["head_dim"], "value_dim": c["head_dim"], "dropout": 0}  # as the op asks
            chosen = backend_note(OP, self.device, self.dtype, mode, sizes, c["backend"])
            return f"projections + pefops.ops.lsh_attention, {chosen}, {settings}{skipped}"
        return None


def setup_lsh_attention(config: dict) -> LshAttentionSetup:
    """Build the inputs once for every provider. ``config``: batch, seq, heads, head_dim, num_hashes,
    and optionally num_buckets, causal, seed, backend, device, dtype."""
    return LshAttentionSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """GPU (bf16, 8 heads × 64, chunk 64, causal): quick = the headline (batch 1, seq 16k,
    num_hashes 4), seq 4k, and batch 8 at seq 16k; full = batch 1 and 8 × num_hashes 1/4/8 × seq
    1k/4k/16k/64k. CPU (fp32, 4 heads × 64 = hidden 256, num_hashes 4, chunk 64, causal, batch 1):
    seq 4096 (the issue's CPU target) and seq 1024 in quick and full mode; full adds num_hashes 1
    and 8 at seq 4096."""
    if device.startswith("cuda"):
        if quick:
            shapes = [HEADLINE, {**HEADLINE, "seq": 4096}, {**HEADLINE, "batch": 8}]
        else:
            shapes = [{"batch": b, "seq": s, "heads": 8, "head_dim": 64, "num_hashes": nh}
                      for b in (1, 8) for nh in (1, 4, 8) for s in (1024, 4096, 16384, 65536)]
    else:
        cpu = {"batch": 1, "seq": 4096, "heads": 4, "head_dim": 64, "num_hashes": 4}
        shapes = [{**cpu, "seq": 1024}, cpu]
        if not quick:
            shapes += [{**cpu, "num_hashes": 1}, {**cpu, "num_hashes": 8}]
    return on_device(device, dtype, shapes)


# fwd and fwd+bwd, GB/s and TFLOP/s of pefops (OpBenchmark's defaults); no copy reference
BENCHMARK = OpBenchmark(
    name=OP, configs=configs, setup=setup_lsh_attention, providers=PROVIDERS, baseline="transformers",
    bandwidth_reference=None,
    shape_columns=(("batch", "B"), ("seq", "S"), ("heads", "H"), ("head_dim", "D"), ("num_hashes", "nh")),
    memory_columns=True,
)
