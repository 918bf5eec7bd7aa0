"""The tolerance table, in one place (DESIGN.md "Numerics and tolerances")."""

import torch

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}
# fp32 where a dot product may run in TF32 (GPU kernels when torch allows TF32)
TOLERANCE_TF32 = 1e-4


def assert_close(actual, expected, dtype, name="", tolerance=None):
    """|actual - expected| <= tol * max(1, max|expected|) elementwise, on the scale of the tensor:
    gradients of very different magnitudes are compared each on its own scale."""
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    expected = expected.detach().to(torch.float64)
    actual = actual.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tol * scale, f"{name}: max error {error:.3e} > {tol:.1e} * {scale:.3g} ({dtype})"
