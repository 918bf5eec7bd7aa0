"""CPU emulation of the index math of csrc/lsh_sort.cu (no GPU, no build needed).

The three kernels are replayed with numpy exactly as they index memory: the host's choice of the
number of segments P, the per-segment histograms in key-major layout [rows, num_keys + 1, P], the
per-thread-run exclusive scan of scan_kernel, and the warp-by-warp scatter of scatter_kernel
(__match_any_sync groups, rank = equal lanes below, the highest lane of a group advancing the cursor,
the keys loaded BATCH warp steps at a time, one batch ahead). The result must equal numpy's stable
argsort and its inverse, and the out-of-range rule (such keys sort after every valid key) must hold.
Keep the constants in step with the kernel file.
"""

import numpy as np
import pytest

HIST_THREADS = 256
SCAN_THREADS = 1024
MIN_SEGMENT = 1024
WARPS_PER_SM_TARGET = 32
BATCH = 8
H200_SMS = 132


def choose_segments(rows, n, num_keys, sm_count):
    want = max(1, (WARPS_PER_SM_TARGET * sm_count + rows - 1) // rows)
    by_length = max(1, n // MIN_SEGMENT)
    by_counts = max(1, n // (num_keys + 1))
    return max(1, min(want, by_length, by_counts, 65535))


def bin_of(keys, num_keys):
    return np.where((keys >= 0) & (keys < num_keys), keys, num_keys).astype(np.int64)


def hist(keys, num_keys, P, seg_len):
    rows, n = keys.shape
    bins = num_keys + 1
    counts = np.zeros((rows, bins * P), dtype=np.int64)
    for r in range(rows):
        for p in range(P):
            begin, end = p * seg_len, min(n, p * seg_len + seg_len)
            h = np.zeros(bins, dtype=np.int64)
            # block-strided loop: thread t reads begin + t, begin + t + 256, ... (order irrelevant)
            for t in range(HIST_THREADS):
                np.add.at(h, bin_of(keys[r, begin + t:end:HIST_THREADS], num_keys), 1)
            counts[r, np.arange(bins) * P + p] = h
    return counts


def scan(counts):
    rows, m = counts.shape
    out = counts.copy()
    run = (m + SCAN_THREADS - 1) // SCAN_THREADS
    for r in range(rows):
        row = counts[r]
        sums = np.array([row[min(m, t * run):min(m, t * run + run)].sum() for t in range(SCAN_THREADS)])
        # warp inclusive scans + scan of warp totals == block inclusive scan of the thread sums
        inclusive = np.cumsum(sums)
        for t in range(SCAN_THREADS):
            begin, end = min(m, t * run), min(m, t * run + run)
            prefix = inclusive[t] - sums[t]
            for i in range(begin, end):
                out[r, i] = prefix
                prefix += row[i]
    return out


def load_batch(row, base, end):
    """load_batch: the raw keys of BATCH warp steps from element base, -1 past the segment end."""
    i = base + 32 * np.arange(BATCH)[:, None] + np.arange(32)[None, :]  # [BATCH, 32]
    return np.where(i < end, row[np.minimum(i, len(row) - 1)], -1)


def scatter(keys, offsets, num_keys, P, seg_len, unstable=False):
    rows, n = keys.shape
    bins = num_keys + 1
    sorted_idx = np.full((rows, n), -1, dtype=np.int64)
    undo_idx = np.full((rows, n), -1, dtype=np.int64)
    lanes = np.arange(32)
    for r in range(rows):
        for p in range(P):
            cursor = offsets[r, np.arange(bins) * P + p].copy()
            begin, end = p * seg_len, min(n, p * seg_len + seg_len)
            nxt = load_batch(keys[r], begin, end)
            for base in range(begin, end, 32 * BATCH):
                current = nxt
                nxt = load_batch(keys[r], base + 32 * BATCH, end)
                for u in range(BATCH):
                    step = base + 32 * u
                    if step >= end:
                        break
                    i = step + lanes
                    valid = i < end
                    b = np.where(valid, bin_of(current[u], num_keys), -1)
                    peers = [(b == b[lane]) for lane in lanes]  # __match_any_sync: lanes with the same value
                    rank = np.array([int(peers[lane][:lane].sum()) for lane in lanes])
                    if unstable:  # a deliberately wrong variant: equal lanes numbered from the top
                        rank = np.array([int(peers[lane][lane + 1:].sum()) for lane in lanes])
                    pos = np.where(valid, cursor[np.maximum(b, 0)] + rank, 0)
                    last = np.array([not peers[lane][lane + 1:].any() for lane in lanes])
                    for lane in lanes[valid & last]:
                        # the kernel writes pos + 1 of the group's highest lane (= cursor + group size)
                        cursor[b[lane]] = pos[lane] + 1 if not unstable else cursor[b[lane]] + peers[lane].sum()
                    assert (sorted_idx[r, pos[valid]] == -1).all(), "a slot written twice"
                    sorted_idx[r, pos[valid]] = i[valid]
                    undo_idx[r, i[valid]] = pos[valid]
    return sorted_idx, undo_idx


def emulate(keys, num_keys, sm_count=H200_SMS, unstable=False):
    rows, n = keys.shape
    P = choose_segments(rows, n, num_keys, sm_count)
    seg_len = (n + P - 1) // P
    counts = hist(keys, num_keys, P, seg_len)
    offsets = scan(counts)
    sorted_idx, undo_idx = scatter(keys, offsets, num_keys, P, seg_len, unstable)
    return sorted_idx, undo_idx, P


def expected(keys, num_keys):
    order_keys = bin_of(keys, num_keys)
    sorted_idx = np.argsort(order_keys, axis=1, kind="stable")
    undo = np.empty_like(sorted_idx)
    np.put_along_axis(undo, sorted_idx, np.arange(keys.shape[1])[None].repeat(keys.shape[0], 0), axis=1)
    return sorted_idx, undo


CASES = [
    # rows, n, num_keys, sm_count: one segment, several segments with a ragged tail, few keys (many ties)
    (2, 100, 7, H200_SMS),
    (1, 4096 + 33, 5, H200_SMS),
    (3, 8192 + 5, 40, 4),
    (1, 6000, 1, H200_SMS),
    (2, 9000, 300, H200_SMS),
    (1, 8192, 2047, H200_SMS),  # the counts cap limits P (4 segments)
]


@pytest.mark.parametrize("rows,n,num_keys,sm_count", CASES)
def test_emulated_kernels_equal_stable_argsort(rows, n, num_keys, sm_count):
    rng = np.random.default_rng(rows * 1000 + n + num_keys)
    keys = rng.integers(0, num_keys, size=(rows, n))
    sorted_idx, undo_idx, P = emulate(keys, num_keys, sm_count)
    ref_sorted, ref_undo = expected(keys, num_keys)
    np.testing.assert_array_equal(sorted_idx, ref_sorted)
    np.testing.assert_array_equal(undo_idx, ref_undo)
    if n >= 2 * MIN_SEGMENT and n >= 2 * (num_keys + 1):
        assert P > 1  # the multi-segment path is the one exercised


def test_segment_choice_limits():
    # counts array at most n entries per row; segments at least MIN_SEGMENT long
    for rows, n, k in [(8, 65536, 2052), (64, 65536, 2052), (8, 524288, 16392), (1, 4096, 260), (32, 1000, 9)]:
        P = choose_segments(rows, n, k, H200_SMS)
        assert P >= 1
        assert P == 1 or (k + 1) * P <= n
        assert P == 1 or n // P >= MIN_SEGMENT


def test_out_of_range_keys_sort_last():
    rng = np.random.default_rng(3)
    keys = rng.integers(-3, 12, size=(2, 3000))  # num_keys 9: -3..-1 and 9..11 are out of range
    sorted_idx, undo_idx, _ = emulate(keys, 9)
    ref_sorted, ref_undo = expected(keys, 9)
    np.testing.assert_array_equal(sorted_idx, ref_sorted)
    np.testing.assert_array_equal(undo_idx, ref_undo)
    bad = (keys < 0) | (keys >= 9)
    tail = np.take_along_axis(bad, sorted_idx, axis=1)
    for r in range(2):
        assert tail[r, -bad[r].sum():].all()


def test_emulation_can_fail():
    # the same replay with equal lanes numbered from the top (an unstable scatter) must not match
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 4, size=(1, 2048))
    sorted_idx, _, _ = emulate(keys, 4, unstable=True)
    assert not np.array_equal(sorted_idx, expected(keys, 4)[0])
    assert np.array_equal(np.sort(sorted_idx[0]), np.arange(2048))  # still a permutation
