"""Triton tier: the prefix-attention kernels (kernels/prefix_attention.py: forward with online softmax
over prefix then sequence; kernels/prefix_attention_bwd.py: delta, dK/dV per key block for the
sequence and the prefix, dQ) with backend="triton", under
TRITON_INTERPRET=1 on CPU at tiny odd shapes (on a GPU machine the same tests run on the device),
against the naive float64 formula of tests/ops/test_prefix_attention.py: output and every gradient.
The gpu tier at the end runs real sizes in bf16 against the fp32 reference."""

import importlib

import pytest
import torch

from pefops import backend as backends
from pefops.ops import prefix_attention, prefix_attention_ref
from tests.ops.test_prefix_attention import MASKS, PrefixCase, check_against_naive, make_inputs
from tests.tolerances import assert_close

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(*args, **kwargs):
    return PrefixCase(*args, device=DEVICE, **kwargs)


@pytest.mark.parametrize("mask", MASKS)
def test_mask_forms(mask):
    check_against_naive(case(2, 2, 1, 7, 9, 5, 24, mask=mask, causal=mask in ("pad_int", "bool4", "add_min")),
                        backend="triton")


@pytest.mark.parametrize("c", [
    case(1, 1, 1, 1, 1, 1, 16),
    case(2, 4, 2, 7, 7, 5, 24, causal=True),  # grouped-query heads, group 2
    case(1, 3, 1, 33, 20, 20, 64, causal=True, mask="pad_bool"),  # several query and key blocks (fp32 tiles)
    case(2, 2, 2, 5, 11, 1, 24, value_dim=40, per_row=True, mask="bool4"),  # per-row prefix, Dv != D
    case(2, 2, 1, 7, 9, 0, 16, mask="add_inf"),  # P = 0
    case(2, 2, 2, 9, 5, 5, 16, causal=True),  # Sq > Sk: the first rows see only the prefix
    case(2, 2, 1, 1, 17, 5, 16, causal=True, mask="pad_int"),  # decoding step
    case(2, 2, 2, 5, 0, 3, 16),  # no sequence keys
    case(2, 2, 2, 7, 9, 3, 16, mask="bool4", empty_row=True, causal=True),  # rows with only the prefix
    case(2, 2, 2, 7, 9, 0, 16, mask="add_inf", empty_row=True),  # rows without any key: zeros
    case(2, 2, 2, 6, 8, 3, 16, mask="add_min", empty_row=True),  # finfo.min rows average their keys
], ids=str)
def test_shapes(c):
    check_against_naive(c, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check_against_naive(case(2, 4, 2, 33, 20, 5, 64, dtype=dtype, causal=True, mask="pad_bool"), backend="triton")


def test_float16_per_row_prefix_and_additive_mask():
    check_against_naive(case(2, 2, 1, 7, 9, 20, 24, dtype=torch.float16, per_row=True, mask="add_min"),
                        backend="triton")


@pytest.mark.parametrize("c", [
    case(2, 4, 2, 33, 37, 20, 24, causal=True, mask="bool4"),  # Sq < Sk
    case(1, 2, 1, 37, 21, 17, 16, causal=True, mask="pad_bool", per_row=True),  # Sq > Sk
], ids=str)
def test_many_small_blocks(c, monkeypatch):
    # 16 x 16 tiles: several prefix and sequence blocks per program, causal block skipping in every
    # kernel, and blocks straddling the prefix / sequence and Sq / Sk edges
    for module in ("prefix_attention", "prefix_attention_bwd"):
        monkeypatch.setattr(backends.import_kernels(module), "_tiles", lambda *args, **kwargs: (16, 16, 4, 1))
    check_against_naive(c, backend="triton")


def test_strided_inputs_and_broadcast_mask_views():
    # q / k / v as transposed views of [B, S, H, D] projections (transformers' layout), the mask an
    # expanded view: the kernels read through strides, no copies needed
    generator = torch.Generator().manual_seed(3)
    batch, heads, sq, sk, prefix, dim = 2, 2, 7, 9, 4, 16
    q = torch.randn(batch, sq, heads, dim, generator=generator).to(DEVICE).transpose(1, 2)
    k = torch.randn(batch, sk, heads, dim, generator=generator).to(DEVICE).transpose(1, 2)
    v = torch.randn(batch, sk, heads, dim, generator=generator).to(DEVICE).transpose(1, 2)
    prefix_k = torch.randn(heads, prefix, dim, generator=generator).to(DEVICE)
    prefix_v = torch.randn(heads, prefix, dim, generator=generator).to(DEVICE)
    keep = (torch.rand(1, 1, sq, sk, generator=generator) > 0.3).to(DEVICE).expand(batch, heads, sq, sk)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=keep, backend="triton")
    expected = prefix_attention_ref(q, k, v, prefix_k, prefix_v, attention_mask=keep)
    assert_close(out, expected, torch.float32, "strided")
    # key padding as a slice of a longer mask (row stride sk + 3)
    padding = (torch.rand(batch, sk + 3, generator=generator) > 0.3).to(DEVICE)[:, 3:]
    out = prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=padding, causal=True, backend="triton")
    expected = prefix_attention_ref(q, k, v, prefix_k, prefix_v, attention_mask=padding, causal=True)
    assert_close(out, expected, torch.float32, "strided padding")


def test_only_needed_gradients():
    q, k, v, prefix_k, prefix_v, _ = make_inputs(case(2, 2, 2, 5, 6, 3, 16))
    k.requires_grad_(False)
    v.requires_grad_(False)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, backend="triton")
    out.sum().backward()
    assert k.grad is None and v.grad is None and q.grad is not None and prefix_k.grad is not None


def test_prefix_gradients_alone_match_full_backward():
    # prompt-style training (frozen q / k / v producers): only the prefix kernels run
    c = case(2, 4, 2, 9, 11, 5, 16, causal=True, mask="pad_bool")
    q, k, v, prefix_k, prefix_v, mask = make_inputs(c)
    for t in (q, k, v):
        t.requires_grad_(False)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=mask, causal=True, backend="triton")
    out.backward(torch.ones_like(out))
    alone = prefix_k.grad.clone(), prefix_v.grad.clone()
    expected = make_inputs(c)
    reference = prefix_attention_ref(*expected[:5], attention_mask=mask, causal=True)
    reference.backward(torch.ones_like(reference))
    assert_close(alone[0], expected[3].grad, torch.float32, "prefix_k alone")
    assert_close(alone[1], expected[4].grad, torch.float32, "prefix_v alone")


def test_triton_refuses_large_head_dim_and_auto_falls_back():
    problem = backends.Problem(torch.device("cuda"), torch.bfloat16, "forward",
                               {"head_dim": 512, "value_dim": 512, "dropout": 0})
    reasons = dict(backends.explain("prefix_attention", problem))["triton"]
    assert any("head_dim 512" in reason for reason in reasons)


def test_compile_variants_cover_every_kernel():
    kernels = importlib.import_module("pefops.kernels.prefix_attention")
    names = {variant[1].fn.__name__ for variant in kernels.compile_variants()}
    assert names == {"prefix_attention_fwd_kernel", "prefix_attention_bwd_delta_kernel",
                     "prefix_attention_bwd_dkdv_kernel", "prefix_attention_bwd_dq_kernel"}


# ------------------------------------------------------------------------------------ gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize("c", [
    PrefixCase(4, 16, 16, 512, 512, 20, 64, dtype=torch.bfloat16, causal=True, device="cuda"),
    PrefixCase(2, 16, 4, 1023, 1023, 200, 128, dtype=torch.bfloat16, mask="pad_bool", device="cuda"),
    PrefixCase(2, 8, 8, 333, 333, 200, 256, dtype=torch.bfloat16, mask="bool4", causal=True, device="cuda"),
    PrefixCase(2, 8, 2, 123, 700, 20, 64, dtype=torch.float16, mask="add_min", per_row=True, device="cuda"),
    PrefixCase(2, 8, 8, 257, 257, 20, 64, dtype=torch.float32, mask="add_inf", causal=True, device="cuda"),
], ids=str)
def test_gpu_real_sizes(c):
    check_reference(c)


def check_reference(c: PrefixCase):
    """Against the fp32 reference (the naive float64 loop is too slow at these sizes): output and
    every gradient within twice the same-dtype SDPA-path error (a floor of the dtype's tolerance)."""
    inputs = make_inputs(c)
    mask = inputs[5]
    out = prefix_attention(*inputs[:5], attention_mask=mask, causal=c.causal, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    exact = [t.detach().float().requires_grad_() for t in inputs[:5]]
    exact_mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    expected = prefix_attention_ref(*exact, attention_mask=exact_mask, causal=c.causal)
    expected.backward(grad_out.float())
    tolerance = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[c.dtype]
    assert_close(out, expected, c.dtype, "out", tolerance=tolerance)
    for name, tensor, reference in zip(("q", "k", "v", "prefix_k", "prefix_v"), inputs[:5], exact):
        # gradients sum over many rows (the prefix over the whole batch): relative to their scale
        assert_close(tensor.grad, reference.grad, c.dtype, f"grad {name}", tolerance=2 * tolerance)


@pytest.mark.gpu
def test_gpu_no_concatenation_in_memory():
    # forward + backward allocate the outputs, gradients, lse/delta and the prefix's per-row fp32
    # partials, never a [B, Hkv, P + S, D] concatenation
    c = PrefixCase(8, 16, 16, 1024, 1024, 200, 64, dtype=torch.bfloat16, causal=True, device="cuda")
    q, k, v, prefix_k, prefix_v, _ = make_inputs(c)
    grad_out = torch.randn_like(q)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend="triton")
    torch.autograd.grad(out, (q, k, v, prefix_k, prefix_v), grad_out)
    peak = torch.cuda.max_memory_allocated() - before
    element = 2
    tensor = q.numel() * element  # one [B, H, S, D] tensor
    partials = 2 * c.batch * c.kv_heads * c.prefix * c.dim * 4
    lse_delta = 2 * c.batch * c.q_heads * c.sq * 4
    # out, dq, dk, dv, the partials, lse and delta (+ allocator rounding); the concatenated K and V
    # alone would add 2 * B * H * (P + S) * D * e
    assert peak <= 4 * tensor + partials + lse_delta + (8 << 20), (peak, tensor)
