"""The E1TM format table: every constant and shape rule a reader or writer needs, in one place.

formats/SPEC.md is the normative text; this module mirrors it. numpy only.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, IntegerRangeError

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
        "flip", ("K", "theta", "gain", "horizon", "vote_max", "vote_norm", "reset"), ("flip_accum",),
        "carry for scales plus an int8 counter per weight that moves trits -1 <-> 0 <-> +1 at +-theta",
    ),
}


@dataclass(frozen=True)
class ParamSpec:
    """One integer rule parameter: its default (what ``arbs train``, ``ternarize_`` and ``convert`` use),
    its valid range, and ``absent``: the value a checkpoint that lacks it was trained with (parameters
    added after format version 1; None: every checkpoint records it)."""

    name: str
    default: int
    lo: int
    hi: int
    absent: int | None
    summary: str


# The one parameter table; the defaults were measured in docs/research/training.md. gain = 0: every weight votes -sign(g)
# each step (the plain flip rule); gain > 0: magnitude-aware stochastic votes (schedule.trit_vote_gain)
# of up to vote_max counter steps; horizon > 0 adds a warmup + cosine schedule ending at that step
# (arbs train sets it to --steps).
PARAMS: dict[str, ParamSpec] = {p.name: p for p in (
    ParamSpec("K", 16, 1, 1 << 20, None, "carry/flip: Xi = corr_accum/(K*gs); a full K*gs carries into E"),
    ParamSpec("theta", 16, 1, 127, None, "flip: counter threshold that moves a trit"),
    ParamSpec("gain", 4, 0, 1 << 10, None, "flip: stochastic vote gain; 0 = every weight votes -sign(g) each step"),
    ParamSpec("horizon", 0, 0, 1 << 40, None, "flip: step where the vote schedule ends; 0 = constant"),
    ParamSpec("vote_max", 3, 1, 127, 1, "flip with gain > 0: largest counter step of one vote"),
    ParamSpec("vote_norm", 1, 0, 1, 0, "flip with gain > 0: |g| is measured against the rms of 0 = its row, "
              "1 = its whole tensor"),
    ParamSpec("reset", 0, 0, 126, 0, "flip: a trit that moves starts its counter at -reset*direction; 0 = afresh, "
              "theta-1 = where it crossed (below theta)"),
)}
DEFAULT_RULE = "flip"

# Float-latent baselines (arbs.nn.baselines implements them): not E1TM, trained with AdamW.
FLOAT_FORMATS = ("fp32", "learned-s", "absmean", "absmean-row", "lsq", "factorized", "absmax-group")


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
INT64_MAX = (1 << 63) - 1
# average: gs*step_counter < 2**61, so that with |corr_accum| <= gs*step_counter the numerator
# 4*corr_accum and the denominator gs*step_counter of Xi both fit int64 (|4*corr_accum| < 2**63)
AVERAGE_DEN_LIMIT = 1 << 61
INFERENCE_ARRAYS = ("T_packed", "E")


def did_you_mean(word: str, choices) -> str:
    """`` Did you mean 'X'?`` for the closest of ``choices`` (case-insensitive), or ''."""
    folded = {str(c).casefold(): c for c in choices}  # case-insensitive: "e1tm32" -> 'E1TM32'
    close = difflib.get_close_matches(str(word).casefold(), list(folded), n=1)
    return f" Did you mean {folded[close[0]]!r}?" if close else ""


def lookup(table, name, what: str, valid: str | None = None):
    """``table[name]``, or ConfigError: ``unknown <what> 'x'; valid <valid>: a, b, c. Did you mean 'b'?``
    (``valid`` defaults to ``what`` + "s"). The one lookup-or-suggest of formats, rules, presets, baselines."""
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown {what} {name!r}; valid {valid or what + 's'}: {', '.join(table)}.{did_you_mean(str(name), table)}"
        ) from None


def variant_gs(name: str) -> int:
    """Group size of an E1TM variant name, e.g. ``variant_gs("E1TM32") == 32``."""
    return lookup(VARIANTS, name, "format", "E1TM formats")


def rule_spec(name: str) -> RuleSpec:
    return lookup(RULES, name, "update rule", "rules")


def is_e1tm(fmt: str) -> bool:
    """Whether ``fmt`` names an E1TM variant (else a float baseline, or nothing)."""
    return fmt in VARIANTS


def check_format(fmt: str) -> None:
    """ConfigError unless ``fmt`` is an E1TM variant or a float baseline."""
    lookup(dict.fromkeys((*VARIANTS, *FLOAT_FORMATS)), fmt, "format")


def rule_params(rule: str, **given: int | None) -> dict[str, int]:
    """The rule's integer parameters: the table's defaults filled in where ``given`` has None or nothing.

    ConfigError for a parameter the rule does not take, a non-integer, or a value out of range.
    """
    spec = rule_spec(rule)
    for name, v in given.items():
        if v is not None and name not in spec.params:
            raise ConfigError(f"rule {rule!r} takes no parameter {name} "
                              f"(its parameters: {', '.join(spec.params) or 'none'})")
    out = {}
    for p in spec.params:
        v = given.get(p)
        v = PARAMS[p].default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"rule {rule!r} parameter {p} must be an integer, got {v!r}")
        lo, hi = PARAMS[p].lo, PARAMS[p].hi
        if not lo <= int(v) <= hi:
            raise ConfigError(f"rule {rule!r} parameter {p}={v} is out of range; expected {lo}..{hi}")
        out[p] = int(v)
    if out.get("reset", 0) >= out.get("theta", 1 << 30):
        raise ConfigError(f"rule {rule!r} parameter reset={out['reset']} must be below theta={out['theta']}")
    return out


def recorded_rule_params(rule: str, recorded: dict) -> dict[str, int]:
    """The complete parameters of a checkpoint's rule from what it recorded: a parameter added after
    format version 1 that it lacks reads as the value it was trained with (``ParamSpec.absent``);
    any other missing or extra key is a ConfigError."""
    spec = rule_spec(rule)
    required = {p for p in spec.params if PARAMS[p].absent is None}
    if not required <= set(recorded) <= set(spec.params):
        raise ConfigError(
            f"rule_params has keys {sorted(recorded)}; rule {rule!r} takes {sorted(spec.params)} "
            f"({', '.join(sorted(set(spec.params) - required)) or 'none'} optional)"
        )
    absent = {p: PARAMS[p].absent for p in spec.params if p not in recorded}
    return rule_params(rule, **(absent | dict(recorded)))


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


def max_step_counter(rule: str | None, gs: int | None) -> int:
    """The largest step_counter a checkpoint of ``rule`` may hold: (2**61 - 1)//gs for average (so that
    gs*step_counter < 2**61, see AVERAGE_DEN_LIMIT), else the int64 maximum."""
    return (AVERAGE_DEN_LIMIT - 1) // gs if rule == "average" else INT64_MAX


def xi_ratio(rule: str, params: dict[str, int], step_counter: int, gs: int) -> tuple[int, int]:
    """(xi_num, xi_den) with Xi = float64(xi_num * corr_accum) / float64(xi_den); xi_den == 0 means Xi = 0.

    average: Xi = 4*corr_accum/(step_counter*gs) (0 at step 0); carry/flip: Xi = corr_accum/(K*gs).
    Both fit int64: IntegerRangeError for average outside 0 <= step_counter*gs < 2**61.
    """
    if rule == "average":
        step = int(step_counter)
        if not 0 <= step <= max_step_counter(rule, gs):
            raise IntegerRangeError(
                f"rule 'average' at step_counter={step} with gs={gs}: Xi = 4*corr_accum/(gs*step_counter) needs "
                f"0 <= gs*step_counter < 2**61 (step_counter <= {max_step_counter(rule, gs)}) to stay in int64"
            )
        return 4, step * gs
    rule_spec(rule)
    return 1, params["K"] * gs


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


def make_scheme(format: str = DEFAULT_VARIANT, rule: str = DEFAULT_RULE, **params: int | None) -> Scheme:
    """Validated Scheme: known variant and rule, integer params in range, defaults filled in."""
    variant_gs(format)
    return Scheme(format, rule, rule_params(rule, **params))


def grid_groups(gs: int, block: int) -> int:
    """Groups per grid block; ConfigError unless ``block`` is a positive multiple of ``gs``."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block % gs:
        raise ConfigError(f"a scale grid of {block!r} weights does not tile groups of gs={gs}: choose a multiple "
                          f"of {gs} (TQ1_0/TQ2_0 need 256; variants with gs dividing 256: E1TM4/8/16/32/64)")
    return block // gs
