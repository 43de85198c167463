"""Slow, obviously-correct numpy twins of the numba kernels (same contracts, see arbs.kernels.cpu)."""

import math

import numpy as np

POW3 = 3 ** np.arange(5)


def pack(T, nb):
    """T int8 (rows, cols) -> uint8 (rows, nb); trits past cols are 0 (digit 1)."""
    rows, cols = T.shape
    digits = np.ones((rows, 5 * nb), np.int64)
    digits[:, :cols] = T.astype(np.int64) + 1
    return (digits.reshape(rows, nb, 5) * POW3).sum(axis=2).astype(np.uint8)


def unpack(T_packed, cols):
    b = T_packed.astype(np.int64)[:, :, None]
    digits = (b // POW3) % 3  # (rows, nb, 5), first trit least significant
    return (digits.reshape(T_packed.shape[0], 5 * T_packed.shape[1])[:, :cols] - 1).astype(np.int8)


def xi(corr_accum, num, den):
    if den == 0:
        return np.zeros(corr_accum.shape)
    return (num * corr_accum).astype(np.float64) / np.float64(den)


def expand_groups(a, gs, cols):
    """(rows, ng) per-group values -> (rows, cols) per-element values."""
    return np.repeat(a, gs, axis=1)[:, :cols]


def materialize(T_packed, E, corr_accum, gs, num, den, cols):
    S = np.exp2(E.astype(np.float64) + xi(corr_accum, num, den)).astype(np.float32)
    return expand_groups(S, gs, cols) * unpack(T_packed, cols).astype(np.float32)


def vote_delta(grad, T_packed, gs, ng):
    rows, cols = grad.shape
    prod = np.zeros((rows, ng * gs), np.int64)
    prod[:, :cols] = np.sign(grad).astype(np.int64) * unpack(T_packed, cols)
    return -prod.reshape(rows, ng, gs).sum(axis=2)


def apply_votes(corr_accum, E, delta, carry_limit):
    """Returns new (corr_accum, E, carries, saturations); inputs untouched."""
    c = corr_accum + delta
    e = E.astype(np.int64)
    carries = sats = 0
    if carry_limit:
        for idx in np.ndindex(c.shape):
            while c[idx] >= carry_limit:
                if e[idx] < 127:
                    e[idx] += 1
                    c[idx] -= carry_limit
                    carries += 1
                else:
                    c[idx] = carry_limit - 1
                    sats += 1
            while c[idx] <= -carry_limit:
                if e[idx] > -128:
                    e[idx] -= 1
                    c[idx] += carry_limit
                    carries += 1
                else:
                    c[idx] = -(carry_limit - 1)
                    sats += 1
    return c, e.astype(np.int8), carries, sats


def trit_votes(grad, cols_p, gain_m=0.0, key=0, vote_max=1, tensor_norm=False):
    """(rows, cols) int64 trit votes: -sign(grad), or with gain_m > 0 -sign(grad) * k, k the stochastic
    rounding of a = min(vote_max, gain_m*|g|/rms): floor(a), plus one when the counter-based draw of
    formats.vote_key (pure Python ints) is below a - floor(a); rms over the row, or over the whole tensor
    with ``tensor_norm``."""
    from ..schedule import GOLDEN64, mix64

    rows, cols = grad.shape
    r = -np.sign(grad).astype(np.int64)
    if gain_m == 0.0:
        return r
    total = float(np.sum(grad.astype(np.float64) ** 2))
    for i in range(rows):
        g = grad[i].astype(np.float64)
        ss = total / rows if tensor_norm else float(np.sum(g * g))
        if ss == 0.0:
            r[i] = 0
            continue
        scale = gain_m / np.sqrt(ss / cols)
        for j in range(cols):
            a = min(abs(g[j]) * scale, float(vote_max))
            k = math.floor(a)
            if r[i, j] and a > k:
                u = mix64(key ^ ((i * cols_p + j) * GOLDEN64)) >> 40
                k += int(float(u) < (a - k) * 16777216.0)
            r[i, j] *= k
    return r


def flip(grad, T_packed, flip_accum, theta, gain_m=0.0, key=0, vote_max=1, tensor_norm=False, reset=0):
    """Returns new (T_packed, flip_accum, flips); inputs untouched."""
    rows, cols = grad.shape
    T = unpack(T_packed, flip_accum.shape[1]).astype(np.int64)
    c = flip_accum.astype(np.int64)
    v = np.clip(c[:, :cols] + trit_votes(grad, flip_accum.shape[1], gain_m, key, vote_max, tensor_norm), -theta, theta)
    t = T[:, :cols]
    up = (v == theta) & (t < 1)
    down = (v == -theta) & (t > -1)
    t = t + up - down
    v = np.where(up, -reset, np.where(down, reset, v))
    T[:, :cols] = t
    c[:, :cols] = v
    return pack(T.astype(np.int8), T_packed.shape[1]), c.astype(np.int8), int(up.sum() + down.sum())


def fuse(E, corr_accum, num, den):
    x = xi(corr_accum, num, den)
    v = np.rint(E.astype(np.float64) + x)
    clipped = int(((v > 127) | (v < -128)).sum())
    return np.clip(v, -128, 127).astype(np.int8), clipped, int((np.abs(x) >= 0.5).sum())

