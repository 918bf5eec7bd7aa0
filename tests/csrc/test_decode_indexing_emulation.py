"""CPU emulation of the index math of csrc/bottleneck_adapter_decode.cu (no GPU, no build needed).

Each kernel is replayed lane by lane with numpy: the host's choice of S / KS / G / VEC, the staging
with zero padding, the per-lane column walks, the shuffle reduce-scatter (group_reduce_scatter in
csrc/common.cuh, emulated with explicit xor partners), the ownership rules and the shared-memory
transposition of the up projection's epilogue. Shapes cover the vector and scalar paths, row and
slice tails, every token bucket and every lane-group size. It checks indexing, not floating-point
behaviour, so it runs in float64 and compares tightly.

Keep the constants below in step with the kernel file.
"""

import math

import numpy as np
import pytest

WARPS = 8
THREADS = WARPS * 32
DOWN_ROWS_PER_WARP = 4
DOWN_ROWS_PER_BLOCK = WARPS * DOWN_ROWS_PER_WARP
SLICE_QUANTUM = 256
DOWN_SMEM_BUDGET = 32 * 1024
UP_ROWS_PER_GROUP = 4
UP_MIN_GROUP = 4


def token_bucket(t):
    for b in (1, 2, 4, 8):
        if t <= b:
            return b
    return 16


def next_pow2(v):
    p = 1
    while p < v:
        p <<= 1
    return p


def reduce_scatter(v, gl, G):
    """v: [lanes, N] per-lane values of one warp (32 lanes); gl: lane % G. Mirrors group_reduce_scatter."""
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


def emulate(x, wd, bd, wu, bu, scaling, residual, *, itemsize, x_aligned=True, wd_aligned=True,
            wu_aligned=True, num_sms=132, act=np.tanh):
    T, H = x.shape
    r = wd.shape[0]
    TB = token_bucket(T)
    V = 16 // itemsize

    # ---- host: kernel 1 configuration
    down_vec = H % V == 0 and x_aligned and wd_aligned
    VEC1 = V if down_vec else 1
    row_blocks = -(-r // DOWN_ROWS_PER_BLOCK)
    s_want = max(1, -(-(2 * num_sms) // row_blocks))
    ks_max = max(SLICE_QUANTUM, (DOWN_SMEM_BUDGET // (TB * itemsize)) // SLICE_QUANTUM * SLICE_QUANTUM)
    KS = -(-H // s_want)
    KS = -(-KS // SLICE_QUANTUM) * SLICE_QUANTUM
    KS = min(max(KS, SLICE_QUANTUM), ks_max)
    S = -(-H // KS)
    assert TB * KS * itemsize <= DOWN_SMEM_BUDGET or KS == SLICE_QUANTUM

    z_out = np.full((T, r), np.nan)
    a_out = np.full((T, r), np.nan)
    zpart = np.full((S, T, r), np.nan)
    written = np.zeros((S, T, r), dtype=np.int64)

    xflat = x.reshape(-1)
    for bx in range(row_blocks):
        for s in range(S):
            k0 = s * KS
            klen = min(KS, H - k0)
            assert klen > 0
            xs = np.full((TB, KS), np.nan)  # uninitialised shared memory
            vecs_per_row = KS // VEC1
            for i in range(TB * vecs_per_row):  # thread loop (order irrelevant)
                t = i // vecs_per_row
                c = (i - t * vecs_per_row) * VEC1
                valid = t < T and c < klen
                if valid:
                    src = t * H + k0 + c
                    assert src + VEC1 <= T * H, "vector read past x"
                    assert c + VEC1 <= klen, "vector straddles the slice end"
                    xs[t, c:c + VEC1] = xflat[src:src + VEC1]
                else:
                    xs[t, c:c + VEC1] = 0.0
            for warp in range(WARPS):
                j0 = bx * DOWN_ROWS_PER_BLOCK + warp * DOWN_ROWS_PER_WARP
                if j0 >= r:
                    continue
                N = DOWN_ROWS_PER_WARP * TB
                acc = np.zeros((32, N))
                for lane in range(32):
                    for c in range(lane * VEC1, klen, 32 * VEC1):
                        for k in range(DOWN_ROWS_PER_WARP):
                            if j0 + k >= r:
                                continue
                            col = k0 + c
                            assert col + VEC1 <= H
                            w = wd[j0 + k, col:col + VEC1]
                            for t in range(TB):
                                xv = xs[t, c:c + VEC1]
                                assert not np.isnan(xv).any(), "read unstaged shared memory"
                                acc[lane, k * TB + t] += float(np.dot(w, xv))
                lanes = np.arange(32)
                v, base = reduce_scatter(acc, lanes, 32)
                held = N // 32 if N >= 32 else 1
                for lane in range(32):
                    if lane >= N:
                        continue
                    for i in range(held):
                        idx = base[lane] + i
                        k, t = idx // TB, idx % TB
                        j = j0 + k
                        if t < T and j < r:
                            if S == 1:
                                zz = v[lane, i] + bd[j]
                                z_out[t, j] = zz
                                a_out[t, j] = act(zz)
                            else:
                                zpart[s, t, j] = v[lane, i]
                            written[s, t, j] += 1
    assert (written == 1).all(), "every z element is written exactly once"
    if S > 1:
        z_out = zpart.sum(0) + bd[None, :]
        a_out = act(z_out)

    # ---- kernel 2
    up_vec = r % V == 0 and wu_aligned
    VEC2 = V if up_vec else 1
    G = min(32, max(UP_MIN_GROUP, next_pow2(-(-r // VEC2))))
    gpw = 32 // G
    rpb = WARPS * gpw * UP_ROWS_PER_GROUP
    assert rpb <= 256
    y = np.full((T, H), np.nan)
    ywritten = np.zeros((T, H), dtype=np.int64)
    nblocks = -(-H // rpb)
    abuf = np.zeros((TB, r))
    abuf[:T] = a_out
    for b in range(nblocks):
        h0 = b * rpb
        obuf = np.full((TB, rpb), np.nan)
        owned = np.zeros((TB, rpb), dtype=np.int64)
        for warp in range(WARPS):
            lanes = np.arange(32)
            gi, gl = lanes // G, lanes % G
            N = UP_ROWS_PER_GROUP * TB
            acc = np.zeros((32, N))
            for lane in range(32):
                for k in range(UP_ROWS_PER_GROUP):
                    h = h0 + (warp * UP_ROWS_PER_GROUP + k) * gpw + gi[lane]
                    if h >= H:
                        continue
                    for j in range(gl[lane] * VEC2, r, G * VEC2):
                        assert j + VEC2 <= r
                        w = wu[h, j:j + VEC2]
                        for t in range(TB):
                            acc[lane, k * TB + t] += float(np.dot(w, abuf[t, j:j + VEC2]))
            v, base = reduce_scatter(acc, gl, G)
            held = N // G if N >= G else 1
            for lane in range(32):
                if gl[lane] >= N:
                    continue
                for i in range(held):
                    idx = base[lane] + i
                    k, t = idx // TB, idx % TB
                    rl = (warp * UP_ROWS_PER_GROUP + k) * gpw + gi[lane]
                    assert 0 <= rl < rpb
                    obuf[t, rl] = v[lane, i]
                    owned[t, rl] += 1
        assert (owned == 1).all(), "each (token, row) slot of obuf has exactly one owner"
        for i in range(T * rpb):
            t, hl = i // rpb, i % rpb
            h = h0 + hl
            if h >= H:
                continue
            u = obuf[t, hl] + bu[h]
            y[t, h] = residual[t, h] + scaling[h] * u
            ywritten[t, h] += 1
    assert (ywritten == 1).all()
    return y, z_out


CASES = [
    # (T, H, r, itemsize, aligned)
    (1, 768, 1, 2, True),
    (3, 1023, 16, 2, True),
    (16, 1536, 64, 2, True),
    (5, 300, 33, 4, True),
    (2, 1024, 1024, 2, True),
    (8, 520, 40, 4, True),
    (16, 7, 3, 2, True),
    (4, 1, 1, 4, True),
    (9, 264, 24, 2, False),
    (16, 1100, 96, 4, True),
    (3, 200, 1024, 2, True),
    (6, 8200, 8, 2, True),
    (1, 2304, 1024, 2, True),
]


@pytest.mark.parametrize("T,H,r,itemsize,aligned", CASES)
def test_index_math_matches_dense(T, H, r, itemsize, aligned):
    rng = np.random.default_rng(T * 1000 + H + r)
    x = rng.standard_normal((T, H))
    wd = rng.standard_normal((r, H)) / math.sqrt(H)
    bd = rng.standard_normal(r)
    wu = rng.standard_normal((H, r)) / math.sqrt(r)
    bu = rng.standard_normal(H)
    scaling = rng.random(H) + 0.5
    residual = rng.standard_normal((T, H))
    y, z = emulate(x, wd, bd, wu, bu, scaling, residual, itemsize=itemsize,
                   x_aligned=aligned, wd_aligned=aligned, wu_aligned=aligned)
    z_ref = x @ wd.T + bd
    y_ref = residual + scaling * (np.tanh(z_ref) @ wu.T + bu)
    np.testing.assert_allclose(z, z_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)


def test_reduce_scatter_all_group_sizes():
    rng = np.random.default_rng(0)
    for G in (1, 2, 4, 8, 16, 32):
        for N in (1, 2, 4, 8, 16, 32, 64):
            vals = rng.standard_normal((32, N))
            lanes = np.arange(32)
            gl = lanes % G
            v, base = reduce_scatter(vals, gl, G)
            held = N // G if N >= G else 1
            seen = {}
            for lane in range(32):
                if gl[lane] >= N:
                    continue
                group = lane // G
                want = vals[group * G:(group + 1) * G].sum(0)
                for i in range(held):
                    idx = base[lane] + i
                    assert (group, idx) not in seen
                    seen[(group, idx)] = True
                    assert abs(v[lane, i] - want[idx]) < 1e-12
            assert len(seen) == (32 // G) * N
