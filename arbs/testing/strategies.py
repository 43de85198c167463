"""Hypothesis strategies for E1TM data: variants, schemes, shapes, trits, states and gradients.

Like ``zarr.testing.strategies``, these are public so that downstream code can property-test against
the same generators. Bulk array contents come from a numpy Generator seeded by hypothesis (fast, and
reproducible from the printed falsifying example); shapes, parameters, seeds and the special values
planted into arrays (bounds, zeros, NaN) are drawn by hypothesis directly so that they shrink.

Everything here is valid by construction unless a strategy says otherwise: trits in {-1, 0, +1},
padding trits 0, corr_accum inside the rule's bounds, flip_accum inside +-theta. The arrays come from
``arbs.testing.states`` (the one generator that tests and benchmarks share).
"""

from __future__ import annotations

import numpy as np
try:
    from hypothesis import strategies as st
except ImportError as e:  # the test extra: pip install "arbs[test]"
    raise ImportError("arbs.testing.strategies needs hypothesis; install it with: pip install 'arbs[test]'") from e

from .. import formats
from .states import random_state, random_trits

__all__ = [
    "variants", "gs_values", "rules", "lengths", "shapes", "seeds", "schemes", "trits", "e1tm_states",
    "gradients", "State",
]

variants = st.sampled_from(list(formats.VARIANTS))  # "E1TM4", ..., "E1TM96"
gs_values = st.sampled_from(sorted(set(formats.VARIANTS.values())))
rules = st.sampled_from(list(formats.RULES))
seeds = st.integers(0, 2**32 - 1)

# Row lengths that exercise the packing edges: 0, 1, 5k-1, 5k, 5k+1, and common group multiples.
_EDGE_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 14, 15, 16, 24, 31, 32, 33, 63, 64, 65, 95, 96, 97, 100, 159, 160, 161)


def lengths(max_value: int = 200) -> st.SearchStrategy[int]:
    """Row lengths: the packing edge cases (0, 1, 5k+-1, gs+-1) or anything up to ``max_value``."""
    return st.one_of(st.sampled_from([n for n in _EDGE_LENGTHS if n <= max_value]), st.integers(0, max_value))


def shapes(min_dims: int = 1, max_dims: int = 4, max_rows: int = 9, max_cols: int = 200,
           allow_empty: bool = True) -> st.SearchStrategy[tuple[int, ...]]:
    """Logical weight shapes of 1..4 dims whose tensor view is at most ``max_rows`` x ``max_cols``."""

    @st.composite
    def _shapes(draw):
        ndim = draw(st.integers(min_dims, max_dims))
        lo = 0 if allow_empty else 1
        if ndim == 1:
            return (draw(lengths(max_cols).filter(lambda n: n >= lo)),)
        rows = draw(st.integers(lo, max_rows))
        if ndim == 2:
            return rows, draw(lengths(max_cols).filter(lambda n: n >= lo))
        # split cols over the trailing dims: d1*d2*... <= max_cols
        rest = []
        budget = max_cols
        for _ in range(ndim - 1):
            d = draw(st.integers(lo, max(lo, min(budget, 12))))
            rest.append(d)
            budget = max(1, budget // max(d, 1))
        return (rows, *rest)

    return _shapes()


@st.composite
def schemes(draw, rule=None, format=None, small: bool = True) -> formats.Scheme:
    """A validated Scheme. ``small`` draws small K and theta so that carries, saturations and flips
    happen within a few votes."""
    fmt = format if format is not None else draw(variants)
    r = rule if rule is not None else draw(rules)
    params = {}
    if "K" in formats.RULES[r].params:
        params["K"] = draw(st.integers(1, 4) if small else st.integers(1, 64))
    if "theta" in formats.RULES[r].params:
        params["theta"] = draw(st.integers(1, 3) if small else st.integers(1, 127))
    return formats.make_scheme(fmt, r, **params)


@st.composite
def trits(draw, rows=None, cols=None, max_rows: int = 6, max_cols: int = 200) -> np.ndarray:
    """int8 (rows, cols) trits in {-1, 0, +1}; sometimes all zero, all +1 or all -1."""
    rows = draw(st.integers(0, max_rows)) if rows is None else rows
    cols = draw(lengths(max_cols)) if cols is None else cols
    kind = draw(st.sampled_from(["random", "random", "random", "zeros", "ones", "minus"]))
    if kind == "zeros":
        return np.zeros((rows, cols), np.int8)
    if kind == "ones":
        return np.ones((rows, cols), np.int8)
    if kind == "minus":
        return -np.ones((rows, cols), np.int8)
    return random_trits(np.random.default_rng(draw(seeds)), rows, cols)


class State:
    """A drawn E1TM tensor: ``scheme``, logical ``shape``, ``step`` (step_counter), ``arrays`` and the
    unpacked trits ``T`` (int8, (rows, cols)) the arrays were built from."""

    def __init__(self, scheme, shape, step, arrays, T):
        self.scheme, self.shape, self.step, self.arrays, self.T = scheme, tuple(shape), step, arrays, T

    @property
    def rows_cols(self) -> tuple[int, int]:
        return formats.tensor_view(self.shape)

    def copy(self) -> "State":
        return State(self.scheme, self.shape, self.step, {k: v.copy() for k, v in self.arrays.items()}, self.T.copy())

    def __repr__(self) -> str:
        return f"State({self.scheme.format}, {self.scheme.rule}, {self.scheme.params}, shape={self.shape}, step={self.step})"


@st.composite
def e1tm_states(draw, scheme=None, shape=None, step=None, rule=None, format=None,
                max_rows: int = 6, max_cols: int = 200) -> State:
    """A valid E1TM tensor state (see ``State``); corr_accum and E reach their bounds."""
    scheme = draw(schemes(rule=rule, format=format)) if scheme is None else scheme
    shape = draw(shapes(max_rows=max_rows, max_cols=max_cols)) if shape is None else shape
    step = draw(st.sampled_from([0, 1, 2, 3, 7, 100, 12345])) if step is None else step
    # average at step 0: the bound gs*0 = 0 makes corr_accum all zero, as at the start of training
    rng = np.random.default_rng(draw(seeds))
    rows, cols = formats.tensor_view(shape)
    T = random_trits(rng, rows, cols, scheme.gs)
    E_range = (-128, 127) if rng.random() < 0.5 else (-4, 4)  # half of them: E near 0
    return State(scheme, shape, step, random_state(rng, scheme, shape, step, T=T, E_range=E_range), T)


@st.composite
def gradients(draw, shape, dtype=None, nonfinite: bool = False, zeros: bool = True) -> np.ndarray:
    """A float32/float64 gradient of ``shape``; with ``nonfinite`` it holds at least one NaN/+inf/-inf.

    Some entries are exact zeros (and -0.0), which vote 0.
    """
    dtype = draw(st.sampled_from([np.float32, np.float64])) if dtype is None else dtype
    rng = np.random.default_rng(draw(seeds))
    g = rng.standard_normal(shape).astype(dtype)
    if zeros and g.size:
        g.flat[rng.integers(0, g.size, max(1, g.size // 8))] = 0.0
        g.flat[rng.integers(0, g.size, 1)] = -0.0
    if nonfinite:
        if g.size == 0:
            raise ValueError("a gradient with no elements cannot hold a non-finite value")
        bad = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=1, max_size=3))
        idx = draw(st.lists(st.integers(0, g.size - 1), min_size=len(bad), max_size=len(bad)))
        g.flat[idx] = bad
    return g
