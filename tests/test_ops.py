"""Properties of the public numpy API (arbs.ops): packing, materialize, the update rules, fuse, convert,
and its validation errors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbs import formats, schedule
from arbs import ops
from conftest import scheme_for
from arbs.errors import ArbsError, ConfigError, NonFiniteError
from arbs.testing import reference as ref
from arbs.testing import strategies as S
from arbs.testing.states import assert_same, pack_trits, random_state

# hypothesis imports libcst to print a falsifying example, and libcst's import warns (mypy_extensions
# TypedDict): without this, any failure would surface as an INTERNALERROR under filterwarnings=error.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GS = sorted(set(formats.VARIANTS.values()))


def snapshot(state) -> dict:
    return {k: v.copy() for k, v in state.items()}


def assert_unchanged(state, before, what: str) -> None:
    for k in before:
        assert_same(state[k], before[k], f"{what}: {k}")


def trits_of(state, shape, gs) -> np.ndarray:
    rows, cols = formats.tensor_view(shape)
    return ops.unpack(state["T_packed"], cols)


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("gs", GS)
@FAST
@given(T=S.trits(max_rows=5, max_cols=250))
def test_pack_roundtrip_bytes_and_padding(gs, T):
    rows, cols = T.shape
    Tp = ops.pack(T, gs)
    nb = formats.packed_cols(formats.padded_cols(cols, gs))
    assert Tp.dtype == np.uint8 and Tp.shape == (rows, nb)
    assert_same(ops.unpack(Tp, cols), T, "unpack(pack(T))")
    assert (Tp < 243).all(), "every packed byte must be < 243"
    full = ops.unpack(Tp, 5 * nb)  # padding trits included
    assert (full[:, cols:] == 0).all(), "padding trits must be 0 (digit 1)"
    digits = (Tp.astype(np.int64)[:, :, None] // 3 ** np.arange(5)) % 3
    assert (digits.reshape(rows, 5 * nb)[:, cols:] == 1).all()


@pytest.mark.parametrize("cols", [0, 1, 4, 5, 6, 9, 10, 11, 95, 96, 97])
def test_pack_lengths_and_pad_byte(cols):
    """Lengths 0, 1, 5k+-1; a byte of five padding trits is 1+3+9+27+81 = 121."""
    T = np.ones((2, cols), np.int8)
    for gs in GS:
        Tp = ops.pack(T, gs)
        assert_same(ops.unpack(Tp, cols), T, f"gs={gs} cols={cols}")
        assert (Tp[:, -(-cols // 5):] == 121).all()  # bytes holding only padding


def test_pack_digit_order():
    """digit = trit + 1, byte = d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4, first trit least significant."""
    T = np.array([[1, 0, -1, -1, -1, 1, 1, 1, 1, 1]], np.int8)  # gs=4: cols_p = 12, two padding trits
    assert ops.pack(T, 4).tolist() == [[5, 242, 121]]


# ------------------------------------------------------------------------------------- materialize


def scales(state, shape, scheme, step) -> np.ndarray:
    """S per element (rows, cols) from the numpy reference."""
    rows, cols = formats.tensor_view(shape)
    num, den = scheme.xi_ratio(step)
    with np.errstate(over="ignore"):
        s = np.exp2(state["E"].astype(np.float64) + ref.xi(state["corr_accum"], num, den)).astype(np.float32)
    return ref.expand_groups(s, scheme.gs, cols)


@FAST
@given(st_=S.e1tm_states())
def test_sign_of_w_eff_is_T_and_magnitude_is_S(st_):
    W = ops.materialize(st_.arrays, st_.shape, st_.scheme, st_.step)
    assert W.dtype == np.float32 and W.shape == st_.shape
    rows, cols = st_.rows_cols
    W2 = W.reshape(rows, cols)
    Sg = scales(st_.arrays, st_.shape, st_.scheme, st_.step)
    T = st_.T
    finite = np.isfinite(Sg)  # S overflows to inf only for E near 127 under the average rule
    assert_same(np.sign(W2)[finite].astype(np.int8), T[finite], "sign(W_eff) == T")
    active = (T != 0) & finite
    assert_same(np.abs(W2)[active], Sg[active], "|W_eff| == S on active positions")
    assert (W2[(T == 0) & finite] == 0).all()


def test_materialize_out_and_fused():
    scheme = scheme_for("E1TM8", "carry", K=2)
    w = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    state, _ = ops.convert(w, scheme)
    out = np.empty((4, 3, 5), np.float32)
    assert ops.materialize(state, (4, 3, 5), scheme, 0, out=out) is out
    state["corr_accum"][:] = 0  # Xi = 0: S = 2**E exactly, as a fused tensor
    assert_same(ops.materialize_fused(state["T_packed"], state["E"], (4, 3, 5), 8),
                ops.materialize(state, (4, 3, 5), scheme, 0), "fused == Xi=0")


# -------------------------------------------------------------------------------------------- votes


def delta_of(state, grad, shape, gs) -> np.ndarray:
    rows, cols = formats.tensor_view(shape)
    ng = formats.n_groups(cols, gs)
    return ref.vote_delta(grad.reshape(rows, cols), state["T_packed"], gs, ng)


@FAST
@given(st_=S.e1tm_states(rule="average"), data=st.data())
def test_average_two_votes_equal_summed_delta(st_, data):
    """vote(g1); vote(g2) == corr_accum + delta(g1) + delta(g2) at once; T and E frozen."""
    g1 = data.draw(S.gradients(st_.shape))
    g2 = data.draw(S.gradients(st_.shape))
    gs = st_.scheme.gs
    want = st_.arrays["corr_accum"] + delta_of(st_.arrays, g1, st_.shape, gs) + delta_of(st_.arrays, g2, st_.shape, gs)
    a = snapshot(st_.arrays)
    s1 = ops.vote(a, g1, st_.shape, st_.scheme)
    s2 = ops.vote(a, g2, st_.shape, st_.scheme)
    assert_same(a["corr_accum"], want, "corr_accum")
    assert_same(a["E"], st_.arrays["E"], "E frozen")
    assert_same(a["T_packed"], st_.arrays["T_packed"], "T frozen")
    assert s1.carries == s2.carries == s1.saturations == s1.flips == 0


@FAST
@given(scheme=S.schemes(rule="average"), shape=S.shapes(), n=st.integers(1, 6), data=st.data())
def test_average_corr_bounded_by_step_gs(scheme, shape, n, data):
    """Starting from step 0, after n votes |corr_accum| <= n*gs."""
    arrays = random_state(np.random.default_rng(data.draw(S.seeds)), scheme, shape, 0)
    for _ in range(n):
        ops.vote(arrays, data.draw(S.gradients(shape)), shape, scheme)
    assert (np.abs(arrays["corr_accum"]) <= n * scheme.gs).all()


@FAST
@given(st_=S.e1tm_states(rule="carry"), data=st.data())
def test_carry_bounds_and_continuity(st_, data):
    """|corr_accum| < K*gs after the vote; E*K*gs + corr_accum grows by exactly the summed votes where no
    group saturated, i.e. E + Xi is continuous across a carry."""
    scheme, L = st_.scheme, st_.scheme.carry_limit
    for _ in range(data.draw(st.integers(1, 4))):
        grad = data.draw(S.gradients(st_.shape))
        before = snapshot(st_.arrays)
        delta = delta_of(before, grad, st_.shape, scheme.gs)
        stats = ops.vote(st_.arrays, grad, st_.shape, scheme)
        E0, c0 = before["E"].astype(np.int64), before["corr_accum"]
        E1, c1 = st_.arrays["E"].astype(np.int64), st_.arrays["corr_accum"]
        assert (np.abs(c1) < L).all()
        total0, total1 = E0 * L + c0 + delta, E1 * L + c1
        sat = ((E1 == 127) & (total0 >= 127 * L + L)) | ((E1 == -128) & (total0 <= -128 * L - L))
        assert_same(total1[~sat], total0[~sat], "E*K*gs + corr_accum")
        for idx in list(zip(*np.nonzero(~sat)))[:5]:  # the same statement in exact rationals
            assert Fraction(int(E1[idx])) + Fraction(int(c1[idx]), L) == \
                Fraction(int(E0[idx])) + Fraction(int(c0[idx] + delta[idx]), L)
        assert stats.carries == int(np.abs(E1 - E0).sum())
        assert stats.saturations == int(sat.sum())


@pytest.mark.parametrize("rule", ["carry", "flip"])
def test_carry_saturation_holds_and_counts(rule):
    """At E = 127 a positive carry is refused: E stays, corr_accum held at K*gs-1, counted; mirror at -128."""
    scheme = scheme_for("E1TM4", rule, K=1)
    L = scheme.carry_limit  # 4
    T = np.array([[1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1]], np.int8)
    state = {"T_packed": pack_trits(T, 4), "E": np.array([[127, -128, 0]], np.int8),
             "corr_accum": np.array([[L - 1, -(L - 1), L - 1]], np.int64)}
    if rule == "flip":
        state["flip_accum"] = np.zeros((1, 12), np.int8)
    grad = -np.ones((1, 12), np.float32)  # votes: -sign(g)*T = +T per element -> +4, -4, +4
    stats = ops.vote(state, grad, (1, 12), scheme)
    assert state["E"].tolist() == [[127, -128, 1]]
    assert state["corr_accum"].tolist() == [[L - 1, -(L - 1), L - 1 + 4 - L]]
    assert (stats.carries, stats.saturations) == (1, 2)
    for _ in range(3):  # again and again: never wraps
        ops.vote(state, grad, (1, 12), scheme)
    assert state["E"].tolist()[0][:2] == [127, -128]
    assert state["corr_accum"].tolist()[0][:2] == [L - 1, -(L - 1)]


@pytest.mark.parametrize("rule", ["average", "carry", "flip"])
@FAST
@given(data=st.data())
def test_nonfinite_gradient_raises_and_changes_nothing(rule, data):
    st_ = data.draw(S.e1tm_states(rule=rule, shape=data.draw(S.shapes(allow_empty=False))))
    grad = data.draw(S.gradients(st_.shape, nonfinite=True))
    before = snapshot(st_.arrays)
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        ops.vote(st_.arrays, grad, st_.shape, st_.scheme)
    assert_unchanged(st_.arrays, before, f"{rule} after a NaN/inf gradient")


@FAST
@given(st_=S.e1tm_states(rule="flip"), data=st.data())
def test_flip_moves_one_step_and_never_padding(st_, data):
    rows, cols = st_.rows_cols
    nb = st_.arrays["T_packed"].shape[1]
    theta = st_.scheme.params["theta"]
    for _ in range(data.draw(st.integers(1, 5))):
        before = snapshot(st_.arrays)
        grad = data.draw(S.gradients(st_.shape))
        stats = ops.vote(st_.arrays, grad, st_.shape, st_.scheme)
        T0 = ops.unpack(before["T_packed"], 5 * nb).astype(np.int64)
        T1 = ops.unpack(st_.arrays["T_packed"], 5 * nb).astype(np.int64)
        assert (np.abs(T1 - T0) <= 1).all(), "a trit moves at most one step (-1 <-> 0 <-> +1)"
        assert stats.flips == int((T1 != T0).sum())
        assert (T1[:, cols:] == 0).all(), "padding trits stay 0"
        fa = st_.arrays["flip_accum"]
        assert (fa[:, cols:] == 0).all(), "padding flip_accum stays 0"
        assert (np.abs(fa) <= theta).all()
        moved = T1[:, :cols] != T0[:, :cols]
        assert (fa[:, :cols][moved] == 0).all(), "a flip resets its counter"


# --------------------------------------------------------------------------------------------- fuse


@FAST
@given(st_=S.e1tm_states())
def test_fuse_idempotent_at_xi_zero(st_):
    st_.arrays["corr_accum"][:] = 0
    E_fused, stats = ops.fuse(st_.arrays, st_.shape, st_.scheme, st_.step)
    assert_same(E_fused, st_.arrays["E"], "E_fused at Xi = 0")
    assert stats.clipped == stats.changed == 0 and stats.groups == st_.arrays["E"].size
    again = dict(st_.arrays, E=E_fused)
    assert_same(ops.fuse(again, st_.shape, st_.scheme, st_.step)[0], E_fused, "fuse twice")


@FAST
@given(st_=S.e1tm_states())
def test_fuse_never_modifies_and_stays_in_range(st_):
    before = snapshot(st_.arrays)
    E_fused, _ = ops.fuse(st_.arrays, st_.shape, st_.scheme, st_.step)
    assert_unchanged(st_.arrays, before, "fuse input")
    num, den = st_.scheme.xi_ratio(st_.step)
    assert_same(E_fused, ref.fuse(before["E"], before["corr_accum"], num, den)[0], "E_fused")


@pytest.mark.parametrize("E, frac, want", [(1, 0.5, 2), (2, 0.5, 2), (-1, -0.5, -2), (-2, -0.5, -2), (0, 0.5, 0),
                                           (3, 0.25, 3), (3, 0.75, 4), (127, 0.75, 127), (-128, -0.75, -128)])
@pytest.mark.parametrize("rule", ["carry", "average"])
def test_fuse_rounds_half_to_even_and_clips(E, frac, want, rule):
    scheme = scheme_for("E1TM32", rule, K=16)
    step = 8
    # carry: Xi = corr/(K*gs) with K*gs = 512; average: Xi = 4*corr/(step*gs) = corr/64
    corr = int(frac * 512) if rule == "carry" else int(frac * 64)
    state = {"T_packed": pack_trits(np.zeros((1, 32), np.int8), 32), "E": np.array([[E]], np.int8),
             "corr_accum": np.array([[corr]], np.int64)}
    E_fused, stats = ops.fuse(state, (1, 32), scheme, step)
    assert E_fused.tolist() == [[want]]
    assert stats.clipped == int(abs(frac) > 0.5 and E in (127, -128))


# ------------------------------------------------------------------------------------------ convert


@pytest.mark.parametrize("rule", ["average", "carry", "flip"])
def test_convert_zero_groups_clip_and_name(rule):
    scheme = scheme_for("E1TM8", rule)
    w = np.ones((3, 20), np.float64)
    w[0, :8] = 0.0  # an all-zero group
    w[1, :] = 1e-300  # log2 ~ -997: E clips to -128
    w[2, 8:16] = 2.0**200  # E clips to 127
    state, stats = ops.convert(w, scheme)
    T = ops.unpack(state["T_packed"], 20)
    assert (T[0, :8] == 0).all() and state["E"][0, 0] == 0 and state["corr_accum"][0, 0] == 0
    assert (state["E"][1] == -128).all() and state["E"][2, 1] == 127
    assert stats.zero_groups == 1 and stats.clipped == 3 + 1
    if "flip_accum" in state:
        assert state["flip_accum"].shape == (3, 24) and not state["flip_accum"].any()
    bad = w.copy()
    bad[2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="blocks.7.mlp.weight"):
        ops.convert(bad, scheme, name="blocks.7.mlp.weight")
    with pytest.raises(ConfigError, match="blocks.7"):
        ops.convert(np.ones((2, 3), np.int32), scheme, name="blocks.7")


@pytest.mark.parametrize("rule", ["carry", "flip"])
@FAST
@given(shape=S.shapes(allow_empty=False, max_cols=120), seed=S.seeds, fmt=S.variants, K_=st.sampled_from([1, 4, 16, 1024]))
def test_convert_carry_keeps_the_fraction(rule, shape, seed, fmt, K_):
    """|log2 s - (E + Xi)| <= 1/(2*K*gs) for every non-zero group whose E did not clip."""
    scheme = scheme_for(fmt, rule, K=K_)
    w = np.random.default_rng(seed).standard_normal(shape) * 3.0
    state, _ = ops.convert(w, scheme)
    rows, cols = formats.tensor_view(shape)
    gs, L = scheme.gs, scheme.carry_limit
    T = ops.unpack(state["T_packed"], formats.padded_cols(cols, gs)).astype(np.float64).reshape(rows, -1, gs)
    wp = np.zeros((rows, formats.padded_cols(cols, gs)))
    wp[:, :cols] = w.reshape(rows, cols)
    wp = wp.reshape(rows, -1, gs)
    nz = (T != 0).sum(axis=2)
    s = np.where(nz > 0, (np.abs(wp) * (T != 0)).sum(axis=2) / np.maximum(nz, 1), 1.0)
    xi = state["corr_accum"] / L
    err = np.abs(np.log2(s) - (state["E"] + xi))[nz > 0]
    assert (np.abs(state["corr_accum"]) < L).all()
    assert (err <= 1 / (2 * L) + 1e-12).all(), float(err.max())
    assert (T == np.clip(np.rint(T), -1, 1)).all()


def test_convert_average_and_scalar():
    scheme = scheme_for("E1TM32", "average")
    state, stats = ops.convert(np.full((2, 32), -0.75, np.float32), scheme)
    assert not state["corr_accum"].any()  # average: the fraction is dropped, Xi = 0 at step 0
    assert (ops.unpack(state["T_packed"], 32) == -1).all() and (state["E"] == 0).all()  # rint(log2 0.75) = 0
    assert stats.zero_groups == 0
    with pytest.raises(ConfigError, match="0-d"):
        ops.convert(np.float32(1.0).reshape(()), scheme)


# ------------------------------------------------------------------------------------ 1-D and 4-D


@pytest.mark.parametrize("shape", [(7,), (1,), (3, 2, 5, 4), (2, 1, 1, 33), (5, 0)])
@pytest.mark.parametrize("rule", ["average", "carry", "flip"])
def test_1d_and_4d_tensors(shape, rule):
    scheme = scheme_for("E1TM6", rule, K=1, theta=1)
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    state, _ = ops.convert(w, scheme)
    rows, cols = formats.tensor_view(shape)
    for name in formats.tensor_arrays(rule):
        assert state[name].shape == formats.array_shape(name, rows, cols, 6)
    W = ops.materialize(state, shape, scheme, 3)
    assert W.shape == shape
    grad = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    for _ in range(3):
        ops.vote(state, grad, shape, scheme)
    want = ref.materialize(state["T_packed"], state["E"], state["corr_accum"], 6, *scheme.xi_ratio(3), cols)
    assert_same(ops.materialize(state, shape, scheme, 3).reshape(rows, cols), want, f"W_eff {shape}")


# --------------------------------------------------------------------------------------- validation


def _state(rule="carry", shape=(3, 10), fmt="E1TM8"):
    scheme = scheme_for(fmt, rule)
    state, _ = ops.convert(np.random.default_rng(0).standard_normal(shape).astype(np.float32), scheme)
    return scheme, state


@pytest.mark.parametrize("name, bad, exc, msg", [
    ("corr_accum", lambda a: a.astype(np.int32), TypeError, "corr_accum has dtype int32; E1TM requires int64"),
    ("E", lambda a: a.astype(np.int16), TypeError, "E has dtype int16"),
    ("T_packed", lambda a: a.astype(np.int8), TypeError, "T_packed has dtype int8"),
    ("E", lambda a: a[:, :1].copy(), ValueError, r"E has shape \(3, 1\); expected \(3, 2\)"),
    ("T_packed", lambda a: np.repeat(a, 2, axis=1)[:, ::2], ValueError, "C-contiguous"),
    ("corr_accum", lambda a: a.tolist(), TypeError, "numpy array"),
])
def test_validation_of_state_arrays(name, bad, exc, msg):
    scheme, state = _state()
    state[name] = bad(state[name])
    with pytest.raises(exc, match=msg):
        ops.materialize(state, (3, 10), scheme, 0)
    with pytest.raises(exc, match=msg):
        ops.vote(state, np.zeros((3, 10), np.float32), (3, 10), scheme)
    with pytest.raises(exc, match=msg):
        ops.fuse(state, (3, 10), scheme, 0)


def test_validation_misc():
    scheme, state = _state("flip")
    missing = {k: v for k, v in state.items() if k != "flip_accum"}
    with pytest.raises(ValueError, match="flip_accum"):
        ops.vote(missing, np.zeros((3, 10), np.float32), (3, 10), scheme)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.vote(state, np.zeros((3, 10), np.float16), (3, 10), scheme)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.vote(state, np.zeros((3, 10), np.int64), (3, 10), scheme)
    with pytest.raises(ValueError, match=r"gradient has shape \(10, 3\)"):
        ops.vote(state, np.zeros((10, 3), np.float32), (3, 10), scheme)
    with pytest.raises(TypeError, match="out"):
        ops.materialize(state, (3, 10), scheme, 0, out=np.empty((3, 10), np.float64))
    with pytest.raises(ValueError, match="out"):
        ops.materialize(state, (3, 10), scheme, 0, out=np.empty((3, 11), np.float32))
    with pytest.raises(TypeError, match="int8"):
        ops.pack(np.zeros((2, 3), np.int16), 8)
    with pytest.raises(TypeError, match="2-D"):
        ops.pack(np.zeros(3, np.int8), 8)
    with pytest.raises(ValueError, match="outside"):
        ops.pack(np.full((2, 3), 2, np.int8), 8)
    with pytest.raises(TypeError, match="uint8"):
        ops.unpack(np.zeros((2, 3), np.int8), 5)
    with pytest.raises(ValueError, match="exceeds"):
        ops.unpack(np.zeros((2, 3), np.uint8), 16)
    with pytest.raises(ConfigError):
        ops.materialize(state, (), scheme, 0)
    assert issubclass(NonFiniteError, ArbsError) and issubclass(NonFiniteError, ValueError)


def test_stochastic_flip_votes_are_keyed_and_scheduled():
    """gain > 0: the same (seed, tensor, step) gives the same trits, another step other ones; past the
    horizon nothing moves; scales=False moves trits but leaves E and corr_accum."""
    scheme = scheme_for("E1TM8", "flip", K=4, theta=1, gain=1, horizon=40)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    g = rng.standard_normal((16, 64)).astype(np.float32)

    def run(step, seed=0, tensor=0, scales=True):
        state, _ = ops.convert(w, scheme)
        st = ops.vote(state, g, w.shape, scheme, step_counter=step, seed=seed, tensor=tensor, scales=scales)
        return state, st

    a, b = run(20)[0], run(20)[0]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for other in (run(21)[0], run(20, seed=1)[0], run(20, tensor=1)[0]):
        assert not np.array_equal(a["T_packed"], other["T_packed"])
    assert run(40)[1].flips == 0 and run(39)[1].flips > 0  # m = 0 at the horizon
    state, st = run(20, scales=False)
    fresh, _ = ops.convert(w, scheme)
    assert st.flips > 0 and np.array_equal(state["E"], fresh["E"]) and np.array_equal(state["corr_accum"], fresh["corr_accum"])


def test_trit_vote_gain_schedule():
    p = {"gain": 4, "horizon": 1000}
    assert schedule.trit_vote_gain(p, 0) == pytest.approx(4 / 50) and schedule.trit_vote_gain(p, 49) == pytest.approx(4.0)
    assert schedule.trit_vote_gain(p, 525) == pytest.approx(2.0) and schedule.trit_vote_gain(p, 1000) == 0.0
    assert schedule.trit_vote_gain({"gain": 3, "horizon": 0}, 10**9) == 3.0 and schedule.trit_vote_gain({"gain": 0, "horizon": 5}, 1) == 0.0
