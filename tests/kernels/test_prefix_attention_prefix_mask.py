"""Triton tier: prefix_attention with a mask whose columns cover [prefix ; keys] (width P + Sk; issue 15:
rows of a mixed-task batch hide the prefix slots that are not theirs) on the Triton backend (under
TRITON_INTERPRET=1 on CPU, on the device where there is one) against the torch backend, which defines
the semantics: output and every gradient, bool and additive masks, broadcast dimensions (stride 0),
causal and not, GQA, shared and per-row prefixes, rows whose prefix slots are all hidden, query rows
with no visible key at all, dropout (against the dense formula under the kernels' own keep mask).
The gpu tier at the end runs real sizes in bf16."""

import importlib

import pytest
import torch

from pefops import backend as backends
from pefops.ops import prefix_attention
from tests.ops.test_prefix_attention import PrefixCase, make_inputs
from tests.tolerances import assert_close

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "prefix_k", "prefix_v")

# mask forms over [prefix ; keys]:
#   slots      [B, 1, 1, P + Sk] bool: row b keeps its first lengths[b] slots and its unpadded keys (hf/row_prefix.py)
#   slots_inf  the same as an additive 0 / -inf mask
#   rows       [B, 1, Sq, P + Sk] bool, every column random (per query row)
#   heads      [1, Hq, Sq, P + Sk] bool random (broadcast over the batch)
#   bias3      [Hq, Sq, P + Sk] float additive: random real values, some -inf, some finfo.min
#   expanded   slots expanded to [B, Hq, Sq, P + Sk] (a stride-0 view)
FORMS = ("slots", "slots_inf", "rows", "heads", "bias3", "expanded")


def covering_mask(c: PrefixCase, form: str, lengths, empty_query=False, seed=1):
    """The [prefix ; keys] mask of `form` for case c (lengths: visible prefix slots per row for the
    slot forms). empty_query: query row 0 of batch row 0 sees no column at all (per-query forms) or
    batch row 0 has no slot and no key (slot forms)."""
    generator = torch.Generator().manual_seed(seed)
    b, h, sq, width = c.batch, c.q_heads, c.sq, c.prefix + c.sk
    if form in ("slots", "slots_inf", "expanded"):
        slots = torch.arange(c.prefix)[None, :] < torch.tensor(lengths)[:, None]
        keys = torch.rand(b, c.sk, generator=generator) > 0.3
        keep = torch.cat([slots, keys], 1)
        if empty_query:
            keep[0] = False
        keep = keep[:, None, None, :]
    else:
        shape = {"rows": (b, 1, sq, width), "heads": (1, h, sq, width), "bias3": (h, sq, width)}[form]
        keep = torch.rand(shape, generator=generator) > 0.35
        if empty_query:
            keep[..., 0, :] = False
    if form == "slots_inf":
        return torch.zeros(keep.shape, dtype=c.dtype).masked_fill(~keep, float("-inf")).to(DEVICE)
    if form == "bias3":
        bias = torch.randn(keep.shape, generator=generator).masked_fill(~keep, float("-inf"))
        bias[..., 1, : c.prefix] = torch.finfo(c.dtype).min  # finfo.min stays finite: such slots average
        return bias.to(c.dtype).to(DEVICE)
    keep = keep.to(DEVICE)
    return keep.expand(b, h, sq, width) if form == "expanded" else keep


def run(c: PrefixCase, mask, backend, dropout_p=0.0, torch_seed=0):
    """(out, grads) of one backend on fresh copies of the case's inputs."""
    inputs = make_inputs(c)[:5]
    torch.manual_seed(torch_seed)
    out = prefix_attention(*inputs, attention_mask=mask, causal=c.causal, dropout_p=dropout_p, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(c.dtype).to(DEVICE)
    out.backward(grad_out)
    return out, [t.grad for t in inputs], grad_out


def check_against_torch_backend(c: PrefixCase, mask):
    """Triton against the torch backend: fp32 at the fp32 tolerance; 16-bit within twice the 16-bit
    torch backend's own error against the fp32 torch backend (a floor of the dtype's tolerance)."""
    out, grads, _ = run(c, mask, "triton")
    wide = PrefixCase(**{**c.__dict__, "dtype": torch.float32})
    wide_mask = mask.float() if mask.is_floating_point() else mask
    expected, expected_grads, _ = run(wide, wide_mask, "torch")
    tolerances = [None] * 6
    if c.dtype != torch.float32:
        same, same_grads, _ = run(c, mask, "torch")
        tolerances = [_twice_error(a, b) for a, b in zip([same, *same_grads], [expected, *expected_grads])]
    assert_close(out, expected, c.dtype, "out", tolerance=tolerances[0])
    for name, got, reference, tolerance in zip(NAMES, grads, expected_grads, tolerances[1:]):
        assert_close(got, reference, c.dtype, f"grad {name}", tolerance=tolerance)
    return out, grads


def _twice_error(same_dtype, exact):
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    error = (same_dtype.double() - exact.double()).abs().max().item() if exact.numel() else 0.0
    return max(2 * error / scale, 2e-3)


def case(*args, **kwargs):
    return PrefixCase(*args, device=DEVICE, **kwargs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_forms_match_torch_backend(form, causal):
    # GQA (group 2), per-row prefixes, one row without any prefix slot, one with all of them
    c = case(3, 4, 2, 6, 7, 5, 16, per_row=True, causal=causal)
    check_against_torch_backend(c, covering_mask(c, form, [5, 0, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["slots", "rows"])
def test_fully_hidden_rows(dtype, form):
    # a row with no prefix slot and no key (slot form) or a query row seeing no column (per-query
    # form): zeros out, no gradient through it; the other rows as the torch backend computes them
    c = case(2, 2, 1, 5, 6, 4, 16, dtype=dtype, per_row=True, causal=True)
    out, grads = check_against_torch_backend(c, covering_mask(c, form, [0, 4], empty_query=True))
    hidden = out[0] if form == "slots" else out[:, :, 0]
    assert hidden.abs().sum() == 0
    if form == "slots":
        assert grads[0][0].abs().sum() == 0 and grads[3][0].abs().sum() == 0 and grads[4][0].abs().sum() == 0


def test_float16_bias_and_shared_prefix():
    # a prefix shared by the batch ([Hkv, P, D]), hidden per row and query by an additive mask; its
    # gradient sums the rows that see it
    c = case(2, 2, 2, 7, 9, 6, 24, dtype=torch.float16, value_dim=16)
    check_against_torch_backend(c, covering_mask(c, "bias3", None))


@pytest.mark.parametrize("c", [
    case(2, 4, 2, 33, 37, 20, 24, causal=True, per_row=True),  # Sq < Sk, prefix over two blocks
    case(1, 2, 1, 37, 21, 17, 16, causal=True),  # Sq > Sk: some query rows see only (or none of) the prefix
], ids=str)
@pytest.mark.parametrize("form", ["slots", "rows"])
def test_many_small_blocks(c, form, monkeypatch):
    # 16 x 16 tiles: several prefix and sequence blocks per program, the causal block skipping of every
    # kernel, and prefix blocks whose mask columns straddle the prefix / sequence edge
    for module in ("prefix_attention", "prefix_attention_bwd"):
        monkeypatch.setattr(backends.import_kernels(module), "tile_sizes", lambda *args, **kwargs: (16, 16, 4, 1))
    lengths = [c.prefix, 3][: c.batch]
    check_against_torch_backend(c, covering_mask(c, form, lengths))


def test_decoding_step_and_no_sequence_keys():
    c = case(2, 2, 2, 1, 9, 5, 16, per_row=True, causal=True)
    check_against_torch_backend(c, covering_mask(c, "slots", [5, 2]))
    c = case(2, 2, 2, 5, 0, 4, 16, per_row=True)
    check_against_torch_backend(c, covering_mask(c, "rows", None))


@pytest.mark.parametrize("form", ["slots", "rows"])
def test_dropout_against_the_dense_formula(form):
    # the kernels' keep mask (one Philox draw per [prefix ; keys] column) applied to the dense softmax
    # with the covering mask, float64
    kernels = importlib.import_module("pefops.kernels.prefix_attention")
    c = case(2, 4, 2, 7, 9, 5, 16, per_row=True, causal=True)
    mask = covering_mask(c, form, [5, 2])
    dropout_p = 0.3
    out, grads, grad_out = run(c, mask, "triton", dropout_p=dropout_p, torch_seed=11)
    torch.manual_seed(11)
    seed = int(torch.randint(2**31 - 1, (1,), dtype=torch.int64).item())
    keep = kernels.prefix_dropout_keep_mask(c.batch, c.q_heads, c.sq, c.prefix, c.sk, dropout_p, seed, device=DEVICE)
    exact = [t.detach().double().requires_grad_() for t in make_inputs(c)[:5]]
    q, k, v, prefix_k, prefix_v = exact
    group = c.q_heads // c.kv_heads
    keys = torch.cat([prefix_k, k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v, v], 2).repeat_interleave(group, 1)
    visible = mask.expand(c.batch, c.q_heads, c.sq, c.prefix + c.sk).clone()
    visible[..., c.prefix:] &= torch.ones(c.sq, c.sk, dtype=torch.bool, device=DEVICE).tril(c.sk - c.sq)
    scores = (q @ keys.transpose(-1, -2) / c.dim ** 0.5).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    expected = (probs * keep / (1 - dropout_p)) @ values
    expected.backward(grad_out.double())
    assert_close(out, expected, c.dtype, "out")
    for name, got, reference in zip(NAMES, grads, exact):
        assert_close(got, reference.grad, c.dtype, f"grad {name}")


# ------------------------------------------------------------------------------------ gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize("c, form", [
    (PrefixCase(8, 16, 16, 512, 512, 20, 64, dtype=torch.bfloat16, causal=True, per_row=True, device="cuda"), "slots"),
    (PrefixCase(4, 16, 4, 1023, 1023, 200, 128, dtype=torch.bfloat16, per_row=True, device="cuda"), "slots_inf"),
    (PrefixCase(2, 8, 8, 333, 333, 30, 256, dtype=torch.bfloat16, causal=True, per_row=True, device="cuda"), "rows"),
    (PrefixCase(2, 8, 2, 123, 700, 20, 64, dtype=torch.float16, device="cuda"), "bias3"),
], ids=str)
def test_gpu_real_sizes(c, form):
    # rows of a mixed-task batch: a quarter with the full prefix, some with part, the rest with none
    lengths = [(c.prefix, c.prefix // 2, 0, 0)[row % 4] for row in range(c.batch)]
    check_against_torch_backend(c, covering_mask(c, form, lengths))
