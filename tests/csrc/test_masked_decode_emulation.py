"""CPU emulation of the index math of csrc/masked_linear_decode.cu (no GPU, no build needed).

The kernel is replayed warp by warp with numpy, vectorised over the 32 lanes: the host's choice of
the vector width and of the K-slices (choose_split, its wave model), the staging of x with zero
padding, the lookahead fetch of W vectors and of the mask byte that holds their bits (shifted by
the column's offset inside the byte), the selection of unmasked weights, the shuffle reduce-scatter
(group_reduce_scatter in csrc/common.cuh, emulated with explicit xor partners), the ownership rules
and the finalize sum over slices. Masked weights are NaN here, so a masked weight that is
multiplied instead of dropped, or a bit read from the wrong place, shows. Shapes cover the vector
(VEC = 8 and 4) and scalar paths, row and slice tails, every token bucket and K % 8 != 0. It checks
indexing, not floating-point behaviour, so it runs in float64 and compares tightly.

Keep the constants below in step with the kernel file.
"""

import math

import numpy as np
import pytest

WARPS = 8
THREADS = WARPS * 32
ROWS_PER_WARP = 4
ROWS_PER_BLOCK = WARPS * ROWS_PER_WARP
SLICE_QUANTUM = 256
SMEM_BUDGET = 48 * 1024
BLOCK_OVERHEAD_COLS = 128
SPLIT_PENALTY_COLS = 256
MAX_GRID_Y = 65535


def token_bucket(t):
    for b in (1, 2, 4, 8):
        if t <= b:
            return b
    return 16


def vecs_per_lane(tb):  # TileConfig<TB>::kVecsPerLane
    return 2 if tb <= 2 or tb >= 16 else 1


def cdiv(a, b):
    return -(-a // b)


def choose_split(N, K, TB, itemsize, slots):
    """Mirror of choose_split in the kernel file: returns (S, KS)."""
    row_blocks = cdiv(N, ROWS_PER_BLOCK)
    ks_budget = SMEM_BUDGET // (TB * itemsize) // SLICE_QUANTUM * SLICE_QUANTUM
    ks_budget = max(SLICE_QUANTUM, ks_budget)
    ks_top = min(ks_budget, cdiv(K, SLICE_QUANTUM) * SLICE_QUANTUM)
    slots = max(slots, 1)
    best = (cdiv(K, ks_top), ks_top)
    best_cost = None
    for ks in range(ks_top, SLICE_QUANTUM - 1, -SLICE_QUANTUM):
        S = cdiv(K, ks)
        if S > MAX_GRID_Y:
            break
        waves = cdiv(row_blocks * S, slots)
        cost = waves * (ks + BLOCK_OVERHEAD_COLS) + (SPLIT_PENALTY_COLS if S > 1 else 0)
        if best_cost is None or cost < best_cost:
            best_cost, best = cost, (S, ks)
    return best


def reduce_scatter(v, gl, G):
    """v: [32, N] per-lane values of one warp; gl: lane % G. Mirrors group_reduce_scatter."""
    v = v.copy()
    lanes, N = v.shape
    lane_ids = np.arange(lanes)
    base = np.zeros(lanes, dtype=np.int64)
    for step in range(5):
        o = 1 << step
        n = N >> step
        if not o < G:
            break
        partner = lane_ids ^ o
        if n > 1:
            upper = (gl & o) != 0
            new = v.copy()
            for i in range(n // 2):
                send = np.where(upper, v[:, i], v[:, i + n // 2])
                keep = np.where(upper, v[:, i + n // 2], v[:, i])
                new[:, i] = keep + send[partner]
            v = new
            base += np.where(upper, n // 2, 0)
        else:
            v[:, 0] = v[:, 0] + v[partner, 0]
    return v, base


def pack_bits(mask):
    """[N, K] bool -> [N, ceil(K / 8)] uint8, bit j of byte b = column 8 b + j."""
    return np.packbits(mask.astype(np.uint8), axis=1, bitorder="little")


def emulate(x, w, packed, bias, *, itemsize, aligned=True, slots=264):
    T, K = x.shape
    N = w.shape[0]
    KB = cdiv(K, 8)
    assert packed.shape == (N, KB) and packed.dtype == np.uint8
    TB = token_bucket(T)
    V = 16 // itemsize
    VEC = V if K % V == 0 and aligned else 1
    U = vecs_per_lane(TB)
    step = 32 * VEC
    S, KS = choose_split(N, K, TB, itemsize, slots)
    assert KS % SLICE_QUANTUM == 0 and (S - 1) * KS < K <= S * KS
    assert TB * KS * itemsize <= SMEM_BUDGET or KS == SLICE_QUANTUM
    row_blocks = cdiv(N, ROWS_PER_BLOCK)

    y = np.full((T, N), np.nan)
    ypart = np.full((S, T, N), np.nan)
    written = np.zeros((S, T, N), dtype=np.int64)
    lanes = np.arange(32)
    bit_ids = np.arange(VEC)

    for bx in range(row_blocks):
        for s in range(S):
            k0 = s * KS
            klen = min(KS, K - k0)
            assert klen > 0
            # staging: thread i writes vector (t, cx); vectors are inside the row or outside it
            xs = np.full((TB, KS), np.nan)  # uninitialised shared memory
            vecs_per_row = KS // VEC
            i = np.arange(TB * vecs_per_row)
            t_of, cx = i // vecs_per_row, (i % vecs_per_row) * VEC
            for t, c in zip(t_of, cx):
                if t < T and c < klen:
                    assert c + VEC <= klen, "vector straddles the slice end"
                    xs[t, c:c + VEC] = x[t, k0 + c:k0 + c + VEC]
                else:
                    xs[t, c:c + VEC] = 0.0
            for warp in range(WARPS):
                n0 = bx * ROWS_PER_BLOCK + warp * ROWS_PER_WARP
                if n0 >= N:
                    continue
                NV = ROWS_PER_WARP * TB
                acc = np.zeros((32, NV))

                def fetch(c):
                    """Per lane: U x R weight vectors (zeros when invalid) and their bits."""
                    wv = np.zeros((32, U, ROWS_PER_WARP, VEC))
                    mb = np.zeros((32, U, ROWS_PER_WARP), dtype=np.int64)
                    for u in range(U):
                        cc = c + u * step
                        for k in range(ROWS_PER_WARP):
                            n = n0 + k
                            for lane in lanes:
                                if n < N and cc[lane] < klen:
                                    gc = k0 + cc[lane]
                                    assert gc + VEC <= K, "vector read past the row"
                                    assert gc % VEC == 0
                                    byte = gc >> 3
                                    assert byte < KB, "mask byte past the row"
                                    # the VEC bits of this vector must sit in the one byte read
                                    assert (gc & 7) + VEC <= 8
                                    wv[lane, u, k] = w[n, gc:gc + VEC]
                                    mb[lane, u, k] = int(packed[n, byte]) >> (gc & 7)
                    return wv, mb

                c = lanes * VEC
                wn, mn = fetch(c)  # issued before the staging barrier
                while (c < klen).any():
                    active = c < klen
                    wc, mc = wn, mn
                    nxt = c + U * step
                    if (active & (nxt < klen)).any():
                        wn2, mn2 = fetch(nxt)
                        pre = active & (nxt < klen)
                        wn = np.where(pre[:, None, None, None], wn2, wn)
                        mn = np.where(pre[:, None, None], mn2, mn)
                    for u in range(U):
                        cc = c + u * step
                        for lane in lanes:
                            if not (active[lane] and cc[lane] < klen):
                                continue
                            col = cc[lane]
                            for k in range(ROWS_PER_WARP):
                                keep = ((mc[lane, u, k] >> bit_ids) & 1) != 0
                                wf = np.where(keep, wc[lane, u, k], 0.0)  # select, never multiply
                                for t in range(TB):
                                    xv = xs[t, col:col + VEC]
                                    assert not np.isnan(xv).any(), "read unstaged shared memory"
                                    acc[lane, k * TB + t] += float(np.dot(wf, xv))
                    c = np.where(active, nxt, c)

                v, base = reduce_scatter(acc, lanes, 32)
                held = NV // 32 if NV >= 32 else 1
                for lane in range(32):
                    if lane >= NV:
                        continue
                    for i in range(held):
                        idx = base[lane] + i
                        k, t = idx // TB, idx % TB
                        n = n0 + k
                        if t < T and n < N:
                            if S == 1:
                                y[t, n] = v[lane, i] + (bias[n] if bias is not None else 0.0)
                            else:
                                ypart[s, t, n] = v[lane, i]
                            written[s, t, n] += 1
    assert (written == 1).all(), "every output (or partial) is written exactly once"
    if S > 1:
        y = np.zeros((T, N))
        for p in range(S):  # fixed order, as the finalize kernel
            y = y + ypart[p]
        if bias is not None:
            y = y + bias[None, :]
    return y, S, VEC


CASES = [
    # (T, N, K, itemsize, aligned, slots)
    (1, 40, 512, 2, True, 264),      # VEC 8, one slice
    (3, 37, 1000, 2, True, 4),       # VEC 8, K tail inside the slice, few slots -> several slices
    (16, 33, 264, 2, True, 264),     # TB 16 (U 2), slice tail of 8 columns
    (5, 70, 300, 4, True, 2),        # VEC 4 (nibbles of a byte), TB 8 (U 1), split
    (2, 9, 1023, 2, True, 264),      # K % 8 != 0 -> scalar path, tail bits
    (4, 5, 9, 4, True, 264),         # tiny, scalar
    (1, 64, 1, 2, True, 264),        # K = 1
    (8, 31, 520, 4, False, 3),       # misaligned -> scalar, split
    (16, 12, 777, 4, True, 264),     # fp32 TB 16: KS capped by shared memory (768) -> S >= 2
    (2, 100, 2048, 2, True, 1),      # a single slot: the wave model prefers one long slice
]


@pytest.mark.parametrize("T,N,K,itemsize,aligned,slots", CASES)
def test_index_math_matches_dense(T, N, K, itemsize, aligned, slots):
    rng = np.random.default_rng(T * 1000 + N * 7 + K)
    x = rng.standard_normal((T, K))
    w = rng.standard_normal((N, K)) / math.sqrt(K)
    m = rng.random((N, K)) < 0.5
    w_nan = np.where(m, w, np.nan)  # masked weights must be dropped, not multiplied by zero
    packed = pack_bits(m)
    if K % 8:  # bits past K are never read: set them
        packed[:, -1] |= np.uint8((0xFF << (K % 8)) & 0xFF)
    bias = rng.standard_normal(N) if T % 2 else None
    y, S, VEC = emulate(x, w_nan, packed, bias, itemsize=itemsize, aligned=aligned, slots=slots)
    ref = x @ np.where(m, w, 0.0).T + (bias if bias is not None else 0.0)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    assert VEC == (16 // itemsize if aligned and K % (16 // itemsize) == 0 else 1)


def test_cases_cover_both_paths():
    seen = set()
    for T, N, K, itemsize, _aligned, slots in CASES:
        S, _ = choose_split(N, K, token_bucket(T), itemsize, slots)
        seen.add(S > 1)
    assert seen == {False, True}


def test_pack_bits_layout():
    # bit j of byte b is column 8 b + j (numpy.packbits(axis=1, bitorder="little"))
    m = np.zeros((2, 11), dtype=bool)
    m[0, 0] = m[0, 9] = m[1, 7] = m[1, 10] = True
    p = pack_bits(m)
    assert p.shape == (2, 2)
    assert p.tolist() == [[1, 2], [128, 4]]


@pytest.mark.parametrize("itemsize", [2, 4])
def test_choose_split_invariants(itemsize):
    for N in (1, 5, 127, 4096, 11008, 32000):
        for K in (1, 9, 255, 256, 1023, 4096, 11008, 14336):
            for TB in (1, 2, 4, 8, 16):
                for slots in (1, 132, 264, 528):
                    S, KS = choose_split(N, K, TB, itemsize, slots)
                    assert KS % SLICE_QUANTUM == 0 and KS >= SLICE_QUANTUM
                    assert TB * KS * itemsize <= SMEM_BUDGET
                    assert (S - 1) * KS < K <= S * KS
                    assert 1 <= S <= MAX_GRID_Y


def test_choose_split_picks():
    # H200: 132 SMs, two resident blocks per SM for T <= 8 (bf16 vector path)
    assert choose_split(4096, 4096, 1, 2, 264) == (2, 2048)  # 256 blocks: one full wave
    assert choose_split(4096, 11008, 1, 2, 264) == (2, 5632)
    assert choose_split(11008, 4096, 1, 2, 264)[0] >= 2
    assert choose_split(64, 1, 1, 2, 264) == (1, 256)
    assert choose_split(5, 9, 16, 4, 132) == (1, 256)
    # shared memory caps the slice: fp32, 16 tokens -> at most 768 columns
    S, KS = choose_split(4096, 4096, 16, 4, 132)
    assert KS <= 768 and S >= 6
