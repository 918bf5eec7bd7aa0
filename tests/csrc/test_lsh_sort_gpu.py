"""gpu tier: the CUDA counting sort (csrc/lsh_sort.cu through pefops.ops.counting_sort) against torch's
stable argsort and its inverse permutation, on random LSH-like keys with many ties, every row checked,
single- and multi-segment sizes, int64 and int32 keys. Skipped without a CUDA device."""

import pytest

torch = pytest.importorskip("torch")

from pefops.ops.counting_sort import lsh_counting_sort, lsh_counting_sort_ref, unavailable_reasons  # noqa: E402


@pytest.fixture(scope="module")
def cuda_ok():
    probe = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    reasons = unavailable_reasons(probe, 1)
    if reasons:
        pytest.skip("; ".join(reasons))


def _check(keys, num_keys):
    sorted_idx, undo_idx = lsh_counting_sort(keys, num_keys)
    ref_sorted = torch.argsort(keys, dim=-1, stable=True)
    assert sorted_idx.shape == undo_idx.shape == keys.shape
    assert sorted_idx.dtype == undo_idx.dtype == torch.int64
    # every row, exactly (a wrong tie order or a lost element in any row fails)
    mismatch = (sorted_idx != ref_sorted).flatten(0, -2).any(-1) if keys.dim() > 1 else (sorted_idx != ref_sorted).any()
    assert not mismatch.any(), f"rows differing from the stable argsort: {mismatch.nonzero().flatten().tolist()[:10]}"
    positions = torch.arange(keys.shape[-1], device=keys.device).expand_as(sorted_idx)
    assert torch.equal(undo_idx.gather(-1, sorted_idx), positions)
    ref_sorted2, ref_undo = lsh_counting_sort_ref(keys, num_keys)
    assert torch.equal(undo_idx, ref_undo)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("rows,n,num_keys", [
    (1, 1, 1),
    (3, 31, 4),            # less than one warp step
    (2, 1000, 3),          # one segment, huge ties
    (8, 4096 * 4, 4 * 65),  # [B=1, H=8, nh=4 * S=4096], num_buckets 64: several segments
    (64, 4096 * 4, 4 * 65),  # B=8: fewer segments per row
    (5, 12345, 777),       # ragged last segment, odd sizes
    (8, 65536 * 8, 8 * 2049),  # S=64k, nh=8, num_buckets 2048: > 48 KB of counters (opt-in smem)
    (2, 70000, 1),         # a single key: the output is the identity
    (2, 100, 7),           # one segment, shorter than a scatter batch
    (1, 4096 + 33, 5),     # several segments with a ragged tail
    (3, 8192 + 5, 40),
    (1, 6000, 1),
    (2, 9000, 300),
    (1, 8192, 2047),       # the counters cap the number of segments (4)
])
def test_counting_sort_equals_stable_argsort(cuda_ok, rows, n, num_keys, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows * 7 + n + num_keys)
    keys = torch.randint(0, num_keys, (rows, n), device="cuda", generator=g, dtype=dtype)
    _check(keys, num_keys)


@pytest.mark.gpu
def test_lsh_offset_buckets_and_leading_dims(cuda_ok):
    # the real layout: [B, H, nh * S] with round r's buckets offset by r * (num_buckets + 1),
    # some buckets much larger than others (skewed) and a padding bucket
    B, H, nh, S, nb = 2, 3, 4, 2048, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    skew = torch.rand(B, H, nh, S, device="cuda", generator=g) ** 4
    buckets = (skew * nb).long()
    buckets[..., -100:] = nb  # padded tokens: the extra bucket
    offsets = torch.arange(nh, device="cuda").view(1, 1, nh, 1) * (nb + 1)
    keys = (buckets + offsets).flatten(2)
    _check(keys, nh * (nb + 1))
    _check(keys.transpose(0, 1), nh * (nb + 1))  # non-contiguous input is made contiguous


@pytest.mark.gpu
def test_sorted_keys_and_special_orders(cuda_ok):
    n = 9000
    ascending = torch.arange(n, device="cuda").view(1, n) % 50
    descending = ascending.flip(-1)
    keys = torch.cat([ascending.sort(-1).values, descending, ascending]).contiguous()
    _check(keys, 50)


@pytest.mark.gpu
def test_range_check_and_empty(cuda_ok):
    keys = torch.tensor([[0, 5, 2]], device="cuda")
    with pytest.raises(ValueError, match="expected all in"):
        lsh_counting_sort(keys, 5, check_range=True)
    sorted_idx, undo_idx = lsh_counting_sort(keys, 5)  # out of range: after every valid key
    assert sorted_idx.tolist() == [[0, 2, 1]]
    empty = torch.zeros(3, 0, dtype=torch.long, device="cuda")
    s, u = lsh_counting_sort(empty, 4)
    assert s.shape == u.shape == (3, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,nh,seq,nb", [(1, 4, 16384, 512), (8, 4, 16384, 512), (8, 8, 65536, 2048)])
def test_timing_against_torch_sort(cuda_ok, batch, nh, seq, nb):
    """Informational (run with -s): the counting sort and torch's stable sort + undo scatter at the
    benchmark's LSH shapes (8 heads); the results must agree, the times are printed."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(seq)
    offsets = torch.arange(nh, device="cuda").view(1, 1, nh, 1) * (nb + 1)
    keys = (torch.randint(0, nb, (batch, 8, nh, seq), device="cuda", generator=g) + offsets).flatten(2)
    num_keys = nh * (nb + 1)
    _check(keys, num_keys)
    ms_counting = do_bench(lambda: lsh_counting_sort(keys, num_keys))
    ms_torch = do_bench(lambda: lsh_counting_sort_ref(keys, num_keys))
    print(f"\nlsh sort [{batch}, 8, {nh}x{seq}], {num_keys} keys: counting sort {ms_counting * 1e3:.1f} us, "
          f"torch argsort(stable) + scatter {ms_torch * 1e3:.1f} us ({ms_torch / ms_counting:.2f}x)")


@pytest.mark.gpu
def test_without_undo_index(cuda_ok):
    # LSH attention's sort: the same sorted_idx, no inverse allocated or written
    keys = torch.randint(0, 37, (3, 5000), device="cuda")
    sorted_idx, undo_idx = lsh_counting_sort(keys, 37, with_undo=False)
    assert undo_idx is None
    assert torch.equal(sorted_idx, torch.argsort(keys, dim=-1, stable=True))


@pytest.mark.gpu
def test_out_of_range_keys_sort_last(cuda_ok):
    # keys -3..-1 and 9..11 lie outside [0, 9): stably after every valid key, in their original order
    g = torch.Generator(device="cuda").manual_seed(3)
    keys = torch.randint(-3, 12, (2, 3000), device="cuda", generator=g)
    sorted_idx, undo_idx = lsh_counting_sort(keys, 9)
    bad = (keys < 0) | (keys >= 9)
    expected = torch.argsort(torch.where(bad, torch.full_like(keys, 9), keys), dim=-1, stable=True)
    assert torch.equal(sorted_idx, expected)
    positions = torch.arange(keys.shape[-1], device="cuda").expand_as(sorted_idx)
    assert torch.equal(undo_idx.gather(-1, sorted_idx), positions)
    for row in range(2):
        assert bad[row, sorted_idx[row, -int(bad[row].sum()):]].all()
