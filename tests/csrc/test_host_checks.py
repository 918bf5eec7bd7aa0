"""cuda-build tier: the host checks of the decode ops (csrc/decode_common.cuh's CHECK_* macros and
check_adapter_args) on CPU tensors, no GPU needed. The checks of shapes, dtypes, layout and scalars
come before the device checks, so each bad argument below gets its own message (what was wrong and
what was expected); a good call on CPU tensors stops at "x must be a CUDA tensor". Device mismatches
between CUDA and CPU tensors need a GPU: the gpu-tier files test them."""

import pytest

torch = pytest.importorskip("torch")

from tests.csrc.helpers import EPS, SLOPE  # noqa: E402

pytestmark = pytest.mark.cuda_build

T, H, R, N_ADAPTERS = 2, 8, 4, 3
HALF = torch.float16
EMPTY = torch.empty(0, dtype=HALF)


def adapter_args(stacked):
    """Good CPU arguments of bottleneck_adapter_decode_forward (stacked=False) or of
    multi_adapter_decode_forward without adapter_index (stacked=True), LayerNorm on."""
    lead = (N_ADAPTERS,) if stacked else ()
    return {"x": torch.zeros(T, H, dtype=HALF), "down_weight": torch.zeros(*lead, R, H, dtype=HALF),
            "down_bias": torch.zeros(*lead, R, dtype=HALF), "up_weight": torch.zeros(*lead, H, R, dtype=HALF),
            "up_bias": torch.zeros(*lead, H, dtype=HALF), "scaling": torch.ones(*lead, H),
            "residual": torch.zeros(T, H, dtype=HALF), "ln_weight": torch.ones(H, dtype=HALF),
            "ln_bias": torch.zeros(H, dtype=HALF), "eps": EPS, "activation": 0, "negative_slope": SLOPE}


def call_adapter(ext, stacked, **changes):
    args = adapter_args(stacked) | changes
    if stacked:  # adapter_index comes second; its checks need CUDA tensors (test_multi_adapter_gpu.py)
        x, *rest = args.values()
        return ext.multi_adapter_decode_forward(x, torch.zeros(x.shape[0], dtype=torch.long), *rest)
    return ext.bottleneck_adapter_decode_forward(*args.values())


def adapter_cases(stacked):
    lead = (N_ADAPTERS,) if stacked else ()
    shape = lambda *dims: "\\[" + ", ".join(str(d) for d in lead + dims) + "\\]"  # noqa: E731
    rows = "rows" if stacked else "tokens"
    return [
        (dict(x=torch.zeros(H, dtype=HALF)), r"x must be 2-D \[T, H\], got shape \[8\]"),
        (dict(x=torch.zeros(T, H, dtype=torch.float64)), "x has dtype Double, expected float32, float16 or bfloat16"),
        (dict(x=torch.zeros(17, H, dtype=HALF)), rf"T = x.size\(0\) = 17 {rows}, expected at most 16"),
        (dict(x=torch.zeros(H, T, dtype=HALF).t()), r"x must be contiguous \(call .contiguous\(\)\)"),
        (dict(down_weight=torch.zeros(R, dtype=HALF)), f"down_weight must be {2 + len(lead)}-D"),
        (dict(down_weight=torch.zeros(*lead, 1025, H, dtype=HALF)), "bottleneck size r = .* = 1025, expected 1 <= r <= 1024"),
        (dict(down_weight=torch.zeros(*lead, R, H + 1, dtype=HALF)), f"down_weight has shape {shape(R, H + 1)}, expected {shape(R, H)}"),
        (dict(down_weight=torch.zeros(*lead, R, H)), "down_weight has dtype Float but x has dtype Half; expected x's dtype"),
        (dict(up_weight=torch.zeros(*lead, H, R + 1, dtype=HALF)), f"up_weight has shape {shape(H, R + 1)}, expected {shape(H, R)}"),
        (dict(up_weight=torch.zeros(*lead, R, H, dtype=HALF).transpose(-1, -2)), "up_weight must be contiguous"),
        (dict(residual=torch.zeros(T + 1, H, dtype=HALF)), r"residual has shape \[3, 8\], expected \[2, 8\]"),
        (dict(down_bias=torch.zeros(*lead, R + 1, dtype=HALF)), f"down_bias has shape {shape(R + 1)}, expected {shape(R)}"),
        (dict(up_bias=torch.zeros(*lead, H, dtype=torch.bfloat16)), "up_bias has dtype BFloat16 but x has dtype Half"),
        (dict(scaling=torch.ones(*lead, H, dtype=HALF)), "scaling has dtype Half, expected float32"),
        (dict(scaling=torch.ones(*lead, H + 1)), f"scaling has shape {shape(H + 1)}, expected {shape(H)}"),
        (dict(ln_weight=torch.ones(H + 1, dtype=HALF)), r"ln_weight has shape \[9\], expected \[8\]"),
        (dict(ln_weight=EMPTY), "ln_bias is given without ln_weight; expected both"),
        (dict(activation=7), "activation code 7 is unknown, expected 0 identity, 1 relu"),
        (dict(eps=-1.0), "eps must be finite and >= 0, got -1"),
        (dict(), "x must be a CUDA tensor, got a tensor on cpu"),
    ]


@pytest.mark.parametrize("changes,message", adapter_cases(stacked=False))
def test_bottleneck_adapter_decode_checks(built_ext, changes, message):
    with pytest.raises(RuntimeError, match="bottleneck_adapter_decode_forward: " + message):
        call_adapter(built_ext, False, **changes)


@pytest.mark.parametrize("changes,message", adapter_cases(stacked=True))
def test_multi_adapter_decode_checks(built_ext, changes, message):
    with pytest.raises(RuntimeError, match="multi_adapter_decode_forward: " + message):
        call_adapter(built_ext, True, **changes)


def test_optional_tensors_may_be_empty(built_ext):
    # no biases and no LayerNorm pass every check: the call gets as far as the device check
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        call_adapter(built_ext, False, down_bias=EMPTY, up_bias=EMPTY, ln_weight=EMPTY, ln_bias=EMPTY)


K_IN, N_OUT = 250, 64  # KB = ceil(250 / 8) = 32


def masked_args(**changes):
    args = {"x": torch.zeros(T, K_IN, dtype=HALF), "weight": torch.zeros(N_OUT, K_IN, dtype=HALF),
            "packed_mask": torch.zeros(N_OUT, 32, dtype=torch.uint8), "bias": torch.zeros(N_OUT, dtype=HALF)}
    return (args | changes).values()


@pytest.mark.parametrize("changes,message", [
    (dict(x=torch.zeros(1, T, K_IN, dtype=HALF)), r"x must be 2-D \[T, K\]"),
    (dict(x=torch.zeros(T, K_IN, dtype=torch.float64)), "x has dtype Double, expected float32, float16 or bfloat16"),
    (dict(x=torch.zeros(17, K_IN, dtype=HALF)), r"T = x.size\(0\) = 17 tokens, expected at most 16"),
    (dict(x=torch.zeros(K_IN, T, dtype=HALF).t()), "x must be contiguous"),
    (dict(weight=torch.zeros(K_IN, dtype=HALF)), "weight must be 2-D"),
    (dict(weight=torch.zeros(N_OUT, K_IN)), "weight has dtype Float but x has dtype Half"),
    (dict(weight=torch.zeros(N_OUT, K_IN + 1, dtype=HALF)),
     r"weight has shape \[64, 251\], expected \[N, K\] with K = x.size\(1\) = 250"),
    (dict(weight=torch.zeros(K_IN, N_OUT, dtype=HALF).t()), "weight must be contiguous"),
    (dict(packed_mask=torch.zeros(N_OUT, 32, dtype=torch.bool)), "packed_mask has dtype Bool, expected uint8"),
    (dict(packed_mask=torch.zeros(N_OUT, 33, dtype=torch.uint8)),
     r"packed_mask has shape \[64, 33\], expected \[N, ceil\(K / 8\)\] = \[64, 32\]"),
    (dict(packed_mask=torch.zeros(N_OUT, K_IN, dtype=torch.uint8)), r"packed_mask has shape \[64, 250\]"),
    (dict(packed_mask=torch.zeros(32, N_OUT, dtype=torch.uint8).t()), "packed_mask must be contiguous"),
    (dict(bias=torch.zeros(N_OUT, dtype=torch.bfloat16)), "bias has dtype BFloat16 but x has dtype Half"),
    (dict(bias=torch.zeros(N_OUT + 1, dtype=HALF)), r"bias has shape \[65\], expected \[N\] = \[64\]"),
    (dict(bias=torch.zeros(N_OUT, 2, dtype=HALF)[:, 0]), "bias must be contiguous"),
    (dict(), "x must be a CUDA tensor, got a tensor on cpu"),
    (dict(bias=EMPTY), "x must be a CUDA tensor"),  # no bias is fine
])
def test_masked_linear_decode_checks(built_ext, changes, message):
    with pytest.raises(RuntimeError, match="masked_linear_decode_forward: " + message):
        built_ext.masked_linear_decode_forward(*masked_args(**changes))
