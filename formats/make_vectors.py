"""Write the E1TM golden vectors ``formats/vectors.json`` and the golden checkpoint ``formats/golden/run/``.

    python formats/make_vectors.py                  # (re)write vectors.json; write golden/run if missing
    python formats/make_vectors.py --check          # exit 1 if vectors.json differs from a fresh run
    python formats/make_vectors.py --rewrite-golden-store   # replace golden/run (a format change!)

Every expected value is computed with the slow numpy twins in ``arbs.testing.reference`` (never the
numba kernels), and the convert case with a transcription of the convert rule of SPEC.md written
here, group by group. Inputs come from a fixed integer recurrence, not numpy's random streams, so the
output is byte-identical on every machine and numpy version. ``tests/test_golden.py`` checks that
``arbs.ops`` and every kernel reproduce each vector exactly.

float32 values are written as their IEEE-754 bit patterns, 8 lowercase hex digits (``"3f800000"`` is
1.0), so that nothing depends on decimal parsing. Gradients and weights are dyadic numbers whose
decimal form is exact, and are also given as bit patterns.

The golden checkpoint is written only when missing: it is the committed store that every later arbs
must keep opening (a format change needs a new FORMAT_VERSION and a new golden store, never an edit).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from arbs import formats, schedule  # noqa: E402
from arbs.testing import reference as ref  # noqa: E402

VECTORS = HERE / "vectors.json"
GOLDEN_RUN = HERE / "golden" / "run"
GOLDEN_STEP = 7


# --------------------------------------------------------------------------------------- helpers


class Lcg:
    """A 64-bit linear congruential generator (Knuth's MMIX constants): the same numbers everywhere."""

    def __init__(self, seed: int):
        self.x = (seed * 0x9E3779B97F4A7C15 + 1) % 2**64

    def below(self, n: int) -> int:
        self.x = (self.x * 6364136223846793005 + 1442695040888963407) % 2**64
        return (self.x >> 33) % n

    def ints(self, lo: int, hi: int, shape, dtype) -> np.ndarray:
        """Integers in [lo, hi] inclusive."""
        n = int(np.prod(shape, dtype=np.int64))
        return np.array([lo + self.below(hi - lo + 1) for _ in range(n)], dtype).reshape(shape)

    def choice(self, values, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        return np.array([values[self.below(len(values))] for _ in range(n)], dtype).reshape(shape)


def bits(a: np.ndarray) -> list:
    """float32 array -> nested lists of 8-hex-digit bit patterns."""
    a = np.asarray(a, np.float32)
    return np.vectorize(lambda u: f"{int(u):08x}", otypes=[object])(a.view(np.uint32)).tolist()


def tolist(a: np.ndarray) -> list:
    return np.asarray(a).tolist()


def trits_and_packed(lcg: Lcg, rows: int, cols: int, gs: int, zero_group: bool = True):
    T = lcg.ints(-1, 1, (rows, cols), np.int8)
    if zero_group and rows and cols:
        T[rows - 1, : min(gs, cols)] = 0  # an all-zero group
    nb = formats.packed_cols(formats.padded_cols(cols, gs))
    return T, ref.pack(T, nb)


def materialize_ref(Tp, E, corr, scheme, step, cols):
    num, den = scheme.xi_ratio(step)
    S = np.exp2(E.astype(np.float64) + ref.xi(corr, num, den)).astype(np.float32)
    return S, ref.materialize(Tp, E, corr, scheme.gs, num, den, cols)


# The vectors were made with flip's plain sign votes; its parameters are pinned, not the table's defaults.
PLAIN_FLIP = {"gain": 0, "horizon": 0, "vote_max": 1, "vote_norm": 0, "reset": 0}


def make_scheme(fmt: str, rule: str, **params) -> formats.Scheme:
    return formats.make_scheme(fmt, rule, **((PLAIN_FLIP | params) if rule == "flip" else params))


# Parameters added after these vectors were first made: a case records them only where it sets them (a reader
# takes the others as PARAMS[...].absent), so the older cases stay byte for byte what they were.
LATER = ("vote_norm", "reset")


def scheme_dict(scheme: formats.Scheme) -> dict:
    params = {k: v for k, v in scheme.params.items() if k not in LATER or v != formats.PARAMS[k].absent}
    return {"format": scheme.format, "gs": scheme.gs, "rule": scheme.rule, "rule_params": params}


# ----------------------------------------------------------------------------------------- cases


def pack_cases() -> list[dict]:
    """Trits -> bytes for several lengths (0, 1, 5k+-1, gs+-1) and every variant's padding."""
    lcg = Lcg(1)
    out = []
    for name, gs in formats.VARIANTS.items():
        for cols in sorted({0, 1, 4, 5, 6, gs - 1, gs, gs + 1, 2 * gs + 3}):
            T, Tp = trits_and_packed(lcg, 2, cols, gs, zero_group=False)
            out.append({"format": name, "gs": gs, "cols": cols, "cols_p": formats.padded_cols(cols, gs),
                        "trits": tolist(T), "T_packed": tolist(Tp)})
    # every byte value once: trits of 0..242 in order (first trit least significant)
    b = np.arange(243)
    T = (np.stack([(b // 3**i) % 3 for i in range(5)], axis=1).reshape(1, -1) - 1).astype(np.int8)
    out.append({"format": "E1TM96", "gs": 96, "cols": 1215, "cols_p": 1248, "trits": tolist(T),
                "T_packed": tolist(ref.pack(T, formats.packed_cols(1248)))})
    return out


def state_cases() -> list[dict]:
    """States -> W_eff (and S per group) for average at step 0 and > 0, carry and flip, with E and
    corr_accum at their bounds (E = 127 with Xi near +1, E = -128 with Xi near -1 or -4: a subnormal S)."""
    specs = [
        ("E1TM8", "average", {}, 0, (2, 13)),
        ("E1TM6", "average", {}, 5, (3, 10)),
        ("E1TM4", "carry", {"K": 16}, 3, (3, 7)),
        ("E1TM32", "carry", {"K": 16}, 100, (2, 40)),
        ("E1TM16", "flip", {"K": 2, "theta": 3}, 9, (2, 3, 7)),
        ("E1TM96", "carry", {"K": 1}, 1, (101,)),
    ]
    out = []
    for i, (fmt, rule, params, step, shape) in enumerate(specs):
        lcg = Lcg(100 + i)
        scheme = make_scheme(fmt, rule, **params)
        rows, cols = formats.tensor_view(shape)
        ng = formats.n_groups(cols, scheme.gs)
        T, Tp = trits_and_packed(lcg, rows, cols, scheme.gs)
        E = lcg.ints(-6, 6, (rows, ng), np.int8)
        bound = scheme.gs * step if rule == "average" else scheme.carry_limit - 1
        corr = lcg.ints(-bound, bound, (rows, ng), np.int64)
        if rule != "average" or step:
            # largest S: 2**(127 + Xi) with Xi < 1 (carry), 2**(123 + 4) (average, |Xi| <= 4)
            E.flat[0], corr.flat[0] = (127 if rule != "average" else 123), bound
            E.flat[-1], corr.flat[-1] = -128, -bound  # smallest S: a subnormal float32
        S, W = materialize_ref(Tp, E, corr, scheme, step, cols)
        case = {**scheme_dict(scheme), "step_counter": step, "shape": list(shape),
                "T_packed": tolist(Tp), "E": tolist(E), "corr_accum": tolist(corr),
                "xi_num_den": list(scheme.xi_ratio(step)), "S_bits": bits(S), "W_eff_bits": bits(W.reshape(shape))}
        if rule == "flip":
            th = scheme.params["theta"]
            fa = np.zeros((rows, formats.padded_cols(cols, scheme.gs)), np.int8)
            fa[:, :cols] = lcg.ints(-th, th, (rows, cols), np.int8)
            case["flip_accum"] = tolist(fa)
        out.append(case)
    return out


GRAD_VALUES = (-2.0, -0.5, -0.0, 0.0, 0.0, 0.25, 1.0, 3.0)  # exact in decimal, float32 and float64


def vote_cases() -> list[dict]:
    """(state, gradient) -> delta, the state after the vote and its counts, for each rule; the carry
    cases carry and saturate, the flip case flips."""
    specs = [
        ("E1TM8", "average", {}, 4, (2, 13), 1),
        ("E1TM4", "carry", {"K": 1}, 2, (3, 9), 3),
        ("E1TM6", "flip", {"K": 1, "theta": 1}, 5, (2, 14), 2),
        ("E1TM16", "flip", {"K": 2, "theta": 2}, 5, (4, 2, 5), 3),
        # stochastic votes of up to 3 steps (gain 3, no schedule): keyed as ops.vote's defaults
        # (seed 0, tensor 0, step_counter 0) at every vote
        ("E1TM8", "flip", {"K": 2, "theta": 4, "gain": 3, "vote_max": 3}, 0, (3, 17), 3),
        # the same votes measured against the whole tensor's rms, and a moved trit's counter starting at -+3
        ("E1TM8", "flip", {"K": 2, "theta": 4, "gain": 3, "vote_max": 3, "vote_norm": 1, "reset": 3}, 0, (3, 17), 3),
    ]
    out = []
    for i, (fmt, rule, params, step, shape, nvotes) in enumerate(specs):
        lcg = Lcg(200 + i)
        scheme = make_scheme(fmt, rule, **params)
        gs, L = scheme.gs, scheme.carry_limit
        rows, cols = formats.tensor_view(shape)
        ng = formats.n_groups(cols, gs)
        _, Tp = trits_and_packed(lcg, rows, cols, gs)
        E = lcg.ints(-3, 3, (rows, ng), np.int8)
        bound = gs * step if rule == "average" else L - 1
        corr = lcg.ints(-bound, bound, (rows, ng), np.int64)
        E.flat[0], corr.flat[0] = 127, bound
        E.flat[-1], corr.flat[-1] = -128, -bound
        arrays = {"T_packed": Tp, "E": E, "corr_accum": corr}
        if rule == "flip":
            th = scheme.params["theta"]
            fa = np.zeros((rows, formats.padded_cols(cols, gs)), np.int8)
            fa[:, :cols] = lcg.ints(-th, th, (rows, cols), np.int8)
            arrays["flip_accum"] = fa
        before = {k: tolist(v) for k, v in arrays.items()}
        grads, steps = [], []
        for _ in range(nvotes):
            g = lcg.choice(GRAD_VALUES, shape, np.float32)
            g2 = g.reshape(rows, cols)
            delta = ref.vote_delta(g2, arrays["T_packed"], gs, ng)
            c, e, carries, sats = ref.apply_votes(arrays["corr_accum"], arrays["E"], delta, L)
            arrays = dict(arrays, corr_accum=c, E=e)
            flips = 0
            if rule == "flip":
                p = scheme.params
                tp, fa, flips = ref.flip(g2, arrays["T_packed"], arrays["flip_accum"], p["theta"],
                                         schedule.trit_vote_gain(p, 0), schedule.vote_key(0, 0, 0), p["vote_max"],
                                         p["vote_norm"] == 1, p["reset"])
                arrays = dict(arrays, T_packed=tp, flip_accum=fa)
            grads.append(bits(g))
            steps.append({"delta": tolist(delta), "carries": carries, "saturations": sats, "flips": flips,
                          "after": {k: tolist(v) for k, v in arrays.items()}})
        out.append({**scheme_dict(scheme), "step_counter": step, "shape": list(shape), "before": before,
                    "grad_bits": grads, "votes": steps})
    return out


def fuse_cases() -> list[dict]:
    """state -> E_fused for both rules: halves round to even, values past int8 clip."""
    out = []
    # Hand-made rows. carry K=16, gs=32: Xi = corr/512. average step 8, gs=32: Xi = 4*corr/256 = corr/64.
    E = np.array([[1, 2, -1, -2, 0, 3, 3, 127, -128, 126, -127, 5]], np.int8)
    frac = np.array([0.5, 0.5, -0.5, -0.5, 0.5, 0.25, 0.75, 0.75, -0.75, 0.5, -0.5, 0.0])
    for rule, params, step, scale in [("carry", {"K": 16}, 8, 512), ("average", {}, 8, 64), ("flip", {"K": 16, "theta": 8}, 8, 512)]:
        scheme = make_scheme("E1TM32", rule, **params)
        corr = (frac * scale).astype(np.int64).reshape(1, -1)
        num, den = scheme.xi_ratio(step)
        E_fused, clipped, changed = ref.fuse(E, corr, num, den)
        out.append({**scheme_dict(scheme), "step_counter": step, "shape": [1, 32 * E.shape[1]], "E": tolist(E),
                    "corr_accum": tolist(corr), "E_fused": tolist(E_fused), "clipped": clipped, "changed": changed})
    # random rows, average at step 0 (Xi = 0: E_fused == E) and at a large step, carry with K = 3
    for i, (fmt, rule, params, step, shape) in enumerate([("E1TM6", "average", {}, 0, (3, 20)),
                                                            ("E1TM6", "average", {}, 1000, (3, 20)),
                                                            ("E1TM4", "carry", {"K": 3}, 2, (4, 17))]):
        lcg = Lcg(300 + i)
        scheme = make_scheme(fmt, rule, **params)
        rows, cols = formats.tensor_view(shape)
        ng = formats.n_groups(cols, scheme.gs)
        E = lcg.ints(-128, 127, (rows, ng), np.int8)
        bound = scheme.gs * step if rule == "average" else scheme.carry_limit - 1
        corr = lcg.ints(-bound, bound, (rows, ng), np.int64)
        E.flat[0], corr.flat[0] = 127, bound
        E.flat[1], corr.flat[1] = -128, -bound
        num, den = scheme.xi_ratio(step)
        E_fused, clipped, changed = ref.fuse(E, corr, num, den)
        out.append({**scheme_dict(scheme), "step_counter": step, "shape": list(shape), "E": tolist(E),
                    "corr_accum": tolist(corr), "E_fused": tolist(E_fused), "clipped": clipped, "changed": changed})
    return out


def convert_rule(w: np.ndarray, scheme: formats.Scheme) -> dict[str, np.ndarray]:
    """The convert rule of SPEC.md, one group at a time (an independent twin of ops.convert)."""
    rows, cols = formats.tensor_view(w.shape)
    gs, L = scheme.gs, scheme.carry_limit
    cols_p = formats.padded_cols(cols, gs)
    ng = cols_p // gs
    w2 = w.reshape(rows, cols).astype(np.float64)
    T = np.zeros((rows, cols_p), np.int8)
    E = np.zeros((rows, ng), np.int8)
    corr = np.zeros((rows, ng), np.int64)
    fa = np.zeros((rows, cols_p), np.int8)
    for r in range(rows):
        for g in range(ng):
            lo, hi = g * gs, min((g + 1) * gs, cols)
            x = w2[r, lo:hi]  # the real (non-padding) elements of the group
            a = np.abs(x).sum() / len(x)
            if a == 0:
                continue  # all-zero group: T = 0, E = 0, corr_accum = 0
            t = np.clip(np.rint(x / a), -1, 1)
            s = np.abs(x[t != 0]).sum() / np.count_nonzero(t)
            l2 = np.log2(s)
            e = float(np.clip(np.rint(l2), formats.E_MIN, formats.E_MAX))
            T[r, lo:hi] = t
            E[r, g] = e
            if "flip_accum" in scheme.arrays():
                th = scheme.params["theta"]
                fa[r, lo:hi] = np.clip(np.rint(2 * th * (x / a - t)), -(th - 1), th - 1)
            if L:
                corr[r, g] = int(np.clip(np.rint((l2 - e) * L), -(L - 1), L - 1))
    arrays = {"T_packed": ref.pack(T, formats.packed_cols(cols_p)), "E": E, "corr_accum": corr}
    if "flip_accum" in scheme.arrays():
        arrays["flip_accum"] = fa
    return arrays


def convert_cases() -> list[dict]:
    """Float weights -> E1TM state at step 0. Dyadic weights make every group sum exact, so the result
    does not depend on summation order; one group clips at E = 127 (|w| ~ 3e38), one at -128 (float32
    subnormals), one is all zero."""
    lcg = Lcg(400)
    values = (-3.0, -1.5, -0.75, -0.5, -0.25, 0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 6.0)
    w = lcg.choice(values, (3, 21), np.float32)
    w[0, :8] = 0.0  # all-zero group
    w[1, 8:16] = np.float32(3.0e38) * np.array([1, -1, 1, 1, -1, 1, -1, 1], np.float32)  # log2 s ~ 127.8: E clips
    w[2, 0:8] = np.float32(2.0**-140) * np.array([1, 0, -1, 1, 1, 0, 0, -1], np.float32)  # subnormal: E clips
    out = []
    for fmt, rule, params in [("E1TM8", "carry", {"K": 16}), ("E1TM8", "average", {}), ("E1TM6", "flip", {"K": 4, "theta": 8})]:
        scheme = make_scheme(fmt, rule, **params)
        arrays = convert_rule(w, scheme)
        out.append({**scheme_dict(scheme), "shape": list(w.shape), "w_bits": bits(w), "w": tolist(w.astype(np.float64)),
                    **{k: tolist(v) for k, v in arrays.items()}})
    w1 = lcg.choice(values, (11,), np.float32)  # a 1-D tensor: one row
    scheme = formats.make_scheme("E1TM4", "carry", K=3)
    out.append({**scheme_dict(scheme), "shape": [11], "w_bits": bits(w1), "w": tolist(w1.astype(np.float64)),
                **{k: tolist(v) for k, v in convert_rule(w1, scheme).items()}})
    return out


def golden_checkpoint_state() -> dict:
    """The tensors of the golden checkpoint (carry, E1TM8, K=16, step 7), with W_eff expected."""
    scheme = formats.make_scheme("E1TM8", "carry", K=16)
    lcg = Lcg(500)
    tensors = {}
    for name, shape in [("blocks.0.attn.qkv.weight", (3, 13)), ("tok_emb.weight", (5, 2, 4)), ("head.weight", (9,))]:
        rows, cols = formats.tensor_view(shape)
        ng = formats.n_groups(cols, scheme.gs)
        _, Tp = trits_and_packed(lcg, rows, cols, scheme.gs)
        E = lcg.ints(-9, 2, (rows, ng), np.int8)
        corr = lcg.ints(-(scheme.carry_limit - 1), scheme.carry_limit - 1, (rows, ng), np.int64)
        _, W = materialize_ref(Tp, E, corr, scheme, GOLDEN_STEP, cols)
        tensors[name] = {"shape": list(shape), "T_packed": tolist(Tp), "E": tolist(E), "corr_accum": tolist(corr),
                         "W_eff_bits": bits(W.reshape(shape))}
    return {"path": "golden/run", "checkpoint": f"step_{GOLDEN_STEP}", "kind": "e1tm", **scheme_dict(scheme),
            "fused": False, "step_counter": GOLDEN_STEP, "meta": {"model": "golden", "note": "formats/make_vectors.py"},
            "tensors": tensors}


def build() -> dict:
    return {
        "arbs_format_version": formats.FORMAT_VERSION,
        "generator": "formats/make_vectors.py (numpy reference: arbs.testing.reference)",
        "float32": "IEEE-754 bit patterns, 8 lowercase hex digits",
        "pack": pack_cases(),
        "materialize": state_cases(),
        "vote": vote_cases(),
        "fuse": fuse_cases(),
        "convert": convert_cases(),
        "golden_checkpoint": golden_checkpoint_state(),
    }


def dumps(obj) -> str:
    """JSON with innermost lists on one line: readable, diffable, stable."""
    text = json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=True, allow_nan=False)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


def write_golden_store(vectors: dict, run: Path) -> Path:
    from arbs.store import Checkpoint, TensorState, save_checkpoint

    g = vectors["golden_checkpoint"]
    tensors = {}
    for name, t in g["tensors"].items():
        arrays = {k: np.array(t[k], formats.ARRAYS[k].dtype) for k in formats.tensor_arrays(g["rule"])}
        tensors[name] = TensorState(name=name, shape=tuple(t["shape"]), arrays=arrays)
    ckpt = Checkpoint(kind="e1tm", format=g["format"], gs=g["gs"], rule=g["rule"], rule_params=g["rule_params"],
                      fused=False, step_counter=g["step_counter"], tensors=tensors, meta=g["meta"])
    return save_checkpoint(run, ckpt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the committed vectors.json; write nothing")
    p.add_argument("--rewrite-golden-store", action="store_true",
                   help="delete and rewrite formats/golden/run (only together with a FORMAT_VERSION bump)")
    a = p.parse_args(argv)
    vectors = build()
    text = dumps(vectors)
    if a.check:
        same = VECTORS.exists() and VECTORS.read_text() == text
        print(f"{VECTORS}: {'up to date' if same else 'DIFFERS from a fresh run'}")
        return 0 if same else 1
    VECTORS.write_text(text)
    print(f"wrote {VECTORS} ({len(text):,} bytes)")
    if a.rewrite_golden_store and GOLDEN_RUN.exists():
        shutil.rmtree(GOLDEN_RUN)
    if GOLDEN_RUN.exists():
        print(f"kept {GOLDEN_RUN} (committed golden store; --rewrite-golden-store replaces it)")
    else:
        print(f"wrote {write_golden_store(vectors, GOLDEN_RUN)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
