"""Two other ways to write fuse's inner loop, timed against the kernel's (prototype; one thread).

    python experiments/fuse_variants.py

On a 4096 x 128-group E1TM32 carry state (K 16: Xi = corr/512): the product's integer shift path
(cpu.fuse_row_shift), float64 with a multiply by 2**-k, and an integer rounding that cannot overflow
(so it needs no range check). All three must give the same E_fused; prints ms per call (median of 300).
"""

import time

import numpy as np
from numba import njit

from arbs.kernels import cpu

_OPTS = dict(cache=False, nogil=True, error_model="numpy")


@njit(**_OPTS)
def shift(er, cr, o, k):
    return cpu.fuse_row_shift(er, cr, o, k)


@njit(**_OPTS)
def float_mul(er, cr, o, inv):
    nclip = 0
    nchg = 0
    for g in range(cr.shape[0]):
        xi = np.float64(cr[g]) * inv
        v = np.rint(np.float64(er[g]) + xi)
        nclip += np.int64(v > 127.0) + np.int64(v < -128.0)
        o[g] = np.int8(min(max(v, -128.0), 127.0))
        nchg += np.int64(abs(xi) >= 0.5)
    return nclip, nchg


@njit(**_OPTS)
def no_overflow(er, cr, o, k):
    """e + floor(c/2**k) + the round-half-even step: no intermediate can overflow."""
    half = np.int64(1) << (k - 1)
    mask = (np.int64(1) << k) - 1
    nchg = 0
    lo = np.int64(0)
    hi = np.int64(0)
    for g in range(cr.shape[0]):
        c = cr[g]
        b = np.int64(er[g]) + (c >> k)
        q = b + ((c & mask) + (b & 1) > half)
        lo = min(lo, q)
        hi = max(hi, q)
        o[g] = np.int8(min(max(q, -128), 127))
        nchg += np.uint64(c + half) >= np.uint64(2 * half)
    return lo, hi, nchg


def _median_ms(f, n=300):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main():
    rng = np.random.default_rng(0)
    n = 4096 * 128
    E = rng.integers(-8, 8, n).astype(np.int8)
    c = rng.integers(-511, 512, n).astype(np.int64)
    outs = [np.empty(n, np.int8) for _ in range(3)]
    runs = {"shift (product)": lambda: shift(E, c, outs[0], 9),
            "float64 * 2**-k": lambda: float_mul(E, c, outs[1], 1 / 512),
            "no-overflow integer": lambda: no_overflow(E, c, outs[2], 9)}
    for f in runs.values():
        f()
    assert all(np.array_equal(outs[0], o) for o in outs[1:]), "the variants disagree"
    for _ in range(3):
        print("  ".join(f"{name} {_median_ms(f):.3f} ms" for name, f in runs.items()))


if __name__ == "__main__":
    main()
