"""Inputs for the bottleneck adapter tests, and an independent naive formula to check against."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAIVE_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "identity": lambda z: z,
}


@dataclass
class AdapterCase:
    tokens: int
    hidden: int
    rank: int
    dtype: torch.dtype = torch.float32
    activation: str = "relu"
    scaling: str = "float"  # float | scalar | channel
    layer_norm: bool = False
    ln_affine: bool = True
    separate_residual: bool = False
    biases: bool = True
    device: str = "cpu"
    leading: tuple = field(default_factory=tuple)  # extra leading dims, e.g. (2,) makes x [2, tokens, hidden]

    def __str__(self):
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"T{self.tokens}-H{self.hidden}-r{self.rank}-{dtype}-{self.activation}-s_{self.scaling}"
                f"{'-ln' if self.layer_norm else ''}{'-res' if self.separate_residual else ''}")


def make_inputs(case: AdapterCase, seed: int = 0):
    """Leaf tensors (requires_grad) and the keyword arguments of bottleneck_adapter."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape, std=0.5, dtype=None):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
        return t.to(dtype or case.dtype).to(case.device).requires_grad_()

    shape = (*case.leading, case.tokens, case.hidden)
    inputs = {
        "x": leaf(*shape),
        "down_weight": leaf(case.rank, case.hidden, std=case.hidden ** -0.5),
        "down_bias": leaf(case.rank, std=0.1) if case.biases else None,
        "up_weight": leaf(case.hidden, case.rank, std=case.rank ** -0.5),
        "up_bias": leaf(case.hidden, std=0.1) if case.biases else None,
    }
    kwargs = {"activation": case.activation}
    if case.scaling == "float":
        kwargs["scaling"] = 0.75
    elif case.scaling == "scalar":
        kwargs["scaling"] = inputs["scaling"] = leaf(1, std=1.0, dtype=torch.float32 if case.dtype != torch.float64 else torch.float64)
    else:
        kwargs["scaling"] = inputs["scaling"] = leaf(case.hidden, std=1.0, dtype=torch.float32 if case.dtype != torch.float64 else torch.float64)
    if case.separate_residual:
        kwargs["residual"] = inputs["residual"] = leaf(*shape)
    if case.layer_norm:
        weight = inputs["ln_weight"] = leaf(case.hidden) if case.ln_affine else None
        bias = inputs["ln_bias"] = leaf(case.hidden, std=0.1) if case.ln_affine else None
        kwargs["layer_norm"] = (weight, bias, 1e-5)
    return inputs, kwargs


def call(op, inputs, kwargs, **extra):
    return op(inputs["x"], inputs["down_weight"], inputs["down_bias"], inputs["up_weight"], inputs["up_bias"], **kwargs, **extra)


def naive_adapter(x, down_weight, down_bias, up_weight, up_bias, *, activation="relu", scaling=1.0,
                  residual=None, layer_norm=None):
    """Linear → act → Linear → * scaling → + residual → LayerNorm, in float64: the independent oracle."""
    d = torch.float64
    opt = lambda t: None if t is None else t.to(d)
    h = F.linear(x.to(d), down_weight.to(d), opt(down_bias))
    h = NAIVE_ACTIVATIONS[activation](h)
    h = F.linear(h, up_weight.to(d), opt(up_bias))
    h = h * (scaling.to(d) if isinstance(scaling, torch.Tensor) else scaling)
    h = h + (x if residual is None else residual).to(d)
    if layer_norm is not None:
        weight, bias, eps = layer_norm
        h = F.layer_norm(h, h.shape[-1:], opt(weight), opt(bias), eps)
    return h


def outputs_and_grads(op, case, inputs, kwargs, grad_seed=1, **extra):
    """Output and the gradient of every leaf for a fixed random upstream gradient."""
    for tensor in inputs.values():
        if tensor is not None:
            tensor.grad = None
    out = call(op, inputs, kwargs, **extra)
    generator = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
    out.backward(upstream)
    grads = {name: t.grad for name, t in inputs.items() if t is not None}
    return out.detach(), grads
