"""The golden vectors (formats/vectors.json) and the golden checkpoint (formats/golden/run/).

The vectors were computed once with the numpy reference (formats/make_vectors.py). arbs.ops and every
numba kernel (parallel and serial twin) must reproduce each one exactly: integers equal, float32 bit
patterns equal. The golden checkpoint is a committed store that every later arbs must keep opening.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from arbs import formats
from arbs import ops
from arbs.kernels import cpu
from arbs.testing.states import assert_same

FORMATS = Path(__file__).resolve().parents[1] / "formats"
VECTORS = json.loads((FORMATS / "vectors.json").read_text())
IMPLS = ["parallel", "serial"]


def K(name: str, impl: str):
    return getattr(cpu, name) if impl == "parallel" else cpu.kernel(name, 0)


def f32(bits) -> np.ndarray:
    """Nested lists of 8-hex-digit bit patterns -> float32 array."""
    a = np.array(bits, dtype=object)
    return np.array([int(b, 16) for b in a.reshape(-1)], np.uint32).reshape(a.shape).view(np.float32)


def arr(case, name, shape=None) -> np.ndarray:
    a = np.array(case[name], formats.ARRAYS[name].dtype)
    return a.reshape(shape) if shape is not None else a


def scheme_of(case) -> formats.Scheme:
    params = formats.recorded_rule_params(case["rule"], case["rule_params"])
    s = formats.make_scheme(case["format"], case["rule"], **params)
    # the vectors predate vote_max: a parameter added later reads as the value they were made with
    later = {p: formats.PARAMS[p].absent for p in formats.rule_spec(case["rule"]).params if p not in case["rule_params"]}
    assert s.gs == case["gs"] and s.params == later | case["rule_params"]
    return s


def state_of(case, src=None) -> dict:
    """The state arrays of ``case`` (or of ``src``), shaped from the format table."""
    src = case if src is None else src
    rows, cols = formats.tensor_view(case["shape"])
    out = {}
    for name in formats.tensor_arrays(case["rule"]):
        out[name] = arr(src, name, formats.array_shape(name, rows, cols, case["gs"]))
    return out


def ids(cases, *keys):
    return [f"{i}-" + "-".join(str(c[k]) for k in keys) for i, c in enumerate(cases)]


def test_vectors_header():
    assert VECTORS["arbs_format_version"] == formats.FORMAT_VERSION
    assert set(VECTORS) >= {"pack", "materialize", "vote", "fuse", "convert", "golden_checkpoint"}


def test_vectors_are_what_make_vectors_writes():
    """vectors.json is exactly what formats/make_vectors.py computes now from the numpy reference."""
    spec = importlib.util.spec_from_file_location("make_vectors", FORMATS / "make_vectors.py")
    mv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mv)
    assert mv.dumps(mv.build()) == (FORMATS / "vectors.json").read_text(), \
        "formats/vectors.json is stale or the numpy reference changed; run python formats/make_vectors.py and review"


# ------------------------------------------------------------------------------------------- pack


@pytest.mark.parametrize("case", VECTORS["pack"], ids=ids(VECTORS["pack"], "format", "cols"))
def test_pack_vectors(case):
    T = np.array(case["trits"], np.int8).reshape(len(case["trits"]), case["cols"])
    Tp = np.array(case["T_packed"], np.uint8).reshape(T.shape[0], formats.packed_cols(case["cols_p"]))
    assert (Tp <= formats.MAX_PACKED_BYTE).all()
    assert_same(ops.pack(T, case["gs"]), Tp, "ops.pack")
    assert_same(ops.unpack(Tp, case["cols"]), T, "ops.unpack")
    for impl in IMPLS:
        out = np.empty_like(Tp)
        K("pack_into", impl)(T, out)
        assert_same(out, Tp, f"pack_into {impl}")
        back = np.empty_like(T)
        K("unpack_into", impl)(Tp, back)
        assert_same(back, T, f"unpack_into {impl}")


# ------------------------------------------------------------------------------------ materialize


@pytest.mark.parametrize("case", VECTORS["materialize"], ids=ids(VECTORS["materialize"], "format", "rule", "step_counter"))
def test_materialize_vectors(case):
    scheme = scheme_of(case)
    shape = tuple(case["shape"])
    rows, cols = formats.tensor_view(shape)
    state = state_of(case)
    want = f32(case["W_eff_bits"])
    assert list(scheme.xi_ratio(case["step_counter"])) == case["xi_num_den"]
    assert_same(ops.materialize(state, shape, scheme, case["step_counter"]), want, "ops.materialize")
    num, den = case["xi_num_den"]
    for impl in IMPLS:
        out = np.empty((rows, cols), np.float32)
        K("materialize_into", impl)(state["T_packed"], state["E"], state["corr_accum"], scheme.gs, num, den, out)
        assert_same(out, want.reshape(rows, cols), f"materialize_into {impl}")
    # the vectors agree with themselves: |W_eff| is the group's S wherever T != 0
    S = np.repeat(f32(case["S_bits"]), scheme.gs, axis=1)[:, :cols]
    T = ops.unpack(state["T_packed"], cols)
    assert_same(np.abs(want.reshape(rows, cols))[T != 0], S[T != 0], "|W_eff| == S")


# ------------------------------------------------------------------------------------------- vote


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", VECTORS["vote"], ids=ids(VECTORS["vote"], "format", "rule"))
def test_vote_vectors(case, dtype):
    scheme = scheme_of(case)
    shape = tuple(case["shape"])
    rows, cols = formats.tensor_view(shape)
    state = state_of(case, case["before"])
    for i, (gbits, v) in enumerate(zip(case["grad_bits"], case["votes"])):
        grad = f32(gbits).astype(dtype)  # the values are exact in both
        for impl in IMPLS:
            delta = np.empty(state["E"].shape, np.int64)
            assert K("vote_delta_into", impl)(grad.reshape(rows, cols), state["T_packed"], scheme.gs, delta) == 0
            assert_same(delta, np.array(v["delta"], np.int64).reshape(delta.shape), f"vote {i} delta {impl}")
        stats = ops.vote(state, grad, shape, scheme)
        assert (stats.carries, stats.saturations, stats.flips) == (v["carries"], v["saturations"], v["flips"]), f"vote {i}"
        for name, want in state_of(case, v["after"]).items():
            assert_same(state[name], want, f"vote {i}: {name}")


# ------------------------------------------------------------------------------------------- fuse


@pytest.mark.parametrize("case", VECTORS["fuse"], ids=ids(VECTORS["fuse"], "format", "rule", "step_counter"))
def test_fuse_vectors(case):
    scheme = scheme_of(case)
    shape = tuple(case["shape"])
    rows, cols = formats.tensor_view(shape)
    E = arr(case, "E")
    corr = arr(case, "corr_accum")
    want = np.array(case["E_fused"], np.int8)
    state = {"T_packed": np.full(formats.array_shape("T_packed", rows, cols, scheme.gs), 121, np.uint8), "E": E, "corr_accum": corr}
    if scheme.rule == "flip":
        state["flip_accum"] = np.zeros(formats.array_shape("flip_accum", rows, cols, scheme.gs), np.int8)
    E_fused, stats = ops.fuse(state, shape, scheme, case["step_counter"])
    assert_same(E_fused, want, "ops.fuse")
    assert (stats.clipped, stats.changed, stats.groups) == (case["clipped"], case["changed"], E.size)
    num, den = scheme.xi_ratio(case["step_counter"])
    for impl in IMPLS:
        out = np.empty_like(E)
        assert K("fuse_into", impl)(E, corr, num, den, out) == (case["clipped"], case["changed"])
        assert_same(out, want, f"fuse_into {impl}")


# ---------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("case", VECTORS["convert"], ids=ids(VECTORS["convert"], "format", "rule"))
def test_convert_vectors(case):
    scheme = scheme_of(case)
    w = f32(case["w_bits"])
    assert_same(w.astype(np.float64), np.array(case["w"], np.float64), "w_bits == w")
    state, _ = ops.convert(w, scheme, name="golden")
    want = state_of(case)
    assert set(state) == set(want)
    for name in want:
        assert_same(state[name], want[name], f"convert {name}")


# ------------------------------------------------------------------------------ golden checkpoint


def test_golden_checkpoint_opens_and_matches():
    store = pytest.importorskip("arbs.store")
    g = VECTORS["golden_checkpoint"]
    run = FORMATS / g["path"]
    ckpt = store.open_checkpoint(run, verify=True)
    assert ckpt.path.name == g["checkpoint"]
    assert (ckpt.kind, ckpt.format, ckpt.gs, ckpt.rule, ckpt.rule_params, ckpt.fused, ckpt.step_counter, ckpt.meta) == \
        (g["kind"], g["format"], g["gs"], g["rule"], g["rule_params"], g["fused"], g["step_counter"], g["meta"])
    assert list(ckpt.tensors) == list(g["tensors"])
    scheme = scheme_of(g)
    for name, t in g["tensors"].items():
        ts = ckpt.tensors[name]
        assert ts.shape == tuple(t["shape"])
        case = dict(t, rule=g["rule"], gs=g["gs"])
        for aname, want in state_of(case).items():
            assert_same(ts.arrays[aname], want, f"{name}/{aname}")
        assert_same(ops.materialize(ts.arrays, ts.shape, scheme, ckpt.step_counter), f32(t["W_eff_bits"]), f"{name} W_eff")
    # the checkpoint directory opens directly too, and holds no float arrays
    direct = store.open_checkpoint(run / g["checkpoint"])
    assert all(a.dtype.kind in "iu" for t in direct.tensors.values() for a in t.arrays.values())
