"""flip's vote schedule and the counter-based hash its stochastic votes draw from.

No RNG state is stored anywhere: a draw is a pure function of (seed, tensor index, step_counter,
element index), so a resumed run draws the same numbers. The kernels (numba and Triton) carry the same
arithmetic; these are the Python (and numpy) definitions the spec, the tests and the data-parallel mean
vote use.
"""

from __future__ import annotations

import math

import numpy as np


def trit_vote_gain(params: dict[str, int], step_counter: int) -> float:
    """The flip rule's vote gain at ``step_counter``: ``gain * m(step)``, or 0.0 for plain sign votes.

    With gain > 0 the vote of a weight is -sign(g) * k, with k the stochastic rounding of
    a = min(vote_max, gain_m * |g| / rms(g over its row)) (floor(a), plus one with probability
    a - floor(a)): small gradients rarely vote, so unimportant trits stop random-walking, and large
    ones move their counter by up to vote_max steps. m(step) = 1 when
    horizon = 0; else a linear warmup over the first horizon//20 steps, then a cosine from 1 to 0 at
    step = horizon (and 0 after it: trits are final).
    """
    gain, horizon = params.get("gain", 0), params.get("horizon", 0)
    if gain == 0:
        return 0.0
    if horizon == 0:
        return float(gain)
    warmup = horizon // 20
    if step_counter < warmup:
        return gain * (step_counter + 1) / warmup
    frac = min(1.0, (step_counter - warmup) / max(1, horizon - warmup))
    return gain * 0.5 * (1.0 + math.cos(math.pi * frac))


_M64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15


def mix64(x: int) -> int:
    """splitmix64's finalizer on a 64-bit unsigned integer (the kernels carry the same arithmetic)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`mix64` on a uint64 array, elementwise (uint64 arithmetic wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def vote_base(seed: int, tensor: int) -> int:
    """The part of vote_key fixed for a run's tensor: mix64(mix64(seed) ^ tensor)."""
    return mix64(mix64(seed) ^ tensor)


def vote_key(seed: int, tensor: int, step_counter: int) -> int:
    """Counter-based RNG key of one tensor's votes at one step: element i of the (rows, cols_p) view
    draws u = (mix64(key ^ (i * GOLDEN64 mod 2**64)) >> 40) / 2**24. No RNG state is stored, so a
    resumed run draws the same numbers. (The GPU kernel gets vote_base and mixes in the step itself.)"""
    return mix64(vote_base(seed, tensor) ^ step_counter)


# Salts that separate the mean vote's rounding draws (arbs.distributed.mean_votes) from every vote's own draws:
# one stream for the scale votes (corr_accum deltas), one for flip's counter steps.
MEAN_VOTE_SALTS = {"scales": 0x5CA1E5D1F0E2A7B3, "trits": 0x7E1757E9C0A4D1B5}


def mean_vote_key(seed: int, tensor: int, step_counter: int, part: str) -> int:
    """Counter-based key of the stochastic rounding that divides one tensor's summed votes (``part``: "scales" or
    "trits") by the step's slot count: ``mix64(vote_key(seed, tensor, step_counter) ^ MEAN_VOTE_SALTS[part])``.
    Element i of the count array (C order) draws ``mix64(key ^ (i * GOLDEN64 mod 2**64))``. No RNG state."""
    return mix64(vote_key(seed, tensor, step_counter) ^ MEAN_VOTE_SALTS[part])
