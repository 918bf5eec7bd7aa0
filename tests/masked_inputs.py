"""Inputs for the masked-linear tests and an independent float64 oracle."""

import numpy as np
import torch


def numpy_pack(mask: torch.Tensor) -> torch.Tensor:
    """The format's definition: numpy.packbits(axis=1, bitorder="little")."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy().astype(bool), axis=1, bitorder="little"))


def make_case(rows, out_features, in_features, dtype=torch.float32, bias=True, device="cpu", seed=0,
              transposed_weight=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator, dtype=torch.float64)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64) * in_features ** -0.5
    scores = torch.rand(out_features, in_features, generator=generator, dtype=torch.float64) - 0.5
    b = torch.randn(out_features, generator=generator, dtype=torch.float64) if bias else None
    move = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    weight = move(weight)
    if transposed_weight:  # GPT-2 Conv1D stores [in, out]; the layer uses the transposed view
        weight = weight.t().contiguous().t()
    return move(x), weight, scores.to(torch.float32).to(device), move(b)


def naive_masked_linear(x, weight, mask, bias=None):
    d = torch.float64
    out = x.to(d) @ (weight.to(d) * mask.to(d)).t()
    return out if bias is None else out + bias.to(d)
