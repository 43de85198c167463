"""Numba CPU kernels on packed E1TM state. No validation here: arbs.ops checks dtypes and shapes.

Every kernel writes into preallocated outputs or updates arrays in place (said per kernel). Parallel
kernels split the rows into at most ``_NCHUNK`` contiguous chunks; each ``prange`` iteration owns one
chunk of rows and allocates its scratch rows once. Integer state is updated with exact integer
arithmetic; nothing uses fastmath, so results replay bit for bit (and do not depend on the thread count).

Inner loops run over ``range(gs)`` / ``range(n)`` with a base offset rather than ``range(lo, hi)``, and
are branch-free: that form is what LLVM vectorizes here. materialize and vote are compiled once per
group size, with ``gs`` a compile-time constant (``_by_gs``), so their per-group loops unroll into
vector code. Packing loops over packed bytes with the five trits of byte k at 5k..5k+4 (stride-5
loads or stores, which LLVM turns into byte shuffles), plus a scalar loop for a row's last bytes.

Shapes: rows x cols is the logical 2-D view; cols_p = ceil(cols/gs)*gs; nb = ceil(cols_p/5);
ng = cols_p/gs.
"""

import functools

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True)
_NCHUNK = 64  # row chunks per parallel kernel call (>= 8 per thread on small machines)
_TABLE_MIN_GROUPS = 1 << 12  # materialize: below this many groups, exp2 per group is cheap enough
# fuse's integer path: num <= 2**12 a power of two, den/num = 2**k with 1 <= k <= 40, and every corr_accum
# of the row in [-2**40, 2**40): |num*corr| < 2**53 and |E*2**k + corr| < 2**48, so every step of the
# float formula is exact and the integer path gives the same results
_FUSE_MAX_NUM = 1 << 12
_FUSE_MAX_K = 40
_FUSE_MAX_CORR = 1 << 40


@njit(inline="always")
def _chunk(ch, nchunk, rows):
    return ch * rows // nchunk, (ch + 1) * rows // nchunk


@njit(inline="always")
def _unpack_row(tp, out):
    """Decode packed row ``tp`` (uint8) into trits ``out`` (int8, n <= 5*len(tp) entries, all written).

    Trit i of byte b is digit (b // 3**i) % 3 minus 1, except that the top digit is b // 81 (not
    reduced mod 3: the invalid bytes 243..255 give trit 2 there, as in the Triton kernels).
    """
    n = out.shape[0]
    nfull = n // 5
    for k in range(nfull):  # whole bytes: branch-free, vectorized (stride-5 stores)
        b = np.int32(tp[k])
        q1 = b // 3
        q2 = b // 9
        q3 = b // 27
        q4 = b // 81
        out[5 * k] = np.int8(b - 3 * q1 - 1)
        out[5 * k + 1] = np.int8(q1 - 3 * q2 - 1)
        out[5 * k + 2] = np.int8(q2 - 3 * q3 - 1)
        out[5 * k + 3] = np.int8(q3 - 3 * q4 - 1)
        out[5 * k + 4] = np.int8(q4 - 1)
    if n > 5 * nfull:  # the first 1..4 trits of byte nfull (never its top digit)
        b = np.int32(tp[nfull])
        for i in range(n - 5 * nfull):
            out[5 * nfull + i] = np.int8(b % 3 - 1)
            b //= 3


@njit(inline="always")
def _pack_row(t, n, out):
    """Encode trits ``t`` (int8, {-1,0,1}, n readable entries) into ``out`` (uint8): byte k holds
    digits t[5k+i] + 1 with weight 3**i; trits at or past ``n`` are padding 0 (digit 1)."""
    nb = out.shape[0]
    nfull = min(nb, n // 5)
    u8 = np.uint8
    for k in range(nfull):  # whole bytes: branch-free, vectorized (stride-5 loads)
        # sum of (t + 1) * 3**i = 121 + sum of t * 3**i (Horner), in 0..242: exact in wrapping uint8
        x = u8(t[5 * k + 3]) + u8(3) * u8(t[5 * k + 4])
        x = u8(t[5 * k + 2]) + u8(3) * u8(x)
        x = u8(t[5 * k + 1]) + u8(3) * u8(x)
        out[k] = u8(u8(121) + u8(t[5 * k]) + u8(3) * u8(x))
    for k in range(nfull, nb):  # the last bytes: trits near or past the end of t, then padding
        acc = np.int32(121)
        p = np.int32(1)
        for i in range(5):
            if 5 * k + i < n:
                acc += p * np.int32(t[5 * k + i])
            p *= 3
        out[k] = np.uint8(acc)


@njit(parallel=True, **_OPTS)
def pack_into(T, out):
    """Pack trits ``T`` (int8, (rows, cols), values in {-1,0,1}) into ``out`` (uint8, (rows, nb)).

    Trits past ``cols`` (row padding up to 5*nb) are written as 0. ``out`` is overwritten.
    """
    rows, cols = T.shape
    nchunk = min(rows, _NCHUNK)
    for ch in prange(nchunk):
        r0, r1 = _chunk(ch, nchunk, rows)
        for r in range(r0, r1):
            _pack_row(T[r], cols, out[r])


@njit(parallel=True, **_OPTS)
def unpack_into(T_packed, out):
    """Unpack ``T_packed`` (uint8, (rows, nb)) into ``out`` (int8, (rows, cols)); padding dropped."""
    rows = T_packed.shape[0]
    nchunk = min(rows, _NCHUNK)
    for ch in prange(nchunk):
        r0, r1 = _chunk(ch, nchunk, rows)
        for r in range(r0, r1):
            _unpack_row(T_packed[r], out[r])


@njit(**_OPTS)
def _scale_table(E, corr_accum, num, den):
    """(table, n_min) with table[n - n_min] = float32(exp2(n/den)) for every n = E*den + num*corr_accum
    of the tensor, or an empty table when that would not save exp2 calls or would not be exact.

    With den = 2**k (carry/flip with K*gs a power of two, e.g. the default 16*32) and moderate values,
    float64(E) + float64(num*corr)/den is computed exactly and equals n/den, so S depends on the
    integer n alone and the same exp2 call on the same float64 argument gives a bit-identical S.
    Trained tensors span few exponents, so there are far fewer distinct n than groups. Serial: one
    cheap pass over E and corr_accum, and no extra parallel region.
    """
    rows, ng = E.shape
    empty = np.empty(0, np.float32)
    if den <= 0 or (den & (den - 1)) != 0 or den > (1 << 40) or abs(num) > 4 or rows * ng < _TABLE_MIN_GROUPS:
        return empty, 0
    n_min = np.int64(1) << 62
    n_max = -n_min
    for r in range(rows):
        er = E[r]
        cr = corr_accum[r]
        for g in range(ng):
            c = cr[g]
            if c < -(1 << 41) or c > (1 << 41):  # |n| < 2**48 keeps n/den exact in float64
                return empty, 0
            n = np.int64(er[g]) * den + num * c
            n_min = min(n_min, n)
            n_max = max(n_max, n)
    if n_max - n_min >= (rows * ng) // 4:
        return empty, 0
    fden = np.float64(den)
    table = np.empty(n_max - n_min + 1, np.float32)
    for i in range(table.size):
        table[i] = np.float32(np.exp2(np.float64(n_min + i) / fden))
    return table, n_min


def _by_gs(make):
    """``make(gs, parallel)`` -> numba kernel, compiled on first use and kept per (gs, parallel)."""
    return functools.cache(make)


@_by_gs
def _materialize_kernel(gs, parallel):
    @njit(parallel=parallel, **_OPTS)
    def materialize(T_packed, E, corr_accum, num, den, out):
        rows, nb = T_packed.shape
        ng = E.shape[1]
        cols = out.shape[1]
        nfull = min(cols // gs, ng)  # groups lying wholly inside cols
        tail = cols - nfull * gs  # trits of the last, partial group
        fden = np.float64(den)
        table, n_min = _scale_table(E, corr_accum, num, den)
        nchunk = min(rows, _NCHUNK)
        for ch in prange(nchunk):
            r0, r1 = _chunk(ch, nchunk, rows)
            buf = np.empty(5 * nb, np.int8)  # (5*nb,) trits of one row
            S = np.empty(ng, np.float32)  # (ng,) scales of one row, 2**(E + Xi) computed once per group
            for r in range(r0, r1):
                _unpack_row(T_packed[r], buf)
                er = E[r]
                cr = corr_accum[r]
                if table.size:
                    for g in range(ng):
                        S[g] = table[np.int64(er[g]) * den + num * cr[g] - n_min]
                elif den == 0:
                    for g in range(ng):
                        S[g] = np.float32(np.exp2(np.float64(er[g]) + 0.0))
                else:
                    for g in range(ng):
                        S[g] = np.float32(np.exp2(np.float64(er[g]) + np.float64(num * cr[g]) / fden))
                o = out[r]
                for g in range(nfull):
                    s = S[g]
                    base = g * gs
                    for i in range(gs):
                        o[base + i] = s * np.float32(buf[base + i])
                if tail > 0:
                    s = S[nfull]
                    base = nfull * gs
                    for i in range(tail):
                        o[base + i] = s * np.float32(buf[base + i])

    return materialize


def materialize_into(T_packed, E, corr_accum, gs, num, den, out, *, parallel=True):
    """W_eff = S*T with S = float32(2**(E + Xi)), Xi = float64(num*corr_accum)/den (0 if den == 0).

    T_packed uint8 (rows, nb); E int8 and corr_accum int64 (rows, ng); ``out`` float32 (rows, cols)
    is overwritten. Runs the kernel compiled for this ``gs`` (parallel, or its serial twin).
    """
    _materialize_kernel(gs, parallel)(T_packed, E, corr_accum, num, den, out)


@njit(inline="always")
def _group_vote(gr, buf, base, n):
    """(sum of sign(x)*t, count of NaN/inf x) over gr[base:base+n] and trits buf[base:base+n]."""
    acc = np.int32(0)  # |acc| <= gs
    nf = np.int32(0)
    for i in range(n):
        x = gr[base + i]
        acc += (np.int32(x > 0) - np.int32(x < 0)) * np.int32(buf[base + i])  # NaN votes 0
        nf += np.int32(not (abs(x) < np.inf))  # NaN and +-inf
    return acc, nf


@_by_gs
def _vote_delta_kernel(gs, parallel):
    @njit(parallel=parallel, **_OPTS)
    def vote_delta(grad, T_packed, delta):
        rows, nb = T_packed.shape
        ng = delta.shape[1]
        cols = grad.shape[1]
        nfull = min(cols // gs, ng)
        tail = cols - nfull * gs
        nchunk = min(rows, _NCHUNK)
        bad = np.zeros(max(nchunk, 1), np.int64)
        for ch in prange(nchunk):
            r0, r1 = _chunk(ch, nchunk, rows)
            buf = np.empty(5 * nb, np.int8)  # (5*nb,) trits of one row
            nonfinite = 0
            for r in range(r0, r1):
                _unpack_row(T_packed[r], buf)
                gr = grad[r]
                dr = delta[r]
                for g in range(nfull):
                    acc, nf = _group_vote(gr, buf, g * gs, gs)
                    dr[g] = -np.int64(acc)
                    nonfinite += nf
                for g in range(nfull, ng):  # the partial last group, then groups past cols (none if valid)
                    acc, nf = _group_vote(gr, buf, g * gs, tail if g == nfull else 0)
                    dr[g] = -np.int64(acc)
                    nonfinite += nf
            bad[ch] = nonfinite
        return bad.sum()

    return vote_delta


def vote_delta_into(grad, T_packed, gs, delta, *, parallel=True):
    """delta[r, g] = -sum_{c in group g} sign(grad[r, c]) * T[r, c]  (sign(0) = 0).

    grad float32 or float64 (rows, cols); T_packed uint8 (rows, nb); ``delta`` int64 (rows, ng) is
    overwritten. Returns the number of NaN/inf entries in ``grad`` (0 when the votes are usable).
    Reads nothing but grad and T_packed, so a caller can drop ``delta`` when the count is not 0.
    Runs the kernel compiled for this ``gs`` (parallel, or its serial twin).
    """
    return _vote_delta_kernel(gs, parallel)(grad, T_packed, delta)


@njit(inline="always")
def _carry(c, e, limit):
    """Carry one group: returns (corr, E, carries, saturations); see apply_votes."""
    nc = 0
    ns = 0
    while c >= limit:
        if e < 127:
            e += 1
            c -= limit
            nc += 1
        else:
            c = limit - 1
            ns += 1
    while c <= -limit:
        if e > -128:
            e -= 1
            c += limit
            nc += 1
        else:
            c = -(limit - 1)
            ns += 1
    return c, e, nc, ns


@njit(parallel=True, **_OPTS)
def apply_votes(corr_accum, E, delta, carry_limit):
    """corr_accum += delta, then (carry_limit > 0) carry: a group at >= +carry_limit moves E up by one
    and gives carry_limit back (mirror for negative). At E = 127 (or -128) E stays and corr_accum is
    held at +(carry_limit-1) (or -(carry_limit-1)).

    corr_accum int64 and E int8 (rows, ng) are modified in place; delta int64 (rows, ng).
    Returns (carries, saturations).
    """
    rows, ng = corr_accum.shape
    nchunk = min(rows, _NCHUNK)
    counts = np.zeros((max(nchunk, 1), 2), np.int64)
    for ch in prange(nchunk):
        r0, r1 = _chunk(ch, nchunk, rows)
        nc = 0
        ns = 0
        for r in range(r0, r1):
            cr = corr_accum[r]
            dr = delta[r]
            if carry_limit > 0:
                er = E[r]
                for g in range(ng):
                    c = cr[g] + dr[g]
                    if c >= carry_limit or c <= -carry_limit:  # rare: carry or saturate
                        c, e, a, b = _carry(c, np.int64(er[g]), carry_limit)
                        er[g] = np.int8(e)
                        nc += a
                        ns += b
                    cr[g] = c
            else:
                for g in range(ng):
                    cr[g] += dr[g]
        counts[ch, 0] = nc
        counts[ch, 1] = ns
    return counts[:, 0].sum(), counts[:, 1].sum()


@njit(inline="always")
def _mix64(x):
    """splitmix64's finalizer (uint64 in and out; formats.mix64 is the Python twin)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(inline="always")
def _vote_weight(x, stoch, scale, vote_max, key, i):
    """The trit vote (int32) of gradient x. Not stoch: -sign(x). Else -sign(x) * k with k the stochastic
    rounding of a = min(vote_max, |x| * scale): floor(a), plus one if u < a - floor(a), with
    u = (mix64(key ^ i*GOLDEN64) >> 40) / 2**24 (formats.vote_key). No draw where a is whole."""
    s = np.int32(x > 0) - np.int32(x < 0)
    if not stoch or s == 0:
        return -s
    a = min(abs(np.float64(x)) * scale, np.float64(vote_max))
    k = np.int32(a)  # floor: a >= 0
    f = a - np.float64(k)  # exact
    if f > 0.0:
        u = _mix64(key ^ (np.uint64(i) * np.uint64(0x9E3779B97F4A7C15))) >> np.uint64(40)
        k += np.int32(np.float64(u) < f * 16777216.0)
    return -s * k


@njit(inline="always")
def _sum_sq(gr, cols):
    """sum of gr[c]**2 over c < cols in float64, in index order."""
    ss = 0.0
    for c in range(cols):
        ss += np.float64(gr[c]) * np.float64(gr[c])
    return ss


@njit(parallel=True, **_OPTS)
def flip_into(grad, T_packed, flip_accum, theta, gain_m, vote_max, key, tensor_norm, reset):
    """The flip rule's trit update, in place on ``T_packed`` (uint8, (rows, nb)) and ``flip_accum``
    (int8, (rows, cols_p)): c = clamp(c + r, -theta, theta) with the vote r of each gradient entry; at
    +theta a trit below +1 steps up and c = -reset; at -theta a trit above -1 steps down and c = +reset
    (0 <= reset < theta). Padding positions are never touched.

    gain_m == 0: r = -sign(grad). gain_m > 0: r = -sign(grad) * k, k the stochastic rounding of
    min(vote_max, gain_m * |grad| / rms), keyed by ``key`` (uint64) and the element's index
    row * cols_p + col; rms is the gradient's over its row, or over the whole tensor with ``tensor_norm``
    (the sum of the rows' sums of squares, in row order). The caller must have checked that grad (float,
    (rows, cols)) is finite. Returns the number of flips.
    """
    rows, nb = T_packed.shape
    cols = grad.shape[1]
    cols_p = flip_accum.shape[1]
    stoch = gain_m > 0.0
    nchunk = min(rows, _NCHUNK)
    nflips = np.zeros(max(nchunk, 1), np.int64)
    tensor_scale = 0.0  # an all-zero gradient: no votes
    if stoch and tensor_norm:
        row_ss = np.zeros(rows, np.float64)
        for ch in prange(nchunk):
            r0, r1 = _chunk(ch, nchunk, rows)
            for r in range(r0, r1):
                row_ss[r] = _sum_sq(grad[r], cols)
        total = 0.0
        for r in range(rows):  # in row order: the same sum at any thread count
            total += row_ss[r]
        if total > 0.0:
            tensor_scale = gain_m / np.sqrt(total / (rows * cols))
    for ch in prange(nchunk):
        r0, r1 = _chunk(ch, nchunk, rows)
        buf = np.empty(5 * nb, np.int8)  # (5*nb,) trits of one row
        flips = 0
        for r in range(r0, r1):
            _unpack_row(T_packed[r], buf)
            fa = flip_accum[r]
            gr = grad[r]
            scale = tensor_scale  # an all-zero gradient row: no votes
            if stoch and not tensor_norm:
                ss = _sum_sq(gr, cols)
                if ss > 0.0:
                    scale = gain_m / np.sqrt(ss / cols)
            n = 0
            for c in range(cols):
                v = np.int64(fa[c]) + _vote_weight(gr[c], stoch, scale, vote_max, key, r * cols_p + c)
                n += _counter_step(fa, buf, c, v, theta, reset)
            if n:
                _pack_row(buf, buf.size, T_packed[r])
            flips += n
        nflips[ch] = flips
    return nflips.sum()


@njit(inline="always")
def _counter_step(fa, buf, c, v, theta, reset):
    """Counter ``c`` of a row takes the value ``v`` (old counter + votes) clamped to [-theta, theta]: at +theta a
    trit below +1 (``buf``, the row's trits) steps up and the counter becomes -reset; at -theta a trit above -1
    steps down and it becomes +reset. Returns 1 if the trit moved, else 0."""
    v = max(-theta, min(theta, v))
    t = buf[c]
    moved = 0
    if v == theta and t < 1:
        buf[c] = t + 1
        v = -reset
        moved = 1
    elif v == -theta and t > -1:
        buf[c] = t - 1
        v = reset
        moved = 1
    fa[c] = np.int8(v)
    return moved


@njit(parallel=True, **_OPTS)
def apply_trit_counts(T_packed, flip_accum, counts, theta, reset):
    """flip's counters take a sum of votes at once, in place on ``T_packed`` (uint8, (rows, nb)) and
    ``flip_accum`` (int8, (rows, cols_p)): c = clamp(c + counts, -theta, theta), then a trit moves as in
    :func:`flip_into`. ``counts`` int64 (rows, cols), cols <= cols_p: padding is never touched. Returns the
    number of flips."""
    rows, nb = T_packed.shape
    cols = counts.shape[1]
    nchunk = min(rows, _NCHUNK)
    nflips = np.zeros(max(nchunk, 1), np.int64)
    for ch in prange(nchunk):
        r0, r1 = _chunk(ch, nchunk, rows)
        buf = np.empty(5 * nb, np.int8)
        flips = 0
        for r in range(r0, r1):
            _unpack_row(T_packed[r], buf)
            fa = flip_accum[r]
            cr = counts[r]
            n = 0
            for c in range(cols):
                n += _counter_step(fa, buf, c, np.int64(fa[c]) + cr[c], theta, reset)
            if n:
                _pack_row(buf, buf.size, T_packed[r])
            flips += n
        nflips[ch] = flips
    return nflips.sum()


@njit(inline="always")
def _round_shift(e, c, k, half):
    """round-half-even((e*2**k + c) / 2**k) for half = 2**(k-1): v + half - 1 + (bit k of v), then an
    arithmetic shift (floor)."""
    v = (np.int64(e) << k) + c
    return (v + (half - 1) + ((v >> k) & 1)) >> k


@njit(inline="always")
def fuse_row_shift(er, cr, o, k):
    """fuse a run of groups for Xi = corr/2**k (1 <= k <= _FUSE_MAX_K) in int64. Returns (clipped, changed,
    bad): bad when some corr lies outside [-_FUSE_MAX_CORR, _FUSE_MAX_CORR) (then nothing else is valid)."""
    half = np.int64(1) << (k - 1)
    n = cr.shape[0]
    nchg = 0
    qbits = np.uint64(0)  # OR of q + 128: some q left [-128, 127] iff a bit >= 8 is set
    cbits = np.uint64(0)  # OR of corr + 2**40: some corr out of range iff a bit >= 41 is set
    for g in range(n):
        c = cr[g]
        q = _round_shift(er[g], c, k, half)
        o[g] = np.int8(min(max(q, -128), 127))
        nchg += np.uint64(c + (half - 1)) > np.uint64(2 * half - 2)  # |corr| >= half: |Xi| >= 0.5
        qbits |= np.uint64(q + 128)
        cbits |= np.uint64(c + _FUSE_MAX_CORR)
    if cbits >> np.uint64(41):
        return 0, 0, True
    nclip = 0
    if qbits >> np.uint64(8):  # rare: count the clipped groups
        for g in range(n):
            nclip += np.uint64(_round_shift(er[g], cr[g], k, half) + 128) > np.uint64(255)
    return nclip, nchg, False


@njit(inline="always")
def _fuse_row_float(er, cr, o, num, fden):
    """fuse a run of groups in float64, as the format defines it: Xi = float64(num*corr)/den. Returns (clipped, changed)."""
    nclip = 0
    nchg = 0
    for g in range(cr.shape[0]):
        xi = np.float64(num * cr[g]) / fden
        v = np.rint(np.float64(er[g]) + xi)
        nclip += np.int64(v > 127.0) + np.int64(v < -128.0)
        o[g] = np.int8(min(max(v, -128.0), 127.0))
        nchg += np.int64(abs(xi) >= 0.5)
    return nclip, nchg


@njit(parallel=True, **_OPTS)
def fuse_into(E, corr_accum, num, den, out):
    """E_fused = clip(rint(E + Xi), -128, 127) (round half to even) into ``out`` (int8, (rows, ng)).

    E int8 and corr_accum int64 (rows, ng); Xi = float64(num*corr_accum)/den, 0 when den == 0.
    Returns (clipped, changed): groups whose rounded value left int8, groups with |Xi| >= 0.5.

    When num/den is 1/2**k with num a small power of two (carry and flip: 1/(K*gs) with K*gs a power of
    two; average when step*gs is one), a chunk whose corr_accum lies in [-2**40, 2**40) takes an exact
    integer path (every step of the float formula is then exact, so the results are the same); other
    chunks and ratios take the float path. E, corr_accum and out must be C-contiguous.
    """
    # fuse is elementwise: the C-contiguous (rows, ng) arrays are walked as one run of groups, cut into
    # _NCHUNK chunks (longer inner loops than one row of ng groups)
    n = E.size
    Ef, cf, of = E.reshape(n), corr_accum.reshape(n), out.reshape(n)
    fden = np.float64(den)
    k = 0  # num/den = 1/2**k: the integer path
    if den > 0 and (den & (den - 1)) == 0 and 0 < num < den and num <= _FUSE_MAX_NUM and (num & (num - 1)) == 0:
        # at most _FUSE_MAX_K tries, and num << j <= 2**52 never overflows: terminates for any num and den
        # (an unbounded `while (num << k) < den` spun forever once num << k wrapped, e.g. den = 2**63)
        for j in range(1, _FUSE_MAX_K + 1):
            if (num << j) == den:
                k = j
                break
    shift = k >= 1
    nchunk = min(n, _NCHUNK)
    counts = np.zeros((max(nchunk, 1), 2), np.int64)
    for ch in prange(nchunk):
        g0, g1 = _chunk(ch, nchunk, n)
        er, cr, o = Ef[g0:g1], cf[g0:g1], of[g0:g1]
        if den == 0:  # Xi = 0: E_fused = E
            for g in range(g1 - g0):
                o[g] = er[g]
            continue
        if shift:
            a, b, bad = fuse_row_shift(er, cr, o, k)
        else:
            a, b, bad = 0, 0, True
        if bad:  # not a 1/2**k ratio, or corr_accum outside the integer path's exact range
            a, b = _fuse_row_float(er, cr, o, num, fden)
        counts[ch, 0] = a
        counts[ch, 1] = b
    return counts[:, 0].sum(), counts[:, 1].sum()


# -- serial twins ------------------------------------------------------------------------------------------
# A parallel region costs tens of microseconds to start, and far more when the cores are busy (a torch
# step runs beside it): small tensors run the same code compiled without ``parallel`` (prange == range).
PARALLEL_MIN_ELEMENTS = 1 << 18


def _serial_twin(dispatcher):
    import types as pytypes

    fn = dispatcher.py_func
    twin = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    return njit(**_OPTS)(twin)


_SERIAL = {}
_BY_GS = ("materialize_into", "vote_delta_into")  # Python entry points taking ``parallel=``


def kernel(name: str, n_elements: int):
    """The kernel ``name``, parallel for at least PARALLEL_MIN_ELEMENTS elements, else its serial twin."""
    par = globals()[name]
    if name in _BY_GS:
        return par if n_elements >= PARALLEL_MIN_ELEMENTS else functools.partial(par, parallel=False)
    if n_elements >= PARALLEL_MIN_ELEMENTS:
        return par
    if name not in _SERIAL:
        _SERIAL[name] = _serial_twin(par)
    return _SERIAL[name]
