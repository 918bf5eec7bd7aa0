"""Triton tier: the LSH attention kernels (kernels/lsh_attention.py, kernels/lsh_attention_bwd.py)
under TRITON_INTERPRET=1 on CPU (on a GPU machine the same tests run on the device), against an
independent float64 version of the chunked core written the plain way (gather the sorted rows, cut
into chunks, concatenate the neighbour chunks with torch.roll over the chunk axis, scores, masks,
logsumexp, softmax, PV, scatter back to the original positions) with autograd for the gradients,
and the bucket ids against transformers' own formula (torch.argmax over cat([x, -x]))."""

import pytest
import torch

from pefops.kernels import lsh_attention as kernels
from tests.tolerances import assert_close

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------- references


class Fp32LogSumExp(torch.autograd.Function):
    """float64 logsumexp rounded to float32, with torch's logsumexp backward exp(x - result): what
    transformers computes in fp32 (its lse is an fp32 value, and exp(s - lse) uses that value). Where
    lse is a mask constant (-1e5 + log 2) the rounding is visible: the probabilities sum to 1 - 2e-3."""

    @staticmethod
    def forward(ctx, scores, dim):
        result = torch.logsumexp(scores, dim=dim).float().to(scores.dtype)
        ctx.save_for_backward(scores, result)
        ctx.dim = dim
        return result

    @staticmethod
    def backward(ctx, grad):
        scores, result = ctx.saved_tensors
        return grad.unsqueeze(ctx.dim) * torch.exp(scores - result.unsqueeze(ctx.dim)), None


def reference_core(q, k, v, q_idx, k_idx, key_mask, *, chunk_length, chunks_before, chunks_after, causal,
                   self_mask, scale, mask_value, self_mask_value, dropout_keep=None, dropout_p=0.0):
    """float64 (out_rounds [B, H, nh, S, Dv], lse_rounds [B, H, nh, S]); differentiable in q, k, v.
    dropout_keep: None or the keep mask [B, H, nh * S, window * L] (sorted queries x window slots),
    applied to the window probabilities after the softmax with 1 / (1 - dropout_p); lse unchanged."""
    batch, heads, seq, head_dim = q.shape
    value_dim = v.shape[-1]
    total = q_idx.shape[-1]
    rounds, chunks = total // seq, total // chunk_length

    def gather(x, idx):
        return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))

    def neighbours(x):  # [B, H, NC, L, ...] -> [B, H, NC, window * L, ...]: chunk c sees c - before .. c + after
        # as transformers' _look_adjacent: a step |offset| >= NC chunks away is chunk c itself, not c + offset mod NC
        parts = [torch.roll(x, shifts=-offset if abs(offset) < chunks else 0, dims=2)
                 for offset in range(-chunks_before, chunks_after + 1)]
        return torch.cat(parts, dim=3)

    qs = gather(q.double(), q_idx).view(batch, heads, chunks, chunk_length, head_dim)
    ks = neighbours(gather(k.double(), k_idx).view(batch, heads, chunks, chunk_length, head_dim))
    vs = neighbours(gather(v.double(), k_idx).view(batch, heads, chunks, chunk_length, value_dim))
    q_pos = q_idx.view(batch, heads, chunks, chunk_length)[..., :, None]
    k_pos = neighbours(k_idx.view(batch, heads, chunks, chunk_length))[..., None, :]
    scores = torch.einsum("bhcid,bhcjd->bhcij", qs, ks) * scale
    keep = torch.ones_like(scores, dtype=torch.bool)
    if key_mask is not None:
        key_keep = key_mask.bool()[:, None, :].expand(-1, heads, -1).gather(2, k_idx)
        keep = keep & neighbours(key_keep.view(batch, heads, chunks, chunk_length))[..., None, :]
    if causal:
        keep = keep & (q_pos >= k_pos)
    scores = torch.where(keep, scores, float(mask_value))
    if self_mask:
        scores = torch.where(q_pos == k_pos, float(self_mask_value), scores)
    lse = Fp32LogSumExp.apply(scores, -1)
    probs = torch.exp(scores - lse[..., None])
    if dropout_keep is not None:
        keep = dropout_keep.view(batch, heads, chunks, chunk_length, -1).to(probs.device)
        probs = torch.where(keep, probs / (1.0 - dropout_p), 0.0)
    out = torch.einsum("bhcij,bhcjd->bhcid", probs, vs)
    # sorted position p of round p // S holds the query at original position q_idx[p]
    place = q_idx.view(batch, heads, rounds, seq)
    out_rounds = torch.zeros(batch, heads, rounds, seq, value_dim, dtype=out.dtype, device=out.device).scatter(
        3, place[..., None].expand(-1, -1, -1, -1, value_dim), out.reshape(batch, heads, rounds, seq, value_dim))
    lse_rounds = torch.zeros(batch, heads, rounds, seq, dtype=lse.dtype, device=lse.device).scatter(
        3, place, lse.reshape(batch, heads, rounds, seq))
    return out_rounds, lse_rounds


def random_sorted_indices(batch, heads, rounds, seq, generator):
    """[B, H, nh * S]: each round a random permutation of 0 .. S-1 (what a stable bucket sort gives)."""
    return torch.stack([torch.stack([torch.cat([torch.randperm(seq, generator=generator) for _ in range(rounds)])
                                     for _ in range(heads)]) for _ in range(batch)])


def mask_constants(dtype):
    return (-1e4, -1e3) if dtype == torch.float16 else (-1e9, -1e5)


def make_case(batch, heads, seq, head_dim, rounds, dtype, *, value_dim=None, padding=False, shared=True, seed=0,
              device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    value_dim = head_dim if value_dim is None else value_dim
    q = torch.randn(batch, heads, seq, head_dim, generator=generator)
    k = torch.randn(batch, heads, seq, head_dim, generator=generator) * head_dim ** -0.5
    v = torch.randn(batch, heads, seq, value_dim, generator=generator)
    q_idx = random_sorted_indices(batch, heads, rounds, seq, generator)
    k_idx = q_idx if shared else random_sorted_indices(batch, heads, rounds, seq, generator)
    key_mask = None
    if padding:
        key_mask = torch.ones(batch, seq, dtype=torch.bool)
        key_mask[0, seq - seq // 3:] = False  # a padded tail
        if batch > 1:
            key_mask[1, : seq // 4] = False  # left padding
    g_out = torch.randn(batch, heads, rounds, seq, value_dim, generator=generator)
    g_lse = torch.randn(batch, heads, rounds, seq, generator=generator)
    cast = lambda x: x.to(dtype).to(device)  # noqa: E731
    to_device = lambda x: None if x is None else x.to(device)  # noqa: E731
    return (cast(q), cast(k), cast(v), to_device(q_idx), to_device(k_idx), to_device(key_mask), cast(g_out),
            g_lse.to(device))


def check_core(batch, heads, seq, head_dim, rounds, chunk_length, before, after, causal, self_mask, dtype, *,
               padding=False, shared=True, value_dim=None, scale=1.0, seed=0, grad_lse=True, dropout_p=0.0,
               dropout_seed=0):
    q, k, v, q_idx, k_idx, key_mask, g_out, g_lse = make_case(batch, heads, seq, head_dim, rounds, dtype,
                                                              value_dim=value_dim, padding=padding, shared=shared,
                                                              seed=seed)
    mask_value, self_mask_value = mask_constants(dtype)
    kwargs = dict(chunk_length=chunk_length, chunks_before=before, chunks_after=after, causal=causal,
                  self_mask=self_mask, scale=scale, mask_value=mask_value, self_mask_value=self_mask_value)
    drop = dict(dropout_p=dropout_p, seed=dropout_seed) if dropout_p > 0.0 else {}
    out, lse = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs, **drop)
    assert out.dtype == v.dtype and lse.dtype == torch.float32
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    reference_drop = {}
    if dropout_p > 0.0:
        keep = kernels.lsh_dropout_keep_mask(batch, heads, rounds * seq, chunk_length, 1 + before + after, dropout_p,
                                             dropout_seed, device=DEVICE)
        reference_drop = dict(dropout_keep=keep.cpu(), dropout_p=dropout_p)
    ref_out, ref_lse = reference_core(*leaves, cpu(q_idx), cpu(k_idx), cpu(key_mask), **kwargs, **reference_drop)
    assert_close(out.cpu(), ref_out, dtype, "out")
    assert_close(lse.cpu(), ref_lse, dtype, "lse")
    if not grad_lse:
        g_lse = torch.zeros_like(g_lse)
    ((ref_out * g_out.cpu().double()).sum() + (ref_lse * g_lse.cpu().double()).sum()).backward()
    grads = kernels.lsh_chunked_backward(g_out, g_lse if grad_lse else None, q, k, v, q_idx, k_idx, key_mask, out,
                                         lse, **kwargs, **drop)
    for name, grad, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert grad.shape == leaf.shape
        assert_close(grad.cpu(), leaf.grad, dtype, name)
    return out, lse, grads


# ------------------------------------------------------------------------------- chunked core


@pytest.mark.parametrize("rounds, seq, chunk, before, after", [
    (1, 16, 16, 1, 0),  # one chunk: the window is the same chunk twice
    (1, 16, 16, 2, 2),  # one chunk five times
    (2, 16, 16, 1, 1),  # two chunks, one per round: wrap-around across the round boundary
    (3, 32, 16, 0, 0),  # six chunks, no neighbours
    (2, 32, 16, 1, 0),  # transformers' default window, four chunks
    (1, 64, 16, 2, 1),  # four chunks, a window of four
    (3, 16, 16, 2, 1),  # three chunks, window of four: repeats
    (1, 32, 16, 3, 0),  # two chunks, three before: the step 3 away is the own chunk (transformers), not 3 mod 2
    (2, 16, 16, 1, 4),  # two chunks, four after: steps 2, 3, 4 away are the own chunk
    (2, 14, 7, 1, 1),  # chunk lengths the blocks do not divide: row masks
    (1, 48, 24, 1, 0),
    (1, 37, 37, 0, 0),  # the full-attention path: one chunk of any length, no neighbours
    (2, 100, 50, 1, 0),  # two blocks per chunk, the second partial
])
@pytest.mark.parametrize("causal", [False, True])
def test_core_windows_fp32(rounds, seq, chunk, before, after, causal):
    check_core(1, 2, seq, 16, rounds, chunk, before, after, causal, True, torch.float32, padding=True)


@pytest.mark.parametrize("self_mask, shared", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("padding", [False, True])
def test_core_masks_and_separate_keys(self_mask, shared, padding):
    check_core(2, 2, 32, 16, 2, 16, 1, 1, True, self_mask, torch.float32, padding=padding, shared=shared,
               scale=0.37, seed=3)


@pytest.mark.parametrize("head_dim, value_dim", [(64, 64), (24, 24), (24, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_core_head_dims_and_dtypes(head_dim, value_dim, dtype):
    check_core(1, 2, 32, head_dim, 2, 16, 1, 0, True, True, dtype, padding=True, value_dim=value_dim, seed=1)


def test_core_bf16_and_chunk_32():
    check_core(1, 1, 64, 32, 2, 32, 1, 1, False, True, torch.bfloat16, padding=True, seed=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_core_16bit_uneven_chunk(dtype):
    check_core(2, 1, 40, 24, 2, 20, 1, 1, True, True, dtype, padding=True, seed=6)


def test_core_without_grad_lse_and_chunk_128_two_blocks():
    # chunk 128 with head dim 128 in fp32 runs 32-row blocks: four query / key blocks per chunk
    check_core(1, 1, 128, 128, 1, 128, 1, 0, True, True, torch.float32, grad_lse=False, seed=4)


def test_core_strided_views_and_determinism():
    """q, k, v as transposed views of [B, S, H, D] (unit last stride only); two runs bit-identical."""
    generator = torch.Generator().manual_seed(5)
    batch, heads, seq, head_dim, rounds = 1, 2, 32, 16, 2
    base = torch.randn(3, batch, seq, heads, head_dim, generator=generator).to(DEVICE)
    q, k, v = (base[i].transpose(1, 2) for i in range(3))
    q_idx = random_sorted_indices(batch, heads, rounds, seq, generator).to(DEVICE)
    kwargs = dict(chunk_length=16, chunks_before=1, chunks_after=1, causal=True, self_mask=True, scale=0.5,
                  mask_value=-1e9, self_mask_value=-1e5)
    out, lse = kernels.lsh_chunked_forward(q, k, v, q_idx, q_idx, None, **kwargs)
    ref_out, ref_lse = reference_core(q.cpu(), k.cpu(), v.cpu(), q_idx.cpu(), q_idx.cpu(), None, **kwargs)
    assert_close(out.cpu(), ref_out, torch.float32, "out")
    assert_close(lse.cpu(), ref_lse, torch.float32, "lse")
    g_out = torch.randn(out.shape, generator=generator).to(DEVICE)
    first = kernels.lsh_chunked_backward(g_out, None, q, k, v, q_idx, q_idx, None, out, lse, **kwargs)
    second = kernels.lsh_chunked_backward(g_out, None, q, k, v, q_idx, q_idx, None, out, lse, **kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_stores_the_inputs_dtype_as_a_cast_would(rounds, dtype):
    """out_dtypes: the last round stores its float32 sum in the gradient's dtype (no separate cast
    pass); bit for bit what the float32 result cast by torch gives, for one round (no float32 buffer)
    and several (the read-modify-write rounds before the last)."""
    q, k, v, q_idx, k_idx, key_mask, g_out, g_lse = make_case(1, 2, 32, 16, rounds, dtype, padding=True, seed=7,
                                                              shared=False)
    mask_value, self_mask_value = mask_constants(dtype)
    kwargs = dict(chunk_length=16, chunks_before=1, chunks_after=0, causal=True, self_mask=False, scale=0.25,
                  mask_value=mask_value, self_mask_value=self_mask_value)
    out, lse = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs)
    wide = kernels.lsh_chunked_backward(g_out, g_lse, q, k, v, q_idx, k_idx, key_mask, out, lse, **kwargs)
    narrow = kernels.lsh_chunked_backward(g_out, g_lse, q, k, v, q_idx, k_idx, key_mask, out, lse, **kwargs,
                                          out_dtypes=(dtype, dtype, dtype))
    for name, a, b in zip(("dq", "dk", "dv"), wide, narrow):
        assert a.dtype == torch.float32 and b.dtype == dtype, name
        if dtype == torch.bfloat16 and not torch.cuda.is_available():
            # Triton's interpreter truncates float32 -> bfloat16 (the device rounds to nearest even,
            # as torch does): at most one bfloat16 step apart here
            step = a.abs().clamp_min(1e-30) * 2.0 ** -7
            assert ((a - b.float()).abs() <= step).all(), name
        else:
            assert torch.equal(a.to(dtype), b), name
    with pytest.raises(ValueError, match="out_dtypes must be three of"):
        kernels.lsh_chunked_backward(g_out, g_lse, q, k, v, q_idx, k_idx, key_mask, out, lse, **kwargs,
                                     out_dtypes=(torch.int32,) * 3)


# ------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("rounds, seq, chunk, before, after, causal, self_mask, padding, shared", [
    (1, 16, 16, 2, 1, False, True, False, True),  # one chunk four times: every copy its own slots
    (2, 32, 16, 1, 0, True, True, True, True),  # transformers' window, causal, padding, two rounds
    (3, 16, 16, 1, 1, True, False, True, False),  # nh 3, three chunks in a window of three, separate keys
    (2, 14, 7, 1, 1, False, True, True, True),  # chunk the blocks do not divide: row masks
])
def test_core_dropout_matches_reference(rounds, seq, chunk, before, after, causal, self_mask, padding, shared):
    """Forward, lse (un-dropped) and dq / dk / dv incl. grad_lse against the float64 reference with the
    keep mask the debug launcher materialises."""
    check_core(2, 2, seq, 8, rounds, chunk, before, after, causal, self_mask, torch.float32, padding=padding,
               shared=shared, scale=0.5, dropout_p=0.3, dropout_seed=1234)


def test_core_dropout_bf16():
    check_core(1, 2, 32, 16, 2, 16, 1, 0, True, True, torch.bfloat16, padding=True, dropout_p=0.2, dropout_seed=9)


def test_core_dropout_seeds_zero_p_and_kept_fraction():
    q, k, v, q_idx, k_idx, key_mask, g_out, _ = make_case(1, 2, 32, 8, 2, torch.float32, padding=True, seed=3)
    kwargs = dict(chunk_length=16, chunks_before=1, chunks_after=0, causal=True, self_mask=True, scale=1.0,
                  mask_value=-1e9, self_mask_value=-1e5)
    plain = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs)
    zero = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs, dropout_p=0.0, seed=77)
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)  # p = 0: bitwise the kernel without dropout
    first = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs, dropout_p=0.25, seed=5)
    again = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs, dropout_p=0.25, seed=5)
    other = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs, dropout_p=0.25, seed=6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[1], plain[1])  # lse stays that of the un-dropped softmax
    grads = [kernels.lsh_chunked_backward(g_out, None, q, k, v, q_idx, k_idx, key_mask, first[0], first[1], **kwargs,
                                          dropout_p=0.25, seed=5) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    keep = kernels.lsh_dropout_keep_mask(2, 3, 96, 32, 3, 0.25, 11, device=DEVICE)
    assert keep.shape == (2, 3, 96, 96)
    assert torch.equal(keep, kernels.lsh_dropout_keep_mask(2, 3, 96, 32, 3, 0.25, 11, device=DEVICE))
    assert not torch.equal(keep, kernels.lsh_dropout_keep_mask(2, 3, 96, 32, 3, 0.25, 12, device=DEVICE))
    assert abs(keep.float().mean().item() - 0.75) < 0.01  # 55 k draws: 4 sigma is 0.007
    # heads and sorted rows draw different bits (the counter covers (b, h) and the sorted query)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, :32], keep[0, 0, 32:64])


def test_core_errors():
    q = torch.zeros(1, 1, 32, 16, device=DEVICE)
    idx = torch.arange(32, device=DEVICE).view(1, 1, 32)
    kwargs = dict(chunks_before=1, chunks_after=0, causal=False, self_mask=True, scale=1.0, mask_value=-1e9,
                  self_mask_value=-1e5)
    with pytest.raises(ValueError, match="positive int"):
        kernels.lsh_chunked_forward(q, q, q, idx, idx, None, chunk_length=0, **kwargs)
    with pytest.raises(ValueError, match="multiple of chunk_length"):
        kernels.lsh_chunked_forward(q, q, q, idx, idx, None, chunk_length=64, **kwargs)
    with pytest.raises(ValueError, match="key_mask"):
        kernels.lsh_chunked_forward(q, q, q, idx, idx, torch.ones(1, 31, dtype=torch.bool, device=DEVICE),
                                    chunk_length=16, **kwargs)
    with pytest.raises(ValueError, match="q_idx"):
        kernels.lsh_chunked_forward(q, q, q, idx[..., :31], idx, None, chunk_length=16, **kwargs)
    with pytest.raises(ValueError, match="head dims"):
        wide = torch.zeros(1, 1, 32, 160, device=DEVICE)
        kernels.lsh_chunked_forward(wide, wide, wide, idx, idx, None, chunk_length=16, **kwargs)
    with pytest.raises(ValueError, match="finite"):
        kernels.lsh_chunked_forward(q, q, q, idx, idx, None, chunk_length=16,
                                    **dict(kwargs, mask_value=float("-inf")))


# ------------------------------------------------------------------------------- bucket ids


def reference_buckets(rotated, factors, key_mask, extra_bucket):
    """transformers' _hash_vectors after the einsum, written out."""
    factors = [factors] if isinstance(factors, int) else list(factors)
    buckets, start, product = None, 0, 1
    for factor in factors:
        part = rotated[..., start:start + factor // 2]
        start += factor // 2
        arg = torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
        buckets = arg if buckets is None else buckets + product * arg
        product *= factor
    total = product + int(extra_bucket)
    if key_mask is not None and extra_bucket:
        buckets = torch.where(key_mask.bool()[:, None, None, :].expand(buckets.shape), buckets,
                              torch.tensor(product, dtype=torch.long))
    rounds = rotated.shape[2]
    offsets = (torch.arange(rounds) * total).view(1, 1, -1, 1)
    return (buckets + offsets).flatten(2, 3)


@pytest.mark.parametrize("factors", [8, [4], [4, 6], [2, 4, 8]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_bucket_ids(factors, dtype, ties):
    generator = torch.Generator().manual_seed(7)
    width = (factors if isinstance(factors, int) else sum(factors)) // 2
    batch, heads, rounds, seq = 2, 3, 3, 21
    rotated = torch.randn(batch, heads, rounds, seq, width, generator=generator)
    if ties:  # small integers: equal maxima inside a half, between x and -x, and all-zero rows
        rotated = torch.randint(-2, 3, rotated.shape, generator=generator).float()
        rotated[0, 0, 0, :4] = 0.0
    rotated = rotated.to(dtype)
    key_mask = torch.ones(batch, seq, dtype=torch.bool)
    key_mask[1, -5:] = False
    for mask, extra in ((None, False), (key_mask, True), (None, True), (key_mask, False)):
        got = kernels.lsh_bucket_ids(rotated.to(DEVICE), factors, None if mask is None else mask.to(DEVICE), extra)
        assert got.dtype == torch.int64
        assert torch.equal(got.cpu(), reference_buckets(rotated, factors, mask, extra)), (mask is not None, extra)


def test_bucket_ids_einsum_output_and_errors():
    """The exact einsum of transformers (a non-contiguous output layout is fine) and clear errors."""
    generator = torch.Generator().manual_seed(8)
    vectors = torch.randn(2, 2, 19, 16, generator=generator)
    rotations = torch.randn(2, 16, 4, 4, generator=generator)
    rotated = torch.einsum("bmtd,mdhr->bmhtr", vectors, rotations)
    got = kernels.lsh_bucket_ids(rotated.to(DEVICE), 8, None, False)
    assert torch.equal(got.cpu(), reference_buckets(rotated, 8, None, False))
    with pytest.raises(ValueError, match="even"):
        kernels.lsh_bucket_ids(rotated.to(DEVICE), [3, 5], None, False)
    with pytest.raises(ValueError, match="sum"):
        kernels.lsh_bucket_ids(rotated.to(DEVICE), 16, None, False)


# ------------------------------------------------------------------------------- round combine


def reference_combine(out_rounds, lse_rounds):
    """transformers' num_hashes combine: fp32 logsumexp over rounds, weights exp(lse_r - lse), weighted sum."""
    lse = Fp32LogSumExp.apply(lse_rounds, 2).unsqueeze(2)
    return (torch.exp(lse_rounds - lse)[..., None] * out_rounds).sum(2), lse.squeeze(2)


@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value_dim", [16, 24])
def test_combine_rounds(rounds, dtype, value_dim):
    generator = torch.Generator().manual_seed(9)
    shape = (2, 2, rounds, 37, value_dim)
    out_rounds = torch.randn(shape, generator=generator).to(dtype)
    lse_rounds = torch.randn(shape[:4], generator=generator) * 3
    lse_rounds[0, 0, :, 0] = -1e5  # a row whose every round has only itself (the self-mask value)
    g_out = torch.randn(2, 2, 37, value_dim, generator=generator).to(dtype)
    g_lse = torch.randn(2, 2, 37, generator=generator)
    out, lse = kernels.lsh_combine_rounds(out_rounds.to(DEVICE), lse_rounds.to(DEVICE))
    leaves = [out_rounds.double().requires_grad_(), lse_rounds.double().requires_grad_()]
    ref_out, ref_lse = reference_combine(*leaves)
    assert_close(out.cpu(), ref_out, dtype, "out")
    assert_close(lse.cpu(), ref_lse, torch.float32, "lse", tolerance=1e-6)
    ((ref_out * g_out.double()).sum() + (ref_lse * g_lse.double()).sum()).backward()
    for grad_lse in (g_lse, None):
        if grad_lse is None:
            leaves = [x.detach().requires_grad_() for x in leaves]
            (reference_combine(*leaves)[0] * g_out.double()).sum().backward()
        grad_out_rounds, grad_lse_rounds = kernels.lsh_combine_rounds_backward(
            g_out.to(DEVICE), None if grad_lse is None else grad_lse.to(DEVICE), out_rounds.to(DEVICE),
            lse_rounds.to(DEVICE), out)
        assert grad_out_rounds.dtype == dtype and grad_lse_rounds.dtype == torch.float32
        assert_close(grad_out_rounds.cpu(), leaves[0].grad, dtype, "grad_out_rounds")
        assert_close(grad_lse_rounds.cpu(), leaves[1].grad, dtype, "grad_lse_rounds")


# ------------------------------------------------------------------------------- gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, chunk", [(4096, 64), (4000, 50)])
def test_gpu_core_real_size(dtype, causal, seq, chunk):
    """S = 4096 (chunk 64) and 4000 (chunk 50: row masks), 4 rounds, D = 64: the kernels against the
    float64 reference on the device, and the backward bit-identical run to run."""
    q, k, v, q_idx, k_idx, key_mask, g_out, g_lse = make_case(2, 4, seq, 64, 4, dtype, padding=True, seed=11,
                                                              device="cuda")
    mask_value, self_mask_value = mask_constants(dtype)
    kwargs = dict(chunk_length=chunk, chunks_before=1, chunks_after=1, causal=causal, self_mask=True, scale=1.0,
                  mask_value=mask_value, self_mask_value=self_mask_value)
    out, lse = kernels.lsh_chunked_forward(q, k, v, q_idx, k_idx, key_mask, **kwargs)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_core(*leaves, q_idx, k_idx, key_mask, **kwargs)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    ((ref_out * g_out.double()).sum() + (ref_lse * g_lse.double()).sum()).backward()
    grads = kernels.lsh_chunked_backward(g_out, g_lse, q, k, v, q_idx, k_idx, key_mask, out, lse, **kwargs)
    for name, grad, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert_close(grad, leaf.grad, dtype, name)
    again = kernels.lsh_chunked_backward(g_out, g_lse, q, k, v, q_idx, k_idx, key_mask, out, lse, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(grads, again)), "backward not deterministic"


@pytest.mark.gpu
def test_gpu_bucket_ids_real_size():
    vectors = torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    rotations = torch.randn(8, 64, 4, 8, device="cuda", dtype=torch.bfloat16)
    rotated = torch.einsum("bmtd,mdhr->bmhtr", vectors, rotations)
    key_mask = torch.ones(2, 4096, dtype=torch.bool, device="cuda")
    key_mask[0, 4000:] = False
    got = kernels.lsh_bucket_ids(rotated, [8, 8], key_mask, True)
    assert torch.equal(got.cpu(), reference_buckets(rotated.cpu(), [8, 8], key_mask.cpu(), True))


@pytest.mark.gpu
def test_gpu_combine_real_size():
    out_rounds = torch.randn(2, 8, 4, 4096, 64, device="cuda", dtype=torch.bfloat16)
    lse_rounds = torch.randn(2, 8, 4, 4096, device="cuda") * 3
    g_out = torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = kernels.lsh_combine_rounds(out_rounds, lse_rounds)
    leaves = [out_rounds.double().requires_grad_(), lse_rounds.double().requires_grad_()]
    ref_out, ref_lse = reference_combine(*leaves)
    assert_close(out, ref_out, torch.bfloat16, "out")
    assert_close(lse, ref_lse, torch.float32, "lse", tolerance=1e-6)
    (ref_out * g_out.double()).sum().backward()
    grad_out_rounds, grad_lse_rounds = kernels.lsh_combine_rounds_backward(g_out, None, out_rounds, lse_rounds, out)
    assert_close(grad_out_rounds, leaves[0].grad, torch.bfloat16, "grad_out_rounds")
    assert_close(grad_lse_rounds, leaves[1].grad, torch.bfloat16, "grad_lse_rounds")


# ------------------------------------------------------------------------------- import structure


def relative_imports(kernels_dir):
    """{module: the kernels/ modules it imports (`from .x import ...`, at any depth, lazy ones too)}."""
    import ast
    import pathlib

    graph = {}
    for path in sorted(pathlib.Path(kernels_dir).glob("*.py")):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        graph[path.stem] = targets
    return graph


def import_cycles(graph):
    """Every cycle of the import graph, each as a tuple starting at its smallest name."""
    cycles = set()

    def walk(path):
        for target in graph.get(path[-1], ()):
            if target in path:
                cycle = path[path.index(target):]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
            else:
                walk(path + [target])

    for name in graph:
        walk([name])
    return cycles


def test_import_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert import_cycles({"a": {"b"}, "b": set()}) == set()


def test_attention_kernels_import_no_cycle():
    # forward and backward share helpers through kernels/lsh_common.py and kernels/prefix_common.py;
    # the backward files never import the forward files (which re-export the backward launchers)
    import os

    graph = relative_imports(os.path.dirname(kernels.__file__))
    assert import_cycles(graph) == set()
    assert "lsh_common" in graph["lsh_attention_bwd"] and "lsh_attention" not in graph["lsh_attention_bwd"]
    assert "prefix_common" in graph["prefix_attention_bwd"] and "prefix_attention" not in graph["prefix_attention_bwd"]
    assert not graph["lsh_common"] - {"launch", "shared"} and not graph["prefix_common"] - {"launch", "shared"}
