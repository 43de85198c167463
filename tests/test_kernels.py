"""Every numba kernel against its numpy twin in arbs.testing.reference.

Integers are compared exactly and W_eff bit for bit (float32 bit patterns), for every E1TM variant, for
the parallel kernels and their serial twins (``cpu.kernel(name, 0)``, used for small tensors), on
random shapes whose cols are often not a multiple of gs or of 5. A mismatch reports how many entries
differ and the first index.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbs import formats, schedule
from arbs.kernels import cpu
from arbs.testing import reference as ref
from arbs.testing import strategies as S
from arbs.testing.states import assert_same, pack_trits, random_state, random_trits

# hypothesis imports libcst to print a falsifying example, and libcst's import warns (mypy_extensions
# TypedDict): without this, any failure would surface as an INTERNALERROR under filterwarnings=error.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VARIANTS = list(formats.VARIANTS)
IMPLS = ["parallel", "serial"]


def K(name: str, impl: str):
    """The kernel ``name``: the parallel one or its serial twin."""
    return getattr(cpu, name) if impl == "parallel" else cpu.kernel(name, 0)


def dims(rows: int, cols: int, gs: int) -> tuple[int, int, int]:
    """(cols_p, ng, nb)."""
    cols_p = formats.padded_cols(cols, gs)
    return cols_p, cols_p // gs, formats.packed_cols(cols_p)


def state_for(seed: int, variant: str, rows: int, cols: int, corr_max: int = 0, **options) -> dict:
    """``random_state`` of a carry-rule ``variant`` tensor (rows, cols) from ``seed``, |corr_accum| <= corr_max:
    E = 127/-128 and corr_accum = +-corr_max planted, some trit groups zeroed (unless ``options`` say otherwise)."""
    scheme = formats.make_scheme(variant, "carry")
    return random_state(np.random.default_rng(seed), scheme, (rows, cols), corr_max=corr_max, **options)


def variant_of(gs: int) -> str:
    return next(v for v, g in formats.VARIANTS.items() if g == gs)


rows_st = st.integers(0, 7)
cols_st = S.lengths(230)


# ------------------------------------------------------------------------------------ pack / unpack


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(T=S.trits(max_rows=7, max_cols=230))
def test_pack_matches_reference(impl, variant, T):
    gs = formats.variant_gs(variant)
    _, _, nb = dims(*T.shape, gs)
    out = np.full((T.shape[0], nb), 255, np.uint8)  # garbage: every byte must be overwritten
    K("pack_into", impl)(T, out)
    assert_same(out, pack_trits(T, gs), f"pack {variant} {T.shape}")


@pytest.mark.parametrize("impl", IMPLS)
@FAST
@given(rows=rows_st, nb=st.integers(0, 50), data=st.data())
def test_unpack_matches_reference(impl, rows, nb, data):
    seed = data.draw(S.seeds)
    Tp = np.random.default_rng(seed).integers(0, 243, (rows, nb), dtype=np.uint8)
    cols = data.draw(st.integers(0, 5 * nb))  # any cols the bytes can hold, multiple of 5 or not
    out = np.full((rows, cols), 99, np.int8)
    K("unpack_into", impl)(Tp, out)
    assert_same(out, ref.unpack(Tp, cols), f"unpack nb={nb} cols={cols}")


def test_unpack_every_byte_value():
    """All 243 valid bytes in one row decode to their five digits minus one, first digit least significant."""
    Tp = np.arange(243, dtype=np.uint8)[None, :]
    out = np.empty((1, 5 * 243), np.int8)
    cpu.unpack_into(Tp, out)
    b = np.arange(243)
    want = np.stack([(b // 3**i) % 3 - 1 for i in range(5)], axis=1).reshape(1, -1).astype(np.int8)
    assert_same(out, want, "unpack 0..242")


@pytest.mark.parametrize("impl", IMPLS)
def test_unpack_invalid_bytes_top_digit_unreduced(impl):
    """Bytes 243..255 (rejected by readers) decode as in the Triton kernels: digits 0..3 are (b // 3**d) % 3,
    the top digit is b // 81 (3), so its trit is 2; on the vectorized path and on the row's last bytes."""
    b = np.arange(243, 256)
    Tp = np.concatenate([b, b]).astype(np.uint8)[None, :]  # 26 bytes; cols = 128 ends inside byte 25
    out = np.empty((1, 128), np.int8)
    K("unpack_into", impl)(Tp, out)
    digits = [(b // 3**d) % 3 for d in range(4)] + [b // 81]
    want = np.tile(np.stack(digits, axis=1).reshape(-1) - 1, 2)[:128].astype(np.int8)[None, :]
    assert_same(out, want, "unpack 243..255")


# ------------------------------------------------------------------------------------- materialize


def _ratios(gs: int, step: int, K_: int) -> list[tuple[str, int, int, int]]:
    """(label, num, den, corr bound) for average at step 0, average at ``step`` and carry with ``K_``."""
    return [("average@0", 4, 0, 0), (f"average@{step}", 4, step * gs, step * gs), (f"carry K={K_}", 1, K_ * gs, K_ * gs - 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(rows=rows_st, cols=cols_st, seed=S.seeds, step=st.integers(1, 1000), K_=st.integers(1, 64))
def test_materialize_matches_reference(impl, variant, rows, cols, seed, step, K_):
    gs = formats.variant_gs(variant)
    for label, num, den, bound in _ratios(gs, step, K_):
        s = state_for(seed, variant, rows, cols, bound)
        Tp, E, corr = s["T_packed"], s["E"], s["corr_accum"]
        out = np.full((rows, cols), np.nan, np.float32)
        K("materialize_into", impl)(Tp, E, corr, gs, num, den, out)
        with np.errstate(over="ignore", invalid="ignore"):  # E = 127 with Xi > 0 overflows float32 to inf
            want = ref.materialize(Tp, E, corr, gs, num, den, cols)
        assert_same(out, want, f"materialize {variant} {label} ({rows}, {cols})", any_nan=True)


# --------------------------------------------------------------------------------------------- vote


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(rows=rows_st, cols=cols_st, seed=S.seeds, dtype=st.sampled_from([np.float32, np.float64]))
def test_vote_delta_matches_reference(impl, variant, rows, cols, seed, dtype):
    gs = formats.variant_gs(variant)
    _, ng, _ = dims(rows, cols, gs)
    Tp = state_for(seed, variant, rows, cols)["T_packed"]
    rng = np.random.default_rng(seed + 1)
    grad = rng.standard_normal((rows, cols)).astype(dtype)
    if grad.size:
        grad.flat[rng.integers(0, grad.size, max(1, grad.size // 4))] = 0.0  # sign(0) = 0
        grad.flat[0] = -0.0
    delta = np.full((rows, ng), 12345, np.int64)
    bad = K("vote_delta_into", impl)(grad, Tp, gs, delta)
    assert bad == 0
    assert_same(delta, ref.vote_delta(grad, Tp, gs, ng), f"vote_delta {variant} ({rows}, {cols}) {np.dtype(dtype)}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_vote_delta_counts_nonfinite(impl, dtype, value):
    gs, rows, cols = 8, 3, 21
    _, ng, _ = dims(rows, cols, gs)
    Tp = state_for(0, "E1TM8", rows, cols)["T_packed"]
    grad = np.ones((rows, cols), dtype)
    grad[1, 20] = value
    grad[2, 0] = value
    delta = np.empty((rows, ng), np.int64)
    assert K("vote_delta_into", impl)(grad, Tp, gs, delta) == 2


@pytest.mark.parametrize("impl", IMPLS)
@FAST
@given(rows=rows_st, ng=st.integers(0, 12), seed=S.seeds, limit=st.sampled_from([0, 4, 6, 32, 512, 1536]),
       scale=st.sampled_from([1, 3, 300]))
def test_apply_votes_matches_reference(impl, rows, ng, seed, limit, scale):
    """Carries, multi-carries (|delta| up to 300*limit) and saturation at E = -128/127 included."""
    rng = np.random.default_rng(seed)
    E = rng.integers(-128, 128, (rows, ng), dtype=np.int8)
    bound = max(limit - 1, 0) if limit else 10**6
    corr = rng.integers(-bound, bound + 1, (rows, ng), dtype=np.int64)
    delta = rng.integers(-scale * max(limit, 64), scale * max(limit, 64) + 1, (rows, ng), dtype=np.int64)
    if E.size:
        E.flat[: min(4, E.size)] = [127, -128, 126, -127][: min(4, E.size)]
        delta.flat[: min(4, E.size)] = [2 * limit + 5, -2 * limit - 5, 3 * limit, -3 * limit][: min(4, E.size)]
    want_c, want_e, want_nc, want_ns = ref.apply_votes(corr, E, delta, limit)
    c, e = corr.copy(), E.copy()
    nc, ns = K("apply_votes", impl)(c, e, delta, limit)
    assert_same(c, want_c, f"apply_votes corr_accum limit={limit}")
    assert_same(e, want_e, f"apply_votes E limit={limit}")
    assert (nc, ns) == (want_nc, want_ns)


# --------------------------------------------------------------------------------------------- flip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(rows=rows_st, cols=cols_st, seed=S.seeds, theta=st.sampled_from([1, 2, 3, 8, 127]),
       gain_m=st.sampled_from([0.0, 0.3, 4.0]), vote_max=st.sampled_from([1, 2, 3, 127]),
       key=st.integers(0, 2**64 - 1), tensor_norm=st.booleans(), reset_frac=st.sampled_from([0.0, 0.5, 1.0]))
def test_flip_matches_reference(impl, variant, rows, cols, seed, theta, gain_m, vote_max, key, tensor_norm, reset_frac):
    reset = min(theta - 1, int(reset_frac * theta))
    s = random_state(np.random.default_rng(seed), formats.make_scheme(variant, "flip", theta=theta), (rows, cols))
    Tp, fa = s["T_packed"], s["flip_accum"]  # flip_accum within +-theta (planted), 0 on padding
    rng = np.random.default_rng(seed + 2)
    grad = rng.standard_normal((rows, cols)).astype(np.float32)
    if grad.size:
        grad.flat[rng.integers(0, grad.size, max(1, grad.size // 5))] = 0.0
    want_tp, want_fa, want_n = ref.flip(grad, Tp, fa, theta, gain_m, key, vote_max, tensor_norm, reset)
    tp, f = Tp.copy(), fa.copy()
    n = K("flip_into", impl)(grad, tp, f, theta, gain_m, vote_max, np.uint64(key), tensor_norm, reset)
    assert_same(tp, want_tp, f"flip T_packed {variant} theta={theta}")
    assert_same(f, want_fa, f"flip flip_accum {variant} theta={theta}")
    assert n == want_n


# --------------------------------------------------------------------------------------------- fuse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(rows=rows_st, cols=cols_st, seed=S.seeds, step=st.integers(1, 1000), K_=st.integers(1, 64))
def test_fuse_matches_reference(impl, variant, rows, cols, seed, step, K_):
    gs = formats.variant_gs(variant)
    for label, num, den, bound in _ratios(gs, step, K_):
        s = state_for(seed, variant, rows, cols, bound)
        E, corr = s["E"], s["corr_accum"]
        out = np.full(E.shape, 77, np.int8)
        clipped, changed = K("fuse_into", impl)(E, corr, num, den, out)
        want, want_clipped, want_changed = ref.fuse(E, corr, num, den)
        assert_same(out, want, f"fuse {variant} {label}")
        assert (clipped, changed) == (want_clipped, want_changed), label


def test_fuse_counts_clips_and_half_even():
    """Hand-made: E=127 with Xi=+0.75 clips; E=-128 with Xi=-0.75 clips; halves round to even."""
    E = np.array([[127, -128, 1, 2, -1, -2, 5]], np.int8)
    corr = np.array([[3, -3, 2, 2, -2, -2, 1]], np.int64)  # Xi = corr/4: 0.75, -0.75, 0.5, 0.5, -0.5, -0.5, 0.25
    for impl in IMPLS:
        out = np.empty_like(E)
        clipped, changed = K("fuse_into", impl)(E, corr, 1, 4, out)
        assert out.tolist() == [[127, -128, 2, 2, -2, -2, 5]]
        assert (clipped, changed) == (2, 6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num, den", [
    (1, 512), (1, 2), (4, 2048), (2, 1 << 41), (1 << 12, 1 << 20),  # num/den = 1/2**k: integer path
    (1, 1), (4, 4), (8, 4), (1, 1 << 41), (1 << 13, 1 << 20), (3, 512), (-1, 512), (4, 96),  # float path
])
def test_fuse_integer_path_bounds(impl, num, den):
    """fuse takes an integer path for num/den = 1/2**k (1 <= k <= 40, num <= 2**12 a power of two) in rows
    whose corr_accum lies in [-2**40, 2**40), else the float path: both sides of every switch, with ties,
    clips and corr_accum at the range's edges and near the int64 limits, match the float reference."""
    rng = np.random.default_rng(den % 1000 + num % 7)
    edge = 1 << 40
    rows = [
        rng.integers(-3 * den, 3 * den + 1, 64),  # any ratio: values around +-Xi = 3
        np.array([-edge, edge - 1, 0, den // 2, -(den // 2), 3 * (den // 2), -3 * (den // 2)] * 9 + [1]),  # inside
        np.array([edge] + [den // 2] * 63),  # one corr just above the range: float path
        np.array([-edge - 1] + [-(den // 2)] * 63),  # just below
        np.array([2**63 - 1, -(2**63), 2**62, -(2**62)] * 16),  # num*corr wraps in int64 (as in the reference)
        rng.integers(-(2**62), 2**62, 64),
        np.full(64, 2**62),  # far out of range, one sign only
        np.full(64, 2**61 + 12345),
    ]
    corr = np.stack([np.asarray(r, np.int64) for r in rows])
    E = rng.integers(-128, 128, corr.shape, dtype=np.int8)
    E[:, :4] = [127, -128, 126, -127]  # clips either way
    out = np.full(E.shape, 77, np.int8)
    with np.errstate(over="ignore"):
        want, want_clipped, want_changed = ref.fuse(E, corr, num, den)
    clipped, changed = K("fuse_into", impl)(E, corr, num, den, out)
    assert_same(out, want, f"fuse num={num} den={den}")
    assert (clipped, changed) == (want_clipped, want_changed)


_FUSE_HOSTILE = """
import json, sys
import numpy as np
from arbs.kernels import cpu
from arbs.testing import reference as ref
E = np.array([[3, -5, 127, -128, 0, 1]], np.int8)
corr = np.array([[2**61, -(2**61), 7, -7, 2**62, -(2**63)]], np.int64)
out = []
for impl in ("serial", "parallel"):
    k = cpu.fuse_into if impl == "parallel" else cpu.kernel("fuse_into", 0)
    for num, den in ((4, 2**63), (4, 2**64 - 2**62), (1, 2**63), (2**12, 2**63), (4, 2**62), (-4, 2**62), (4, -(2**62))):
        o = np.full(E.shape, 77, np.int8)
        counts = k(E, corr, num, den, o)
        with np.errstate(over="ignore"):
            want, c, ch = ref.fuse(E, corr, num, den)
        out.append([impl, num, str(den), o.tolist() == want.tolist(), list(map(int, counts)) == [c, ch]])
print(json.dumps(out))
"""


def test_fuse_terminates_for_any_ratio():
    """Hostile num/den passed to the kernel directly: den = 2**63 (a power of two, typed uint64) made
    ``while (num << k) < den`` spin forever once num << k wrapped; at most _FUSE_MAX_K tries now, and the
    result matches the float reference (num*corr wrapping in int64 as it does there). In a child process
    with a timeout, so a regression fails instead of hanging the suite."""
    import json
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-c", _FUSE_HOSTILE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("fuse_into did not return within 120 s for a hostile num/den")
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 14
    assert all(same_out and same_counts for *_, same_out, same_counts in results), results


# ------------------------------------------------------------------ many rows: chunking and threads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows, cols", [(131, 77), (64, 5), (65, 1)])
def test_all_kernels_many_rows(variant, rows, cols):
    """More rows than row chunks (uneven chunks), for every kernel, parallel and serial, and with one
    numba thread: results never depend on how rows are split."""
    import numba

    gs = formats.variant_gs(variant)
    _, ng, _ = dims(rows, cols, gs)
    scheme = formats.make_scheme(variant, "flip", K=2, theta=2)
    L = scheme.carry_limit  # 2*gs
    rng = np.random.default_rng(rows * 1000 + cols)
    T = random_trits(rng, rows, cols, gs)
    s = random_state(rng, scheme, (rows, cols), T=T)  # |corr_accum| <= L - 1, |flip_accum| <= 2
    Tp, E, corr, fa = s["T_packed"], s["E"], s["corr_accum"], s["flip_accum"]
    grad = np.random.default_rng(cols).standard_normal((rows, cols)).astype(np.float32)
    want_W = ref.materialize(Tp, E, corr, gs, 1, L, cols)
    want_d = ref.vote_delta(grad, Tp, gs, ng)
    want_av = ref.apply_votes(corr, E, 40 * want_d, L)
    want_fl = ref.flip(grad, Tp, fa, 2)
    want_fu = ref.fuse(E, corr, 1, L)
    threads = numba.get_num_threads()
    for impl, nthreads in [("parallel", threads), ("parallel", 1), ("serial", threads)]:
        numba.set_num_threads(nthreads)
        try:
            tp = np.empty_like(Tp)
            K("pack_into", impl)(T, tp)
            assert_same(tp, Tp, "pack")
            t = np.empty_like(T)
            K("unpack_into", impl)(Tp, t)
            assert_same(t, T, "unpack")
            W = np.empty((rows, cols), np.float32)
            K("materialize_into", impl)(Tp, E, corr, gs, 1, L, W)
            assert_same(W, want_W, "materialize", any_nan=True)
            d = np.empty((rows, ng), np.int64)
            assert K("vote_delta_into", impl)(grad, Tp, gs, d) == 0
            assert_same(d, want_d, "vote_delta")
            c, e = corr.copy(), E.copy()
            assert K("apply_votes", impl)(c, e, 40 * d, L) == want_av[2:]
            assert_same(c, want_av[0], "apply_votes corr")
            assert_same(e, want_av[1], "apply_votes E")
            tp, f = Tp.copy(), fa.copy()
            assert K("flip_into", impl)(grad, tp, f, 2, 0.0, 1, np.uint64(0), False, 0) == want_fl[2]
            assert_same(tp, want_fl[0], "flip T_packed")
            assert_same(f, want_fl[1], "flip flip_accum")
            out = np.empty_like(E)
            assert K("fuse_into", impl)(E, corr, 1, L, out) == want_fu[1:]
            assert_same(out, want_fu[0], "fuse")
        finally:
            numba.set_num_threads(threads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gs, num, den, E_range, corr_bound, table", [
    (32, 1, 512, (-8, 8), 511, True),  # carry, K*gs = 512: few distinct E*den + corr, the scale table is used
    (4, 1, 64, (-128, 127), 63, True),  # carry at every exponent
    (8, 4, 256, (-20, 20), 256, True),  # average with step*gs = 256 (a power of two)
    (16, 1, 1 << 20, (-3, 3), 1 << 19, False),  # many distinct values: exp2 per group
    (32, 1, 512, (-8, 8), 1 << 45, False),  # |corr_accum| beyond the table's exact range
    (6, 1, 96, (-8, 8), 95, False),  # K*gs not a power of two
])
def test_materialize_large_tensors(impl, gs, num, den, E_range, corr_bound, table):
    """Tensors with many groups, where materialize may look S up in a table of exact exp2 values."""
    rows, cols = 2048, 40 * gs + 3
    s = state_for(den, variant_of(gs), rows, cols, corr_bound, E_range=E_range, extremes=0)
    Tp, E, corr = s["T_packed"], s["E"], s["corr_accum"]
    corr.flat[:2] = [corr_bound, -corr_bound]  # E stays inside E_range: the table's case
    if hasattr(cpu, "_scale_table"):  # the case covers the path it is meant to
        assert (cpu._scale_table(E, corr, num, den)[0].size > 0) == table
    out = np.empty((rows, cols), np.float32)
    K("materialize_into", impl)(Tp, E, corr, gs, num, den, out)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ref.materialize(Tp, E, corr, gs, num, den, cols)
    assert_same(out, want, f"materialize gs={gs} num={num} den={den}", any_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_stochastic_votes_keep_the_probability(impl):
    """|g| = 1 everywhere (rms 1), gain_m = 0.3: each trit votes with probability 0.3 (theta = 1, T = 0,
    so a vote is a flip): 0.3 of 100,000 within 4 standard deviations."""
    rows, cols = 100, 1000
    grad = np.where(np.random.default_rng(1).random((rows, cols)) < 0.5, -1.0, 1.0).astype(np.float32)
    tp = pack_trits(np.zeros((rows, cols), np.int8), 8)
    fa = np.zeros((rows, cols), np.int8)
    n = K("flip_into", impl)(grad, tp, fa, 1, 0.3, 1, np.uint64(schedule.vote_key(0, 0, 0)), False, 0)
    assert abs(n - 30_000) < 4 * (100_000 * 0.3 * 0.7) ** 0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_stochastic_votes_round_the_magnitude(impl):
    """|g| = 1 everywhere (rms 1), vote_max 3: gain_m 1.7 gives votes of 1 or 2 steps, 2 with probability
    0.7 (mean 1.7 within 4 standard deviations, always against the gradient's sign); gain_m 5 is clamped
    to exactly 3 steps. theta 127 keeps every vote in flip_accum."""
    rows, cols = 100, 1000
    grad = np.where(np.random.default_rng(2).random((rows, cols)) < 0.5, -1.0, 1.0).astype(np.float32)
    for gain_m, lo, hi in ((1.7, 1, 2), (5.0, 3, 3)):
        tp = pack_trits(np.zeros((rows, cols), np.int8), 8)
        fa = np.zeros((rows, cols), np.int8)
        assert K("flip_into", impl)(grad, tp, fa, 127, gain_m, 3, np.uint64(schedule.vote_key(0, 0, 1)), False, 0) == 0
        steps = -fa.astype(np.int64) * np.sign(grad).astype(np.int64)
        assert steps.min() == lo and steps.max() == hi
        assert abs(steps.mean() - min(gain_m, 3)) < 4 * (0.21 / steps.size) ** 0.5
