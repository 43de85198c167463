"""Numba CPU kernels on packed E1TM state. No validation here: arbs.ops checks dtypes and shapes.

Every kernel writes into preallocated outputs or updates arrays in place (said per kernel), and each
``prange`` iteration owns one row. Integer state is updated with exact integer arithmetic; nothing
uses fastmath, so results replay bit for bit.

Shapes: rows x cols is the logical 2-D view; cols_p = ceil(cols/gs)*gs; nb = ceil(cols_p/5);
ng = cols_p/gs.
"""

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True)


@njit(inline="always")
def _unpack_row(tp, nb, buf):
    """Decode one packed row ``tp`` (uint8, nb) into ``buf`` (int8, >= 5*nb) as trits -1/0/+1."""
    for k in range(nb):
        b = np.int32(tp[k])
        q1 = b // 3
        q2 = q1 // 3
        q3 = q2 // 3
        q4 = q3 // 3
        j = 5 * k
        buf[j] = b - 3 * q1 - 1
        buf[j + 1] = q1 - 3 * q2 - 1
        buf[j + 2] = q2 - 3 * q3 - 1
        buf[j + 3] = q3 - 3 * q4 - 1
        buf[j + 4] = q4 - 1


@njit(inline="always")
def _pack_row(buf, nb, out):
    """Encode trits ``buf`` (int8, >= 5*nb, padded with 0) into ``out`` (uint8, nb)."""
    for k in range(nb):
        j = 5 * k
        out[k] = (
            (buf[j] + 1)
            + 3 * (buf[j + 1] + 1)
            + 9 * (buf[j + 2] + 1)
            + 27 * (buf[j + 3] + 1)
            + 81 * (buf[j + 4] + 1)
        )


@njit(inline="always")
def _xi(corr, num, den):
    if den == 0:
        return 0.0
    return np.float64(num * corr) / np.float64(den)


@njit(parallel=True, **_OPTS)
def pack_into(T, out):
    """Pack trits ``T`` (int8, (rows, cols), values in {-1,0,1}) into ``out`` (uint8, (rows, nb)).

    Trits past ``cols`` (row padding up to 5*nb) are written as 0. ``out`` is overwritten.
    """
    rows, cols = T.shape
    nb = out.shape[1]
    for r in prange(rows):
        buf = np.zeros(5 * nb, np.int8)
        buf[:cols] = T[r]
        _pack_row(buf, nb, out[r])


@njit(parallel=True, **_OPTS)
def unpack_into(T_packed, out):
    """Unpack ``T_packed`` (uint8, (rows, nb)) into ``out`` (int8, (rows, cols)); padding dropped."""
    rows, nb = T_packed.shape
    cols = out.shape[1]
    for r in prange(rows):
        buf = np.empty(5 * nb, np.int8)
        _unpack_row(T_packed[r], nb, buf)
        out[r] = buf[:cols]


@njit(parallel=True, **_OPTS)
def materialize_into(T_packed, E, corr_accum, gs, num, den, out):
    """W_eff = S*T with S = float32(2**(E + Xi)), Xi = float64(num*corr_accum)/den (0 if den == 0).

    T_packed uint8 (rows, nb); E int8 and corr_accum int64 (rows, ng); ``out`` float32 (rows, cols)
    is overwritten.
    """
    rows, nb = T_packed.shape
    ng = E.shape[1]
    cols = out.shape[1]
    for r in prange(rows):
        buf = np.empty(5 * nb, np.int8)
        _unpack_row(T_packed[r], nb, buf)
        o = out[r]
        for g in range(ng):
            s = np.float32(np.exp2(np.float64(E[r, g]) + _xi(corr_accum[r, g], num, den)))
            lo = g * gs
            hi = min(lo + gs, cols)
            for c in range(lo, hi):
                o[c] = s * np.float32(buf[c])


@njit(parallel=True, **_OPTS)
def vote_delta_into(grad, T_packed, gs, delta):
    """delta[r, g] = -sum_{c in group g} sign(grad[r, c]) * T[r, c]  (sign(0) = 0).

    grad float32 or float64 (rows, cols); T_packed uint8 (rows, nb); ``delta`` int64 (rows, ng) is
    overwritten. Returns the number of NaN/inf entries in ``grad`` (0 when the votes are usable).
    Reads nothing but grad and T_packed, so a caller can drop ``delta`` when the count is not 0.
    """
    rows, nb = T_packed.shape
    ng = delta.shape[1]
    cols = grad.shape[1]
    bad = 0
    for r in prange(rows):
        buf = np.empty(5 * nb, np.int8)
        _unpack_row(T_packed[r], nb, buf)
        gr = grad[r]
        nonfinite = 0
        for g in range(ng):
            lo = g * gs
            hi = min(lo + gs, cols)
            acc = 0
            for c in range(lo, hi):
                x = gr[c]
                t = np.int64(buf[c])
                acc += (np.int64(x > 0) - np.int64(x < 0)) * t
                nonfinite += np.int64(not np.isfinite(x))
            delta[r, g] = -acc
        bad += nonfinite
    return bad


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
    counts = np.zeros((rows, 2), np.int64)
    for r in prange(rows):
        for g in range(ng):
            c = corr_accum[r, g] + delta[r, g]
            if carry_limit > 0:
                c, e, nc, ns = _carry(c, np.int64(E[r, g]), carry_limit)
                E[r, g] = np.int8(e)
                counts[r, 0] += nc
                counts[r, 1] += ns
            corr_accum[r, g] = c
    return counts[:, 0].sum(), counts[:, 1].sum()


@njit(parallel=True, **_OPTS)
def flip_into(grad, T_packed, flip_accum, theta):
    """The flip rule's trit update, in place on ``T_packed`` (uint8, (rows, nb)) and ``flip_accum``
    (int8, (rows, cols_p)): c = clamp(c - sign(grad), -theta, theta); at +theta a trit below +1 steps up
    and c = 0; at -theta a trit above -1 steps down and c = 0. Padding positions are never touched.

    The caller must have checked that grad (float, (rows, cols)) is finite. Returns the number of flips.
    """
    rows, nb = T_packed.shape
    cols = grad.shape[1]
    flips = 0
    for r in prange(rows):
        buf = np.empty(5 * nb, np.int8)
        _unpack_row(T_packed[r], nb, buf)
        fa = flip_accum[r]
        gr = grad[r]
        n = 0
        for c in range(cols):
            x = gr[c]
            v = np.int32(fa[c]) - (np.int32(x > 0) - np.int32(x < 0))
            v = max(-theta, min(theta, v))
            t = buf[c]
            if v == theta and t < 1:
                buf[c] = t + 1
                v = 0
                n += 1
            elif v == -theta and t > -1:
                buf[c] = t - 1
                v = 0
                n += 1
            fa[c] = np.int8(v)
        if n:
            _pack_row(buf, nb, T_packed[r])
        flips += n
    return flips


@njit(parallel=True, **_OPTS)
def fuse_into(E, corr_accum, num, den, out):
    """E_fused = clip(rint(E + Xi), -128, 127) (round half to even) into ``out`` (int8, (rows, ng)).

    Returns (clipped, changed): groups whose rounded value left int8, groups with |Xi| >= 0.5.
    """
    rows, ng = E.shape
    clipped = 0
    changed = 0
    for r in prange(rows):
        nclip = 0
        nchg = 0
        for g in range(ng):
            xi = _xi(corr_accum[r, g], num, den)
            v = np.rint(np.float64(E[r, g]) + xi)
            if v > 127.0:
                v = 127.0
                nclip += 1
            elif v < -128.0:
                v = -128.0
                nclip += 1
            out[r, g] = np.int8(v)
            nchg += np.int64(abs(xi) >= 0.5)
        clipped += nclip
        changed += nchg
    return clipped, changed


# -- serial twins ------------------------------------------------------------------------------------------
# A parallel region costs tens of microseconds to start, and far more when the cores are busy (a torch
# step runs beside it): small tensors run the same code compiled without ``parallel`` (prange == range).
PARALLEL_MIN_ELEMENTS = 1 << 18


def _serial_twin(dispatcher):
    import types

    fn = dispatcher.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    return njit(**_OPTS)(twin)


_SERIAL = {}


def kernel(name: str, n_elements: int):
    """The kernel ``name``, parallel for at least PARALLEL_MIN_ELEMENTS elements, else its serial twin."""
    par = globals()[name]
    if n_elements >= PARALLEL_MIN_ELEMENTS:
        return par
    if name not in _SERIAL:
        _SERIAL[name] = _serial_twin(par)
    return _SERIAL[name]
