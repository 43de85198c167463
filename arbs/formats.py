"""The E1TM format table: every constant and shape rule a reader or writer needs, in one place.

formats/SPEC.md is the normative text; this module mirrors it. numpy only.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

FORMAT_VERSION = 1
TRITS_PER_BYTE = 5
MAX_PACKED_BYTE = 242  # 3**5 - 1; bytes 243..255 are invalid
E_MIN, E_MAX = -128, 127

# name -> gs (group size: weights along a row that share one int8 exponent E)
VARIANTS: dict[str, int] = {
    "E1TM4": 4,
    "E1TM6": 6,
    "E1TM8": 8,
    "E1TM16": 16,
    "E1TM32": 32,
    "E1TM64": 64,
    "E1TM96": 96,
}
DEFAULT_VARIANT = "E1TM32"


@dataclass(frozen=True)
class RuleSpec:
    """How an update rule computes Xi and what persistent arrays it adds.

    Xi = (xi_num * corr_accum) / xi_den, computed in float64, with
    average: xi_num = 4, xi_den = step_counter * gs (Xi = 0 at step 0);
    carry, flip: xi_num = 1, xi_den = K * gs.
    """

    name: str
    params: tuple[str, ...]  # integer parameters stored in the checkpoint attrs
    extra_arrays: tuple[str, ...]  # per-tensor arrays beyond T_packed, E, corr_accum
    summary: str


RULES: dict[str, RuleSpec] = {
    "average": RuleSpec(
        "average", (), (),
        "the design's rule: Xi = 4*corr_accum/(step*gs); T and E frozen (calibrates scales only)",
    ),
    "carry": RuleSpec(
        "carry", ("K",), (),
        "integrating scale: Xi = corr_accum/(K*gs); a full K*gs carries into E",
    ),
    "flip": RuleSpec(
        "flip", ("K", "theta", "gain", "horizon", "vote_max"), ("flip_accum",),
        "carry for scales plus an int8 counter per weight that moves trits -1 <-> 0 <-> +1 at +-theta",
    ),
}
# gain = 0: every weight votes -sign(grad) each step (the plain flip rule). gain > 0: magnitude-aware
# stochastic votes (see trit_vote_gain) of up to vote_max counter steps each; horizon > 0 adds a warmup +
# cosine schedule ending at that step. A checkpoint written before vote_max existed reads as vote_max 1,
# which is the rule it was trained with.
DEFAULT_PARAMS: dict[str, int] = {"K": 16, "theta": 8, "gain": 0, "horizon": 0, "vote_max": 1}
LATER_PARAMS = ("vote_max",)  # added after format version 1: a checkpoint may lack them (then: the default)
PARAM_RANGES: dict[str, tuple[int, int]] = {"K": (1, 1 << 20), "theta": (1, 127), "gain": (0, 1 << 10),
                                            "horizon": (0, 1 << 40), "vote_max": (1, 127)}


@dataclass(frozen=True)
class ArraySpec:
    """One per-tensor array: name, dtype, and its shape as a function of (rows, cols_p, gs)."""

    name: str
    dtype: np.dtype
    kind: str  # "packed" (rows, ceil(cols_p/5)), "group" (rows, cols_p/gs), "element" (rows, cols_p)


ARRAYS: dict[str, ArraySpec] = {
    "T_packed": ArraySpec("T_packed", np.dtype(np.uint8), "packed"),
    "E": ArraySpec("E", np.dtype(np.int8), "group"),
    "corr_accum": ArraySpec("corr_accum", np.dtype(np.int64), "group"),
    "flip_accum": ArraySpec("flip_accum", np.dtype(np.int8), "element"),
}
STEP_COUNTER = "step_counter"  # 0-d int64 at the checkpoint root
STEP_COUNTER_DTYPE = np.dtype(np.int64)
INFERENCE_ARRAYS = ("T_packed", "E")


def did_you_mean(word: str, choices) -> str:
    folded = {str(c).casefold(): c for c in choices}  # case-insensitive: "e1tm32" -> 'E1TM32'
    close = difflib.get_close_matches(str(word).casefold(), list(folded), n=1)
    return f" Did you mean {folded[close[0]]!r}?" if close else ""


def variant_gs(name: str) -> int:
    """Group size of an E1TM variant name, e.g. ``variant_gs("E1TM32") == 32``."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(
            f"unknown format {name!r}; valid E1TM formats: {', '.join(VARIANTS)}.{did_you_mean(name, VARIANTS)}"
        ) from None


def rule_spec(name: str) -> RuleSpec:
    try:
        return RULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown update rule {name!r}; valid rules: {', '.join(RULES)}.{did_you_mean(name, RULES)}"
        ) from None


def unused_params(rule: str, given: dict[str, int | None]) -> list[str]:
    """Names in ``given`` with a value (not None) that rule ``rule`` does not take, sorted."""
    return sorted(k for k, v in given.items() if v is not None and k not in rule_spec(rule).params)


def rule_params(rule: str, **given: int | None) -> dict[str, int]:
    """The rule's integer parameters: defaults filled in, unknown or out-of-range values rejected."""
    spec = rule_spec(rule)
    out = {}
    for p in spec.params:
        v = given.get(p)
        v = DEFAULT_PARAMS[p] if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"rule {rule!r} parameter {p} must be an integer, got {v!r}")
        lo, hi = PARAM_RANGES[p]
        if not lo <= int(v) <= hi:
            raise ConfigError(f"rule {rule!r} parameter {p}={v} is out of range; expected {lo}..{hi}")
        out[p] = int(v)
    return out


def tensor_view(shape) -> tuple[int, int]:
    """(rows, cols) of a weight of logical ``shape``: rows = d0, cols = d1*d2*...; 1-D is (1, d0)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        raise ConfigError("a 0-d (scalar) tensor cannot be stored in E1TM; it has no rows to group")
    if any(d < 0 for d in shape):
        raise ConfigError(f"tensor shape {shape} has a negative dimension")
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def padded_cols(cols: int, gs: int) -> int:
    """cols_p = ceil(cols/gs)*gs: each row is padded with zero trits to whole groups."""
    return -(-cols // gs) * gs


def n_groups(cols: int, gs: int) -> int:
    return -(-cols // gs)


def packed_cols(cols_p: int) -> int:
    """Bytes per packed row: ceil(cols_p/5)."""
    return -(-cols_p // TRITS_PER_BYTE)


def array_shape(name: str, rows: int, cols: int, gs: int) -> tuple[int, int]:
    """Shape of per-tensor array ``name`` for a tensor viewed as (rows, cols)."""
    cols_p = padded_cols(cols, gs)
    kind = ARRAYS[name].kind
    if kind == "packed":
        return rows, packed_cols(cols_p)
    if kind == "group":
        return rows, cols_p // gs
    return rows, cols_p


def tensor_arrays(rule: str | None, fused: bool = False) -> tuple[str, ...]:
    """Names of the per-tensor arrays a checkpoint holds: inference arrays when fused, else the rule's."""
    if fused:
        return INFERENCE_ARRAYS
    return ("T_packed", "E", "corr_accum") + rule_spec(rule).extra_arrays


def theoretical_bpw(gs: int, rule: str | None = None, fused: bool = False) -> float:
    """Bits per weight when cols is a multiple of lcm(gs, 5): 8/5 + 8/gs [+ 64/gs] [+ 8 for flip]."""
    bits = 8 / TRITS_PER_BYTE + 8 / gs
    if not fused:
        bits += 64 / gs
        if rule is not None and "flip_accum" in rule_spec(rule).extra_arrays:
            bits += 8
    return bits


def xi_ratio(rule: str, params: dict[str, int], step_counter: int, gs: int) -> tuple[int, int]:
    """(xi_num, xi_den) with Xi = float64(xi_num * corr_accum) / float64(xi_den); xi_den == 0 means Xi = 0.

    average: Xi = 4*corr_accum/(step_counter*gs) (0 at step 0); carry/flip: Xi = corr_accum/(K*gs).
    """
    if rule == "average":
        return 4, int(step_counter) * gs
    rule_spec(rule)
    return 1, params["K"] * gs


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


def vote_base(seed: int, tensor: int) -> int:
    """The part of vote_key fixed for a run's tensor: mix64(mix64(seed) ^ tensor)."""
    return mix64(mix64(seed) ^ tensor)


def vote_key(seed: int, tensor: int, step_counter: int) -> int:
    """Counter-based RNG key of one tensor's votes at one step: element i of the (rows, cols_p) view
    draws u = (mix64(key ^ (i * GOLDEN64 mod 2**64)) >> 40) / 2**24. No RNG state is stored, so a
    resumed run draws the same numbers. (The GPU kernel gets vote_base and mixes in the step itself.)"""
    return mix64(vote_base(seed, tensor) ^ step_counter)


def carry_limit(rule: str, params: dict[str, int], gs: int) -> int:
    """K*gs for the carrying rules (a group carries into E when |corr_accum| reaches it); 0 for average."""
    return 0 if rule == "average" else params["K"] * gs


@dataclass(frozen=True)
class Scheme:
    """A variant plus an update rule with its integer parameters: everything the kernels need besides arrays."""

    format: str
    rule: str
    params: dict = None  # filled by make_scheme

    @property
    def gs(self) -> int:
        return variant_gs(self.format)

    def xi_ratio(self, step_counter: int) -> tuple[int, int]:
        return xi_ratio(self.rule, self.params, step_counter, self.gs)

    @property
    def carry_limit(self) -> int:
        return carry_limit(self.rule, self.params, self.gs)

    def arrays(self) -> tuple[str, ...]:
        return tensor_arrays(self.rule)


def make_scheme(format: str = DEFAULT_VARIANT, rule: str = "carry", **params: int | None) -> Scheme:
    """Validated Scheme: known variant and rule, integer params in range, defaults filled in."""
    variant_gs(format)
    return Scheme(format, rule, rule_params(rule, **params))
