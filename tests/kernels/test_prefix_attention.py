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
from tests.ops.test_prefix_attention import MASKS, PrefixCase, check_against_naive, make_inputs, naive_prefix_attention
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
        monkeypatch.setattr(backends.import_kernels(module), "tile_sizes", lambda *args, **kwargs: (16, 16, 4, 1))
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


# ------------------------------------------------------------------------------------ dropout

SEED_RANGE = 2**31 - 1  # the op draws torch.randint(SEED_RANGE, (1,)) from torch's default generator


def keep_mask(c: PrefixCase, dropout_p, seed):
    kernels = importlib.import_module("pefops.kernels.prefix_attention")
    return kernels.prefix_dropout_keep_mask(c.batch, c.q_heads, c.sq, c.prefix, c.sk, dropout_p, seed, device=DEVICE)


def check_dropout_against_naive(c: PrefixCase, dropout_p=0.3, torch_seed=11):
    """Output and every gradient with dropout against the float64 definition under the kernels' own
    keep mask (materialised by prefix_dropout_keep_mask from the seed the op draws)."""
    inputs = make_inputs(c)
    mask = inputs[5]
    torch.manual_seed(torch_seed)
    out = prefix_attention(*inputs[:5], attention_mask=mask, causal=c.causal, dropout_p=dropout_p, backend="triton")
    torch.manual_seed(torch_seed)
    seed = int(torch.randint(SEED_RANGE, (1,), dtype=torch.int64).item())
    keep = keep_mask(c, dropout_p, seed)
    dropped = keep.numel() - keep.sum().item()
    assert 0 < dropped < keep.numel(), "the case must drop some probabilities and keep others"
    exact = [t.detach().to(torch.float64).requires_grad_() for t in inputs[:5]]
    expected = naive_prefix_attention(*exact, mask=mask, causal=c.causal, dropout_keep=keep.cpu(),
                                      dropout_p=dropout_p)
    assert_close(out, expected, c.dtype, "out")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(c.dtype).to(DEVICE)
    out.backward(grad_out)
    expected.backward(grad_out.to(torch.float64).cpu())
    for name, tensor, reference in zip(("q", "k", "v", "prefix_k", "prefix_v"), inputs[:5], exact):
        assert_close(tensor.grad, reference.grad, c.dtype, f"grad {name}")
    # the reference without the mask differs: the mask really was applied
    plain = naive_prefix_attention(*exact, mask=mask, causal=c.causal)
    assert not torch.allclose(out.detach().double().cpu(), plain.detach(), atol=1e-3)


@pytest.mark.parametrize("c", [
    case(2, 4, 2, 7, 9, 5, 16, causal=True, mask="pad_bool"),  # GQA, causal, key padding, shared prefix
    case(2, 2, 2, 5, 11, 3, 24, value_dim=16, per_row=True, mask="bool4"),  # per-row prefix, 4-D mask
    case(2, 2, 1, 6, 8, 3, 16, mask="add_min", empty_row=True, causal=True),  # additive, rows with prefix only
    case(1, 2, 2, 4, 0, 6, 16),  # prefix only
], ids=str)
def test_dropout_matches_reference_with_the_kernels_mask(c):
    check_dropout_against_naive(c)


def test_dropout_with_many_small_blocks(monkeypatch):
    # several prefix / sequence / query blocks per program: the counters of every tile line up
    for module in ("prefix_attention", "prefix_attention_bwd"):
        monkeypatch.setattr(backends.import_kernels(module), "tile_sizes", lambda *args, **kwargs: (16, 16, 4, 1))
    check_dropout_against_naive(case(1, 2, 1, 21, 19, 17, 16, causal=True, mask="pad_bool"), dropout_p=0.2)


def test_dropout_seed_reproducible_and_varies():
    c = case(2, 2, 1, 5, 7, 3, 16, causal=True)
    inputs = make_inputs(c, requires_grad=False)[:5]

    def run(torch_seed):
        torch.manual_seed(torch_seed)
        return prefix_attention(*inputs, causal=True, dropout_p=0.4, backend="triton")

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # two calls in one run draw different seeds, hence different masks
    torch.manual_seed(1)
    one = prefix_attention(*inputs, causal=True, dropout_p=0.4, backend="triton")
    two = prefix_attention(*inputs, causal=True, dropout_p=0.4, backend="triton")
    assert torch.equal(one, first) and not torch.allclose(one, two)


def test_dropout_keep_fraction_and_counters():
    c = case(2, 3, 1, 32, 48, 16, 16)
    dropout_p = 0.25
    keep = keep_mask(c, dropout_p, seed=12345).cpu()
    assert keep.shape == (2, 3, 32, 64)
    # 12288 Bernoulli draws: the kept fraction within 5 standard deviations (0.0039) of 1 - p, in the
    # prefix columns and the sequence columns alike
    for part in (keep, keep[..., :16], keep[..., 16:]):
        deviation = (dropout_p * (1 - dropout_p) / part.numel()) ** 0.5
        assert abs(part.double().mean().item() - (1 - dropout_p)) < 5 * deviation
    # every (batch, head, row) slice draws its own bits
    rows = keep.reshape(-1, 64)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    # the seed changes the mask, a same seed repeats it
    assert torch.equal(keep, keep_mask(c, dropout_p, seed=12345).cpu())
    assert not torch.equal(keep, keep_mask(c, dropout_p, seed=12346).cpu())


def test_dropout_zero_is_the_plain_path():
    c = case(2, 2, 1, 5, 7, 3, 16, mask="pad_bool", causal=True)
    inputs = make_inputs(c)
    plain = prefix_attention(*inputs[:5], attention_mask=inputs[5], causal=True, backend="triton")
    plain.sum().backward()
    plain_grads = [t.grad.clone() for t in inputs[:5]]
    for t in inputs[:5]:
        t.grad = None
    zero = prefix_attention(*inputs[:5], attention_mask=inputs[5], causal=True, dropout_p=0.0, backend="triton")
    zero.sum().backward()
    assert torch.equal(plain, zero)
    for t, expected in zip(inputs[:5], plain_grads):
        assert torch.equal(t.grad, expected)


def test_dropout_custom_op_contract():
    c = case(1, 2, 1, 3, 4, 2, 16, mask="bool4")
    q, k, v, prefix_k, prefix_v, mask = make_inputs(c)
    args = (q, k, v, prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), mask, False, 0.25, 0.3, torch.tensor([77]),
            "triton")
    torch.library.opcheck(torch.ops.pefops.prefix_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_dropout_under_torch_compile_fullgraph():
    # the seed is a tensor drawn inside the graph: no .item() graph break, same draw as eager
    c = case(2, 2, 1, 5, 7, 3, 16, mask="pad_bool", causal=True)
    inputs = make_inputs(c)

    def step(q, k, v, prefix_k, prefix_v):
        return prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=inputs[5], causal=True, dropout_p=0.3,
                                backend="triton")

    torch.manual_seed(3)
    eager = step(*inputs[:5])
    eager.sum().backward()
    eager_grads = [t.grad.clone() for t in inputs[:5]]
    for t in inputs[:5]:
        t.grad = None
    torch.manual_seed(3)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs[:5])
    compiled.sum().backward()
    assert torch.equal(compiled, eager)
    for name, tensor, expected in zip(("q", "k", "v", "prefix_k", "prefix_v"), inputs[:5], eager_grads):
        assert_close(tensor.grad, expected, torch.float32, f"compiled grad {name}")


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
@pytest.mark.parametrize("c", [
    PrefixCase(2, 12, 12, 512, 512, 20, 64, dtype=torch.bfloat16, causal=True, mask="pad_bool", device="cuda"),
    PrefixCase(2, 8, 2, 300, 300, 30, 128, dtype=torch.float16, mask="pad_bool", device="cuda"),
    PrefixCase(1, 4, 4, 200, 200, 10, 256, dtype=torch.bfloat16, causal=True, mask="pad_bool", device="cuda"),
], ids=str)
def test_gpu_dropout_real_sizes(c):
    """Dropout at real sizes against an fp32 formula under the kernels' own keep mask: the dropout
    tiles (widest heads) and the counters of many blocks."""
    dropout_p = 0.1
    inputs = make_inputs(c)
    mask = inputs[5]
    torch.manual_seed(0)
    out = prefix_attention(*inputs[:5], attention_mask=mask, causal=c.causal, dropout_p=dropout_p, backend="triton")
    torch.manual_seed(0)
    keep = keep_mask(c, dropout_p, int(torch.randint(SEED_RANGE, (1,), dtype=torch.int64).item()))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q, k, v, prefix_k, prefix_v = exact = [t.detach().float().requires_grad_() for t in inputs[:5]]
    group = c.q_heads // c.kv_heads
    keys = torch.cat([prefix_k.expand(c.batch, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v.expand(c.batch, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    scores = q @ keys.transpose(-1, -2) / c.dim ** 0.5
    visible = torch.ones(c.batch, 1, c.sq, c.prefix + c.sk, dtype=torch.bool, device="cuda")
    visible[..., c.prefix:] &= mask[:, None, None, :]
    if c.causal:
        visible[..., c.prefix:] &= torch.ones(c.sq, c.sk, dtype=torch.bool, device="cuda").tril(c.sk - c.sq)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    expected = (probs * keep / (1 - dropout_p)) @ values
    expected.backward(grad_out.float())
    tolerance = {torch.float16: 4e-3, torch.bfloat16: 2e-2}[c.dtype]
    assert_close(out, expected, c.dtype, "out", tolerance=tolerance)
    for name, tensor, reference in zip(("q", "k", "v", "prefix_k", "prefix_v"), inputs[:5], exact):
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
