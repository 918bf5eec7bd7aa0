"""Reference tier for prefix attention (pefops.ops.prefix_attention): the torch path (eager and the
custom op) against a naive float64 softmax over explicitly concatenated keys, every mask form, causal
alignment, grouped-query heads, shared and per-row prefixes, P = 0, rows whose sequence keys are all
masked, every gradient (float64 gradcheck), the custom-op contract (opcheck, torch.compile) and
argument errors. The helpers here serve tests/kernels/test_prefix_attention.py too."""

import importlib
import math
from dataclasses import dataclass

import pytest
import torch

from pefops import backend as backends
from pefops.ops import prefix_attention, prefix_attention_ref
from tests.tolerances import assert_close

prefix_module = importlib.import_module("pefops.ops.prefix_attention")  # the module, not the function

# mask forms: none | pad_bool | pad_int ([B, Sk]) | bool4 ([B, 1, Sq, Sk]) | heads4 (bool [1, Hq, Sq, Sk])
# | add_inf (float [B, 1, 1, Sk], 0 / -inf) | add_min (float [B, 1, Sq, Sk], 0 / finfo.min) | bool3 ([Hq, Sq, Sk])
MASKS = ["none", "pad_bool", "pad_int", "bool4", "heads4", "add_inf", "add_min", "bool3"]


@dataclass
class PrefixCase:
    batch: int
    q_heads: int
    kv_heads: int
    sq: int
    sk: int
    prefix: int
    dim: int
    value_dim: int = 0  # 0: same as dim
    dtype: torch.dtype = torch.float32
    mask: str = "none"
    causal: bool = False
    per_row: bool = False  # prefix [B, Hkv, P, D] instead of [Hkv, P, D]
    empty_row: bool = False  # the mask hides every sequence key of some query rows
    device: str = "cpu"

    def __str__(self):
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"B{self.batch}-H{self.q_heads}/{self.kv_heads}-Sq{self.sq}-Sk{self.sk}-P{self.prefix}-D{self.dim}"
                f"{f'-Dv{self.value_dim}' if self.value_dim else ''}-{dtype}-m_{self.mask}"
                f"{'-causal' if self.causal else ''}{'-rows' if self.per_row else ''}"
                f"{'-empty' if self.empty_row else ''}")


def make_mask(case: PrefixCase, generator):
    """The attention mask of a case (None for "none"); about a third of the keys hidden."""
    b, h, sq, sk = case.batch, case.q_heads, case.sq, case.sk
    shapes = {"pad_bool": (b, sk), "pad_int": (b, sk), "bool4": (b, 1, sq, sk), "heads4": (1, h, sq, sk),
              "add_inf": (b, 1, 1, sk), "add_min": (b, 1, sq, sk), "bool3": (h, sq, sk)}
    if case.mask == "none":
        return None
    keep = torch.rand(shapes[case.mask], generator=generator) > 0.35
    if case.empty_row:
        # hide every sequence key of the first query row (per-query masks) or of the first batch row
        if keep.shape[-2] > 1 and keep.dim() > 2:
            keep[..., 0, :] = False
        else:
            keep[0] = False
    if case.mask == "pad_int":
        return keep.to(torch.int64).to(case.device)
    if case.mask in ("add_inf", "add_min"):
        low = float("-inf") if case.mask == "add_inf" else torch.finfo(case.dtype).min
        return torch.zeros(keep.shape, dtype=case.dtype).masked_fill(~keep, low).to(case.device)
    return keep.to(case.device)


def make_inputs(case: PrefixCase, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    value_dim = case.value_dim or case.dim
    prefix_batch = (case.batch,) if case.per_row else ()

    def tensor(*shape):
        t = torch.randn(shape, generator=generator).to(case.dtype).to(case.device)
        return t.requires_grad_(requires_grad)

    q = tensor(case.batch, case.q_heads, case.sq, case.dim)
    k = tensor(case.batch, case.kv_heads, case.sk, case.dim)
    v = tensor(case.batch, case.kv_heads, case.sk, value_dim)
    prefix_k = tensor(*prefix_batch, case.kv_heads, case.prefix, case.dim)
    prefix_v = tensor(*prefix_batch, case.kv_heads, case.prefix, value_dim)
    return q, k, v, prefix_k, prefix_v, make_mask(case, generator)


def naive_prefix_attention(q, k, v, prefix_k, prefix_v, mask=None, causal=False, scale=None, dropout_keep=None,
                           dropout_p=0.0):
    """The definition, in float64, written out: per query head the kv head h // group, the prefix
    (shared or per row) then the sequence, a keep matrix built from the mask's form, softmax by
    max-subtraction, rows without any visible key -> 0. dropout_keep [B, Hq, Sq, P + Sk] bool: the
    normalised probabilities times dropout_keep / (1 - dropout_p)."""
    q, k, v, prefix_k, prefix_v = (t.to(torch.float64) for t in (q, k, v, prefix_k, prefix_v))
    batch, q_heads, sq, dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0).expand(batch, -1, -1, -1)
        prefix_v = prefix_v.unsqueeze(0).expand(batch, -1, -1, -1)
    prefix_len = prefix_k.shape[2]
    # sequence scores bias: 0 visible, -inf hidden, or the additive values
    bias = torch.zeros(batch, q_heads, sq, sk, dtype=torch.float64)
    if mask is not None:
        if mask.dim() == 2:  # key padding
            bias = bias.masked_fill(~(mask != 0).view(batch, 1, 1, sk), float("-inf"))
        elif mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask.expand(batch, q_heads, sq, sk), float("-inf"))
        else:
            bias = bias + mask.to(torch.float64).expand(batch, q_heads, sq, sk)
    if causal:  # bottom-right aligned: query i sees key j when j <= i + Sk - Sq
        for i in range(sq):
            bias[:, :, i, max(i + sk - sq + 1, 0):] = float("-inf")
    out = torch.zeros(batch, q_heads, sq, v.shape[-1], dtype=torch.float64)
    for h in range(q_heads):
        g = h // group
        keys = torch.cat([prefix_k[:, g], k[:, g]], dim=1)  # [B, P + Sk, D]
        values = torch.cat([prefix_v[:, g], v[:, g]], dim=1)
        scores = torch.einsum("bqd,bkd->bqk", q[:, h], keys) * scale
        scores = torch.cat([scores[..., :prefix_len], scores[..., prefix_len:] + bias[:, h]], dim=-1)
        top = scores.max(-1, keepdim=True).values
        top = torch.where(torch.isinf(top) & (top < 0), torch.zeros_like(top), top)
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(1e-300), torch.zeros_like(weights))
        if dropout_keep is not None:
            weights = weights * dropout_keep[:, h].to(torch.float64) / (1.0 - dropout_p)
        out[:, h] = torch.einsum("bqk,bkd->bqd", weights, values)
    return out


def check_against_naive(case: PrefixCase, backend=None, seed=0, grads=True):
    """Output and every gradient (q, k, v, prefix_k, prefix_v) of prefix_attention against the naive
    formula in float64 (fp32 inputs: 1e-5, or 1e-4 where a kernel dot runs in TF32; 16-bit: twice the
    error of the same-dtype reference)."""
    inputs = make_inputs(case, seed)
    mask = inputs[5]
    out = prefix_attention(*inputs[:5], attention_mask=mask, causal=case.causal, backend=backend)
    assert out.dtype == case.dtype and out.shape == (case.batch, case.q_heads, case.sq, case.value_dim or case.dim)
    exact = [t.detach().to(torch.float64).requires_grad_() for t in inputs[:5]]
    expected = naive_prefix_attention(*exact, mask=mask, causal=case.causal)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(case.dtype).to(case.device)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    tolerance = None
    if case.dtype == torch.float32 and backend == "triton" and case.device == "cuda":
        tolerance = 1e-4 if torch.backends.cuda.matmul.allow_tf32 else None
    low_precision = case.dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        # attention-like reduction: at most twice the error of the same-dtype reference (plus a floor)
        same_dtype = [t.detach().requires_grad_() for t in inputs[:5]]
        low = prefix_attention_ref(*same_dtype, attention_mask=mask, causal=case.causal)
        tolerance = _relative_tolerance(low, expected)
    assert_close(out, expected, case.dtype, "out", tolerance=tolerance)
    if not grads:
        return
    out.backward(grad_out)
    expected.backward(grad_out.to(torch.float64))
    if low_precision:
        low.backward(grad_out)
    for index, (name, tensor, reference) in enumerate(zip(names, inputs[:5], exact)):
        assert tensor.grad is not None, f"{name} got no gradient"
        if low_precision:
            tolerance = _relative_tolerance(same_dtype[index].grad, reference.grad)
        assert_close(tensor.grad, reference.grad, case.dtype, f"grad {name}", tolerance=tolerance)


def _relative_tolerance(same_dtype_result, exact):
    """Twice the same-dtype reference's error on the tensor's scale (assert_close's measure), at least 2e-3."""
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    error = (same_dtype_result.detach().double() - exact.detach()).abs().max().item() if exact.numel() else 0.0
    return max(2 * error / scale, 2e-3)


# ------------------------------------------------------------------------------------ forward and gradients


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_forms_match_naive(mask, causal):
    check_against_naive(PrefixCase(2, 4, 2, 6, 9, 3, 8, mask=mask, causal=causal))


@pytest.mark.parametrize("c", [
    PrefixCase(1, 1, 1, 1, 1, 1, 1),
    PrefixCase(2, 6, 2, 7, 7, 5, 24, causal=True),  # grouped-query, group 3
    PrefixCase(2, 4, 4, 5, 11, 4, 16, value_dim=12, per_row=True, mask="pad_bool"),  # per-row prefix, Dv != D
    PrefixCase(3, 4, 1, 7, 9, 0, 8, mask="bool4"),  # P = 0: plain attention (multi-query heads)
    PrefixCase(2, 2, 2, 4, 13, 6, 8, causal=True, mask="add_inf"),  # Sq < Sk, causal bottom-right
    PrefixCase(2, 2, 1, 9, 5, 2, 8, causal=True),  # Sq > Sk: first query rows see only the prefix
    PrefixCase(2, 4, 2, 1, 17, 20, 16, causal=True, mask="pad_int"),  # decoding step: Sq = 1
    PrefixCase(2, 2, 2, 5, 0, 3, 8),  # no sequence keys at all: only the prefix
    PrefixCase(2, 2, 1, 6, 8, 3, 8, mask="bool4", empty_row=True, per_row=True),
    PrefixCase(3, 2, 2, 6, 8, 3, 8, mask="pad_bool", empty_row=True, causal=True),
], ids=str)
def test_shapes_match_naive(c):
    check_against_naive(c)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_custom_op_and_eager_paths_agree(backend):
    # backend="torch" runs the custom ops with the explicit backward; None the eager autograd path
    check_against_naive(PrefixCase(2, 4, 2, 5, 7, 3, 8, mask="add_min", causal=True, per_row=True), backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check_against_naive(PrefixCase(2, 4, 2, 9, 12, 4, 16, dtype=dtype, mask="pad_bool", causal=True))


def test_rows_without_visible_sequence_keys_attend_to_the_prefix():
    case = PrefixCase(2, 2, 2, 3, 5, 4, 8)
    q, k, v, prefix_k, prefix_v, _ = make_inputs(case, requires_grad=False)
    hidden = torch.zeros(2, 5, dtype=torch.bool)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=hidden)
    prefix_only = prefix_attention(q, k[:, :, :0], v[:, :, :0], prefix_k, prefix_v)
    assert_close(out, prefix_only, torch.float32, "prefix only")
    assert out.abs().sum() > 0
    # without a prefix such rows come back as zeros (as scaled_dot_product_attention gives)
    empty = prefix_attention(q, k, v, None, None, attention_mask=hidden, backend="torch")
    assert torch.equal(empty, torch.zeros_like(empty))


def test_prefix_dtype_is_cast_to_q_dtype_with_gradient():
    case = PrefixCase(2, 2, 2, 4, 5, 3, 8, dtype=torch.float64)
    q, k, v, prefix_k, prefix_v, _ = make_inputs(case)
    prefix_k32 = prefix_k.detach().float().requires_grad_()
    out = prefix_attention(q, k, v, prefix_k32, prefix_v)
    out.sum().backward()
    assert prefix_k32.grad is not None and prefix_k32.grad.dtype == torch.float32


def test_scale_argument():
    case = PrefixCase(1, 2, 2, 4, 5, 3, 8)
    inputs = make_inputs(case, requires_grad=False)
    out = prefix_attention(*inputs[:5], scale=0.3)
    assert_close(out, naive_prefix_attention(*inputs[:5], scale=0.3), torch.float32, "scale")


@pytest.mark.parametrize("backend", [None, "torch"])
def test_gradcheck_float64(backend):
    case = PrefixCase(2, 4, 2, 4, 5, 3, 6, dtype=torch.float64, mask="bool4", causal=True)
    q, k, v, prefix_k, prefix_v, mask = make_inputs(case)
    torch.autograd.gradcheck(
        lambda *a: prefix_attention(*a, attention_mask=mask, causal=True, backend=backend),
        (q, k, v, prefix_k, prefix_v))
    per_row = make_inputs(PrefixCase(2, 2, 1, 3, 4, 2, 5, dtype=torch.float64, mask="add_inf", per_row=True))
    torch.autograd.gradcheck(lambda *a: prefix_attention(*a, attention_mask=per_row[5], backend=backend),
                             per_row[:5])


def test_dropout_on_the_torch_backend_is_sdpa_under_autograd():
    q, k, v, prefix_k, prefix_v, _ = make_inputs(PrefixCase(2, 2, 2, 4, 5, 3, 8))
    torch.manual_seed(0)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, dropout_p=0.5, backend="torch")
    out.sum().backward()
    assert prefix_k.grad is not None
    assert not torch.allclose(out, prefix_attention(q, k, v, prefix_k, prefix_v))
    torch.manual_seed(0)  # SDPA draws from torch's generator: reproducible
    again = prefix_attention(q, k, v, prefix_k, prefix_v, dropout_p=0.5, backend="torch")
    assert torch.equal(out, again)


def test_triton_declares_no_dropout_limit():
    # the kernels implement dropout (tests/kernels/test_prefix_attention.py checks them)
    problem = backends.Problem(torch.device("cuda"), torch.bfloat16, "forward",
                               {"head_dim": 64, "value_dim": 64, "dropout": 1})
    assert prefix_module._triton_limits(problem) == []


def test_custom_op_torch_backend_refuses_dropout():
    q, k, v, prefix_k, prefix_v, _ = make_inputs(PrefixCase(1, 2, 2, 3, 4, 2, 8), requires_grad=False)
    with pytest.raises(ValueError, match="takes no dropout"):
        torch.ops.pefops.prefix_attention_fwd(q, k, v, prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), None, False,
                                              0.3, 0.1, torch.tensor([5]), "torch")


# ------------------------------------------------------------------------------------ custom-op contract


def test_opcheck():
    case = PrefixCase(2, 4, 2, 5, 6, 3, 8, mask="bool4")
    q, k, v, prefix_k, prefix_v, mask = make_inputs(case)
    args = (q, k, v, prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), mask.view(2, 1, 5, 6), True, 0.4, 0.0, None,
            "torch")
    torch.library.opcheck(torch.ops.pefops.prefix_attention_fwd.default, args)
    out, lse = (t.detach() for t in torch.ops.pefops.prefix_attention_fwd(*args))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]]
    backward_args = (torch.randn(out.shape), *detached, out, lse, True, 0.4, 0.0, None, [True, False, True, True, True],
                     "torch")
    torch.library.opcheck(torch.ops.pefops.prefix_attention_bwd.default, backward_args)


def test_torch_compile_fullgraph_matches_eager():
    case = PrefixCase(2, 4, 2, 5, 7, 3, 8, mask="pad_int", causal=True)
    inputs = make_inputs(case)
    mask = inputs[5]

    def step(q, k, v, prefix_k, prefix_v):
        return prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask=mask, causal=True)

    eager = step(*inputs[:5])
    eager.sum().backward()
    eager_grads = [t.grad.clone() for t in inputs[:5]]
    for t in inputs[:5]:
        t.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs[:5])
    compiled.sum().backward()
    assert_close(compiled, eager, torch.float32, "compiled out")
    for name, tensor, expected in zip(("q", "k", "v", "prefix_k", "prefix_v"), inputs[:5], eager_grads):
        assert_close(tensor.grad, expected, torch.float32, f"compiled grad {name}")


# ------------------------------------------------------------------------------------ errors


def _valid():
    return make_inputs(PrefixCase(2, 4, 2, 5, 6, 3, 8), requires_grad=False)[:5]


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "q": a["q"][0]}, "q must be a tensor"),
    (lambda a: {**a, "q": a["q"].long()}, "float32, float16 or bfloat16"),
    (lambda a: {**a, "k": a["k"].half()}, "k must have q's dtype"),
    (lambda a: {**a, "k": a["k"][..., :4]}, "head_dim=8"),
    (lambda a: {**a, "k": a["k"][:1]}, "batch=2"),
    (lambda a: {**a, "v": a["v"][:, :, :3]}, "v must be"),
    (lambda a: {**a, "q": a["q"][:, :3]}, "multiple of k/v's heads"),
    (lambda a: {**a, "prefix_k": a["prefix_k"][:1]}, "prefix_k must be"),
    (lambda a: {**a, "prefix_v": a["prefix_v"][..., :5]}, "prefix_v must be"),
    (lambda a: {**a, "prefix_k": a["prefix_k"].expand(3, -1, -1, -1)}, "prefix_k must be"),
    (lambda a: {**a, "prefix_v": a["prefix_v"][:, :2]}, "same batch, kv_heads and length"),
    (lambda a: {**a, "prefix_v": None}, "both be given"),
    (lambda a: {**a, "prefix_k": a["prefix_k"][0, 0]}, "prefix_k must be a tensor"),
    (lambda a: {**a, "attention_mask": torch.ones(2, 5, dtype=torch.bool)}, "key padding and must have shape"),
    (lambda a: {**a, "attention_mask": torch.ones(2, 6)}, "must be bool"),
    (lambda a: {**a, "attention_mask": torch.ones(2, 1, 5, 7, dtype=torch.bool)}, "does not broadcast"),
    (lambda a: {**a, "attention_mask": torch.ones(2, 3, 5, 6, dtype=torch.bool)}, "heads size 3"),
    (lambda a: {**a, "attention_mask": torch.ones(2, 1, 5, 6, dtype=torch.int32)}, "bool .True = attend"),
    (lambda a: {**a, "attention_mask": torch.ones(6, dtype=torch.bool)}, "3-D/4-D broadcastable"),
    (lambda a: {**a, "attention_mask": [1, 0]}, "must be a tensor or None"),
    (lambda a: {**a, "causal": 1}, "causal must be a bool"),
    (lambda a: {**a, "scale": "0.1"}, "scale must be a float"),
    (lambda a: {**a, "dropout_p": 1.0}, "dropout_p must be"),
])
def test_errors(change, message):
    q, k, v, prefix_k, prefix_v = _valid()
    arguments = change({"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v})
    with pytest.raises(ValueError, match=message):
        prefix_attention(**arguments)


def test_misspelt_backend_is_rejected():
    with pytest.raises(ValueError, match="not a backend"):
        prefix_attention(*_valid(), backend="trition")


def test_triton_limits_state_the_head_dim():
    problem = backends.Problem(torch.device("cuda"), torch.float16, "forward",
                               {"head_dim": 320, "value_dim": 64, "dropout": 0})
    reasons = prefix_module._triton_limits(problem)
    assert reasons and "head_dim 320" in reasons[0]
