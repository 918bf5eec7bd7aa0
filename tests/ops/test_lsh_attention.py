"""Reference tier for LSH attention (pefops.ops.lsh_attention) against transformers' LSHSelfAttention
directly: outputs and the gradients of the hidden states and both projections (so the gradient of
qk in both its roles, query and key, and of v), encoder and causal, padding masks, num_hashes 1-8,
int and factorised num_buckets, chunk lengths 32/64/128, neighbours 0/1/2, the full-attention path,
lengths that are not a multiple of the chunk; hashing and sorting bit for bit; dropout; fp16/bf16;
the custom-op contract (opcheck, torch.compile); the Triton backend through the op; errors."""

import importlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pefops import backend as backends
from pefops.ops import lsh_attention, lsh_attention_qkv, lsh_attention_ref, lsh_hash, lsh_rotations, lsh_sort
from tests.ops.lsh_inputs import NAMES, LshCase, make_inputs, make_module, run_pefops, run_transformers
from tests.tolerances import assert_close

lsh_module = importlib.import_module("pefops.ops.lsh_attention")  # the module, not the function
lsh_reference = importlib.import_module("pefops.ops.lsh_reference")

CASES = [
    LshCase(seq=128),
    LshCase(seq=128, causal=True),
    LshCase(seq=128, num_hashes=1, causal=True, padding="tail"),
    LshCase(seq=128, num_hashes=3, padding="holes"),
    LshCase(seq=128, num_hashes=4, causal=True, padding="holes", num_buckets=[2, 4]),
    LshCase(seq=128, num_hashes=8, num_buckets=4, batch=1),
    LshCase(seq=96, num_hashes=5, num_buckets=[2, 2, 2], causal=True),
    LshCase(seq=128, before=0, after=0, causal=True),
    LshCase(seq=128, before=0, after=1),
    LshCase(seq=192, before=2, after=2, causal=True, padding="tail"),
    LshCase(seq=64, chunk=32, num_hashes=1, before=2, after=2),  # the window repeats a chunk
    LshCase(seq=256, chunk=64, num_hashes=2, num_buckets=[4, 2], causal=True, padding="ones"),
    LshCase(seq=256, chunk=128, num_hashes=2, num_buckets=4, after=1, batch=1),
    LshCase(seq=32, causal=True, padding="tail"),  # S == chunk: full attention
    LshCase(seq=20, num_hashes=4),  # S < chunk: full attention
    LshCase(seq=100, causal=True),  # padded to 128
    LshCase(seq=77, num_hashes=3, padding="holes", after=1),  # padded to 96, with holes
    LshCase(seq=7, chunk=32),
    LshCase(seq=128, heads=3, head_dim=12, num_hashes=2, num_buckets=16, causal=True),
]


def _compare(actual, expected, dtype=torch.float32, tolerance=None):
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a, e, dtype, name, tolerance)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_transformers(case):
    expected = run_transformers(case)
    _compare(run_pefops(case, lsh_attention), expected)


@pytest.mark.parametrize("case", CASES[:6] + CASES[13:17], ids=str)
def test_reference_matches_transformers(case):
    # the oracle the Triton tests use is transformers itself
    _compare(run_pefops(case, lsh_attention_ref), run_transformers(case))


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[15], CASES[14]], ids=str)
def test_custom_op_path_matches_transformers(case):
    # backend="torch" forces the custom op (recomputing backward) instead of the eager autograd path
    _compare(run_pefops(case, lsh_attention, backend="torch"), run_transformers(case))


@settings(max_examples=12, deadline=None)
@given(seq=st.integers(33, 160), chunk=st.sampled_from([16, 32]), num_hashes=st.integers(1, 4),
       num_buckets=st.sampled_from([2, 4, 8, [2, 2], [4, 2]]), before=st.integers(0, 2), after=st.integers(0, 1),
       causal=st.booleans(), padding=st.sampled_from([None, "tail", "holes"]), seed=st.integers(0, 50))
def test_random_configurations(seq, chunk, num_hashes, num_buckets, before, after, causal, padding, seed):
    case = LshCase(seq=seq, chunk=chunk, num_hashes=num_hashes, num_buckets=num_buckets, before=before, after=after,
                   causal=causal, padding=padding, seed=seed, batch=1, head_dim=4)
    _compare(run_pefops(case, lsh_attention), run_transformers(case))


# num_chunks_before / after larger than the number of chunks: transformers' _look_adjacent then repeats
# the query's own chunk (torch.cat([x[i:], x[:i]]) is x for |i| >= chunks), not chunk i modulo chunks
WIDE_WINDOW_CASES = [
    LshCase(seq=64, chunk=32, num_hashes=1, before=3, after=0),
    LshCase(seq=64, chunk=16, num_hashes=2, before=1, after=9, causal=True, padding="holes"),
    LshCase(seq=64, chunk=32, num_hashes=1, before=5, after=4, causal=True),
    LshCase(seq=40, chunk=16, num_hashes=1, num_buckets=4, before=4, after=1, padding="tail"),  # padded to 48
]


@pytest.mark.parametrize("path", ["reference", "eager", "torch", "triton"])
@pytest.mark.parametrize("case", WIDE_WINDOW_CASES, ids=str)
def test_window_longer_than_sequence_matches_transformers(case, path):
    if path == "triton" and not (backends.triton_interpreter_enabled() or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    op, options = (lsh_attention_ref, {}) if path == "reference" else (lsh_attention, {})
    if path in ("torch", "triton"):
        options = dict(backend=path)
    _compare(run_pefops(case, op, **options), run_transformers(case), tolerance=1e-4 if path == "triton" else None)


def test_window_longer_than_sequence_qkv_and_dropout():
    # dropout: transformers' draw over [B, H, chunks, L, window] (the eager torch path's explicit windows)
    case = LshCase(seq=64, chunk=32, num_hashes=2, before=2, after=5, causal=True, dropout=0.2)
    _compare(run_pefops(case, lsh_attention), run_transformers(case))
    # separate q and k: the same windows on both backends as the reference's
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=generator, requires_grad=True) for _ in range(3))
    options = dict(num_hashes=1, num_buckets=4, chunk_length=16, num_chunks_before=6, num_chunks_after=1,
                   causal=True, hash_seed=9)
    expected = lsh_attention_ref(q, v, k=k, **options)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    backends_to_check = ["torch"] + (["triton"] if backends.triton_interpreter_enabled() or torch.cuda.is_available()
                                     else [])
    for backend in backends_to_check:
        out = lsh_attention_qkv(q, k, v, backend=backend, **options)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        tolerance = 1e-4 if backend == "triton" else None
        assert_close(out, expected, torch.float32, f"{backend} out", tolerance)
        for name, actual, wanted in zip("qkv", grads, expected_grads):
            assert_close(actual, wanted, torch.float32, f"{backend} d{name}", tolerance)


@pytest.mark.parametrize("case", [LshCase(seq=128, causal=True, dropout=0.2),
                                  LshCase(seq=24, dropout=0.3, padding="tail")], ids=str)
def test_dropout_matches_transformers(case):
    # same RNG draws as transformers: rotations after the reseed, then one dropout of the
    # probabilities, whose shape [B, H, chunks, L, window] is transformers' own
    _compare(run_pefops(case, lsh_attention), run_transformers(case))


def test_hash_and_sort_match_transformers():
    case = LshCase(seq=128, num_hashes=3, num_buckets=[4, 2, 2], padding="holes")
    module = make_module(case)
    hidden, mask, _ = make_inputs(case)
    qk = module.query_key(hidden).view(2, 128, 2, 8).transpose(1, 2).detach()
    expected = module._hash_vectors(qk, case.num_hashes, mask)  # reseeds with hash_seed itself
    rotations = lsh_rotations(2, 8, 3, [4, 2, 2], hash_seed=case.seed + 100)
    buckets = lsh_hash(qk, rotations, [4, 2, 2], mask)
    assert torch.equal(buckets, expected)
    assert int(buckets.max()) > 16 * 2  # padding bucket 16, offsets of 17 per round
    sorted_idx, undo_idx = lsh_sort(buckets)
    want_sorted, want_undo = module._get_sorted_bucket_idx_and_undo_sorted_bucket_idx(128, expected, 3)
    assert torch.equal(sorted_idx, want_sorted) and torch.equal(undo_idx, want_undo)
    # no padding bucket (and no offset change) when the mask has no zero
    ones = torch.ones_like(mask)
    assert torch.equal(lsh_hash(qk, rotations, [4, 2, 2], ones), module._hash_vectors(qk, 3, ones))


def test_qkv_variant():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 96, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 96, dtype=torch.long)
    mask[0, 70:] = 0
    grad = torch.randn(2, 2, 96, 8)
    options = dict(num_hashes=3, num_buckets=[2, 4], chunk_length=16, num_chunks_after=1, causal=True,
                   attention_mask=mask, hash_seed=5)
    results = []
    for out in (lsh_attention_qkv(q, k, v, **options), lsh_attention_ref(q, v, k=k, **options)):
        results.append((out, *torch.autograd.grad((out * grad).sum(), (q, k, v))))
    for name, a, e in zip(("out", "dq", "dk", "dv"), *results):
        assert_close(a, e, torch.float32, name)
    # one chunk: exact causal softmax attention (no self mask, scale 1/sqrt(D))
    short = [t[:, :, :16].detach() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*short, is_causal=True)
    got = lsh_attention_qkv(*short, num_hashes=2, num_buckets=4, chunk_length=16, causal=True)
    assert_close(got, want, torch.float32, "full path vs sdpa")


def test_return_lse_and_full_path_round():
    case = LshCase(seq=64, num_hashes=3)
    qk, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    out, lse = lsh_attention(qk, v, num_hashes=3, num_buckets=4, chunk_length=16, hash_seed=1, return_lse=True)
    ref_out, ref_lse = lsh_attention_ref(qk, v, num_hashes=3, num_buckets=4, chunk_length=16, hash_seed=1,
                                         return_lse=True)
    assert lse.shape == (1, 2, 3, 64) and lse.dtype == torch.float32
    assert_close(lse, ref_lse, torch.float32, "lse")
    assert_close(out, ref_out, torch.float32, "out")
    _, lse_full = lsh_attention(qk, v, num_hashes=3, num_buckets=4, chunk_length=64, return_lse=True)
    assert lse_full.shape == (1, 2, 1, 64), case


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_smoke(dtype, monkeypatch):
    # error <= 2x that of the same-dtype transformers computation against the fp32 one (DESIGN.md);
    # the fp32 oracle hashes the half inputs in half precision, so that all three share the buckets
    torch.manual_seed(1)
    qk, v = torch.randn(1, 2, 128, 16).to(dtype), torch.randn(1, 2, 128, 16).to(dtype)
    rotations = lsh_rotations(2, 16, 2, 8, hash_seed=2, dtype=dtype)
    mask = torch.ones(1, 128, dtype=torch.long)
    mask[0, 100:] = 0
    options = dict(num_hashes=2, num_buckets=8, chunk_length=32, causal=True, rotations=rotations,
                   attention_mask=mask)
    qk_grad, v_grad = qk.clone().requires_grad_(), v.clone().requires_grad_()
    out = lsh_attention(qk_grad, v_grad, **options)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert qk_grad.grad.dtype == dtype and torch.isfinite(qk_grad.grad.float()).all()
    assert torch.isfinite(v_grad.grad.float()).all()
    eager = lsh_attention_ref(qk, v, **options).float()
    half_hash = lsh_reference.lsh_hash
    monkeypatch.setattr(lsh_reference, "lsh_hash",
                        lambda vectors, rot, buckets, mask=None: half_hash(vectors.to(dtype), rot.to(dtype), buckets,
                                                                           mask))
    exact = lsh_attention_ref(qk.float(), v.float(), **dict(options, rotations=rotations.float()))
    ours_error = (out.float() - exact).abs().max().item()
    eager_error = (eager - exact).abs().max().item()
    assert ours_error <= 2 * eager_error + 1e-3, (ours_error, eager_error)
    # and small in absolute terms (transformers' own half computation is not: it rounds lse at the
    # mask constants in half precision, e.g. -1e3 + log 2 to -999.5 in fp16)
    assert ours_error <= {torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype], ours_error


def test_float64_gradcheck():
    torch.manual_seed(0)
    qk = torch.randn(1, 1, 40, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 40, 3, dtype=torch.float64, requires_grad=True)
    rotations = lsh_rotations(1, 3, 2, 4, hash_seed=0, dtype=torch.float64)
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, 34:] = 0
    for backend in (None, "torch"):
        def fn(qk, v):
            return lsh_attention(qk, v, num_hashes=2, num_buckets=4, chunk_length=8, num_chunks_after=1, causal=True,
                                 attention_mask=mask, rotations=rotations, backend=backend)

        # the buckets do not move under the small perturbation (hashing is piecewise constant)
        assert torch.autograd.gradcheck(fn, (qk, v), eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------------------------ custom op contract


def _core_args(seq=32, chunk=8, rounds=2, key_mask=True, self_mask=True, requires_grad=True):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq, 4, requires_grad=requires_grad) for _ in range(3))
    q_idx = torch.stack([torch.randperm(seq) for _ in range(2 * rounds)]).view(1, 2, rounds * seq)
    k_idx = q_idx if self_mask else torch.stack([torch.randperm(seq) for _ in range(2 * rounds)]).view(1, 2, -1)
    mask = torch.rand(1, seq) > 0.2 if key_mask else None
    return (q, k, v, q_idx, k_idx, mask, chunk, 1, 1, True, self_mask, 1.0 if self_mask else 0.5, -1e9, -1e5, 0.0, None,
            "")


@pytest.mark.parametrize("self_mask", [True, False])
def test_opcheck(self_mask):
    args = _core_args(self_mask=self_mask)
    torch.library.opcheck(torch.ops.pefops.lsh_chunked_fwd.default, args)
    out, lse = (t.detach() for t in torch.ops.pefops.lsh_chunked_fwd(*args))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]]
    backward_args = (torch.randn_like(out), torch.randn_like(lse), *detached, out, lse, *args[6:])
    torch.library.opcheck(torch.ops.pefops.lsh_chunked_bwd.default, backward_args)


def test_core_torch_functions_match_eager_autograd():
    # the spec's chunked_forward_torch / chunked_backward_torch (recomputing) against the saving
    # eager autograd path
    q, k, v, q_idx, k_idx, mask, *config, _dropout_p, _seed, _backend = _core_args()
    names = ("chunk_length", "chunks_before", "chunks_after", "causal", "self_mask", "scale", "mask_value",
             "self_mask_value")
    kwargs = dict(zip(names, config))
    out, lse = lsh_module.chunked_forward_torch(q, k, v, q_idx, k_idx, mask, **kwargs)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = lsh_module.chunked_backward_torch(grad_out, grad_lse, q, k, v, q_idx, k_idx, mask, out, lse, **kwargs)
    eager_out, eager_lse = lsh_module.EagerChunkedAttention.apply(q, k, v, q_idx, k_idx, mask, tuple(config), 0.0)
    eager_grads = torch.autograd.grad((eager_out * grad_out).sum() + (eager_lse * grad_lse).sum(), (q, k, v))
    assert_close(out, eager_out, torch.float32, "out")
    assert_close(lse, eager_lse, torch.float32, "lse")
    for name, a, e in zip("qkv", grads, eager_grads):
        assert_close(a, e, torch.float32, "d" + name)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    rotations = lsh_rotations(2, 8, 2, [2, 4], hash_seed=0)
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 60:] = 0

    def fn(qk, v):
        return lsh_attention(qk, v, num_hashes=2, num_buckets=[2, 4], chunk_length=16, causal=True,
                             attention_mask=mask, rotations=rotations)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    qk, v, grad = torch.randn(2, 2, 100, 8), torch.randn(2, 2, 100, 8), torch.randn(2, 2, 100, 8)
    results = []
    for function in (fn, compiled):
        qk_, v_ = qk.clone().requires_grad_(), v.clone().requires_grad_()
        out = function(qk_, v_)
        results.append((out, *torch.autograd.grad((out * grad).sum(), (qk_, v_))))
    for name, a, e in zip(("out", "dqk", "dv"), results[1], results[0]):
        assert_close(a, e, torch.float32, name)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    torch.manual_seed(0)
    rotations = lsh_rotations(1, 8, 2, 4, hash_seed=0)

    def fn(qk, v):
        return lsh_attention(qk, v, num_hashes=2, num_buckets=4, chunk_length=16, causal=True, rotations=rotations)

    qk, v = torch.randn(1, 1, 64, 8, requires_grad=True), torch.randn(1, 1, 64, 8, requires_grad=True)
    out = torch.compile(fn, fullgraph=True)(qk, v)
    compiled_grads = torch.autograd.grad(out.sum(), (qk, v))
    expected = fn(qk, v)
    assert_close(out, expected, torch.float32, "out")
    for name, a, e in zip(("dqk", "dv"), compiled_grads, torch.autograd.grad(expected.sum(), (qk, v))):
        assert_close(a, e, torch.float32, name)


# ------------------------------------------------------------------------------------ backends


def test_forced_triton_on_cpu_says_why():
    qk, v = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    options = dict(num_hashes=1, num_buckets=4, chunk_length=16)
    if not backends.triton_interpreter_enabled():
        with pytest.raises(backends.BackendNotSupportedError):
            lsh_attention(qk, v, backend="triton", **options)
    else:
        # dropout runs in the kernels (tests below); here only: it no longer refuses
        assert torch.isfinite(lsh_attention(qk, v, backend="triton", dropout_p=0.1, **options)).all()
    with pytest.raises(ValueError, match="not a backend"):
        lsh_attention(qk, v, backend="cudaa", **options)


@pytest.mark.triton
@pytest.mark.parametrize("case", [LshCase(seq=64, chunk=16, num_hashes=2, num_buckets=4, causal=True, batch=1,
                                          padding="tail", head_dim=16),
                                  LshCase(seq=16, chunk=16, num_hashes=1, batch=1, head_dim=16),
                                  LshCase(seq=40, chunk=16, num_hashes=2, num_buckets=[2, 2], after=1, batch=1,
                                          head_dim=16)], ids=str)
def test_triton_backend_through_op(case):
    if not backends.triton_interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    _compare(run_pefops(case, lsh_attention, backend="triton"), run_transformers(case), tolerance=1e-4)


def test_torch_backend_of_the_op_refuses_dropout():
    args = list(_core_args(requires_grad=False))
    args[-3:] = [0.1, torch.tensor([7]), "torch"]
    with pytest.raises(ValueError, match="takes no dropout"):
        torch.ops.pefops.lsh_chunked_fwd(*args)


def _needs_triton():
    if not backends.triton_interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_dropout_through_op_matches_float64_reference(causal):
    """The full-attention path (S <= chunk: sorted order = original order, one round) with the
    kernels' dropout: out and the gradients of qk (query and normalised key) and v against the
    float64 chunked reference given the keep mask of the seed the op draws after torch.manual_seed."""
    from pefops.kernels import lsh_attention as kernels
    from tests.kernels.test_lsh_attention import reference_core

    device = _needs_triton()
    batch, heads, seq, dim, p = 2, 2, 16, 8, 0.3
    generator = torch.Generator().manual_seed(1)
    qk, v, grad = (torch.randn(batch, heads, seq, dim, generator=generator) for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 11:] = 0
    leaves = [x.to(device).requires_grad_() for x in (qk, v)]
    torch.manual_seed(5)
    out = lsh_attention(*leaves, num_hashes=2, num_buckets=4, chunk_length=16, causal=causal,
                        attention_mask=mask.to(device), dropout_p=p, backend="triton")
    grads = torch.autograd.grad((out * grad.to(device)).sum(), leaves)
    torch.manual_seed(5)
    seed = int(torch.randint(2**31 - 1, (1,), dtype=torch.int64).item())  # the op's first draw
    keep = kernels.lsh_dropout_keep_mask(batch, heads, seq, seq, 1, p, seed, device=device).cpu()
    reference = [x.double().requires_grad_() for x in (qk, v)]
    positions = torch.arange(seq).expand(batch, heads, seq)
    ref_out, _ = reference_core(reference[0], lsh_reference.len_and_dim_norm(reference[0]), reference[1], positions,
                                positions, mask.bool(), chunk_length=seq, chunks_before=0, chunks_after=0,
                                causal=causal, self_mask=True, scale=1.0, mask_value=-1e9, self_mask_value=-1e5,
                                dropout_keep=keep, dropout_p=p)
    ref_out = ref_out[:, :, 0]
    ref_grads = torch.autograd.grad((ref_out * grad.double()).sum(), reference)
    assert not keep.all()
    assert_close(out.cpu(), ref_out, torch.float32, "out")
    for name, a, e in zip(("dqk", "dv"), grads, ref_grads):
        assert_close(a.cpu(), e, torch.float32, name)


@pytest.mark.triton
def test_triton_dropout_through_op_seeds():
    """Hashed path, separate q / k: torch.manual_seed makes the kernels' dropout reproducible (out and
    gradients bit for bit), another seed draws another mask, and the op with dropout is the op."""
    device = _needs_triton()
    generator = torch.Generator().manual_seed(2)
    q, k, v, grad = (torch.randn(1, 2, 32, 8, generator=generator).to(device) for _ in range(4))
    rotations = lsh_rotations(2, 8, 2, 4, hash_seed=0, device=device)

    def run(seed, dropout_p=0.2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(seed)
        out = lsh_attention_qkv(*leaves, num_hashes=2, num_buckets=4, chunk_length=8, causal=True,
                                rotations=rotations, dropout_p=dropout_p, backend="triton")
        return (out, *torch.autograd.grad((out * grad).sum(), leaves))

    first, again, other, plain = run(3), run(3), run(4), run(3, 0.0)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], plain[0])
    assert all(torch.isfinite(t).all() for t in first)


@pytest.mark.triton
def test_triton_dropout_torch_compile_fullgraph():
    """The seed is an int64 CPU tensor drawn in the graph and passed through the custom ops: a
    full graph, with the same mask (and gradients) as eager under the same torch.manual_seed."""
    device = _needs_triton()
    generator = torch.Generator().manual_seed(4)
    qk, v, grad = (torch.randn(1, 2, 32, 8, generator=generator).to(device) for _ in range(3))
    rotations = lsh_rotations(2, 8, 2, 4, hash_seed=0, device=device)

    def fn(qk, v):
        return lsh_attention(qk, v, num_hashes=2, num_buckets=4, chunk_length=8, causal=True, rotations=rotations,
                             dropout_p=0.25, backend="triton")

    results = []
    for function in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        leaves = [qk.clone().requires_grad_(), v.clone().requires_grad_()]
        torch.manual_seed(8)
        out = function(*leaves)
        results.append((out, *torch.autograd.grad((out * grad).sum(), leaves)))
    for name, a, e in zip(("out", "dqk", "dv"), results[1], results[0]):
        assert_close(a, e, torch.float32, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton", None])
@pytest.mark.parametrize("case", [
    LshCase(seq=1000, chunk=64, num_hashes=4, num_buckets=[4, 8], causal=True, padding="tail", heads=4, head_dim=64,
            device="cuda"),
    LshCase(seq=512, chunk=128, num_hashes=2, num_buckets=8, after=1, padding="holes", heads=2, head_dim=32,
            device="cuda"),
    LshCase(seq=100, chunk=128, num_hashes=2, causal=True, heads=2, head_dim=64, device="cuda"),
], ids=str)
def test_gpu_matches_transformers(case, backend):
    # the CUDA counting sort, the Triton kernels (TF32 dots allowed) and the torch core on a GPU
    from tests.tolerances import TOLERANCE_TF32

    _compare(run_pefops(case, lsh_attention, backend=backend), run_transformers(case), tolerance=TOLERANCE_TF32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_runs(dtype):
    qk = torch.randn(2, 4, 2048, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 4, 2048, 64, device="cuda", dtype=dtype, requires_grad=True)
    out = lsh_attention(qk, v, num_hashes=4, num_buckets=32, chunk_length=64, causal=True, hash_seed=0)
    out.float().square().sum().backward()
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert torch.isfinite(qk.grad.float()).all() and torch.isfinite(v.grad.float()).all()


# ------------------------------------------------------------------------------------ errors


def _good():
    return dict(qk=torch.randn(2, 2, 64, 8), v=torch.randn(2, 2, 64, 8), num_hashes=2, num_buckets=4,
                chunk_length=16)


@pytest.mark.parametrize("change, message", [
    (dict(num_buckets=5), "even"),
    (dict(num_buckets=[4, 3]), "every factor"),
    (dict(num_buckets=0), "even"),
    (dict(num_buckets="8"), "num_buckets"),
    (dict(v=torch.randn(2, 2, 64, 6)), "head_dim mismatch"),
    (dict(v=torch.randn(2, 2, 60, 8)), r"\[batch, heads, seq\]"),
    (dict(v=torch.randn(2, 2, 64, 8, dtype=torch.float64)), "dtype"),
    (dict(qk=torch.randn(2, 64, 8)), r"\[batch, heads, seq, head_dim\]"),
    (dict(qk=torch.randint(0, 3, (2, 2, 64, 8))), "float32"),
    (dict(attention_mask=torch.ones(2, 63)), "attention_mask"),
    (dict(attention_mask=torch.ones(64)), "attention_mask"),
    (dict(chunk_length=0), "chunk_length"),
    (dict(chunk_length=16.0), "chunk_length"),
    (dict(num_chunks_before=-1), "num_chunks_before"),
    (dict(num_chunks_after=None), "num_chunks_after"),
    (dict(num_hashes=0), "num_hashes"),
    (dict(rotations=torch.randn(2, 8, 2, 3)), "rotations"),
    (dict(rotations=torch.randn(2, 6, 2, 2)), "rotations"),
    (dict(rotations=torch.randn(2, 8, 2, 2, dtype=torch.float64)), "dtype"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_errors(change, message):
    arguments = _good()
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        lsh_attention(arguments.pop("qk"), arguments.pop("v"), **arguments)


def test_qkv_errors():
    q, v = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        lsh_attention_qkv(q, torch.randn(1, 1, 32, 4), v, num_hashes=1, num_buckets=2, chunk_length=8)
    with pytest.raises(ValueError, match="dtype"):
        lsh_attention_qkv(q, q.half(), v, num_hashes=1, num_buckets=2, chunk_length=8)


def test_rotations_shape_and_seed():
    first = lsh_rotations(3, 8, 4, [4, 6], hash_seed=7)
    assert first.shape == (3, 8, 4, 5)
    assert torch.equal(first, lsh_rotations(3, 8, 4, [4, 6], hash_seed=7))
    torch.manual_seed(7)
    assert torch.equal(first, torch.randn(3, 8, 4, 5))
    assert math.isfinite(first.sum().item())
