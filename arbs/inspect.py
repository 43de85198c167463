"""What a checkpoint holds: per-tensor bits/weight, sparsity, E and Xi statistics (``arbs inspect``).

``summarize(ckpt)`` returns a JSON-able dict; ``render_text(summary)`` formats it for humans.
Bits per weight are *measured* from the arrays' raw byte sizes (no compression), next to the
theoretical figure of ``formats.theoretical_bpw`` (exact when cols is a multiple of lcm(gs, 5)):

* inference = 8 * (T_packed.nbytes + E.nbytes) / weights
* training  = 8 * (nbytes of every per-tensor array) / weights; the checkpoint total adds the
  8-byte step_counter shared by all tensors.

A user's model saved with ``arbs.nn.save`` may keep float parameters (norm gains, biases): they are not
E1TM state and are counted apart (``total.float_bytes``, ``bpw_float`` per E1TM weight; ``float_params``
lists them), and the checkpoint is marked ``integer_only: false``.

``bytes_on_disk`` (compressed, as stored) comes from ``store.bytes_on_disk``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from . import formats
from . import ops, store
from .errors import ConfigError

log = logging.getLogger(__name__)

E_QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)


def _nbytes(a) -> int:
    return int(np.asarray(a).nbytes)


def _weights(shape) -> int:
    return int(math.prod(int(d) for d in shape))


def _bpw(nbytes: int, weights: int) -> float | None:
    return 8.0 * nbytes / weights if weights else None


def _stats_E(E: np.ndarray) -> dict | None:
    if E.size == 0:
        return None
    e = E.astype(np.int64).ravel()
    qs = np.quantile(e, E_QUANTILES, method="nearest")
    return {
        "min": int(e.min()),
        "max": int(e.max()),
        "mean": float(e.mean()),
        "quantiles": {f"p{round(q * 100)}": int(v) for q, v in zip(E_QUANTILES, qs)},
        "at_limits": int(((e == formats.E_MIN) | (e == formats.E_MAX)).sum()),  # groups with E at -128 or 127
    }


def _stats_Xi(corr: np.ndarray, num: int, den: int) -> dict | None:
    if corr.size == 0:
        return None
    if den == 0:  # average rule at step 0: Xi is 0 by definition
        xi = np.zeros(corr.shape)
    else:
        xi = (num * corr.astype(np.float64)) / np.float64(den)
    a = np.abs(xi)
    return {
        "min": float(xi.min()),
        "max": float(xi.max()),
        "mean_abs": float(a.mean()),
        "frac_ge_half": float((a >= 0.5).mean()),  # groups fuse moves (ties |Xi| = 1/2: half to even)
    }


def _sparsity(T_packed: np.ndarray, shape) -> tuple[int, int]:
    """(zero trits, real weights): padding trits are not counted."""
    rows, cols = formats.tensor_view(shape)
    zeros = 0
    step = max(1, (1 << 22) // max(cols, 1))  # unpack a few MiB of trits at a time
    for r0 in range(0, rows, step):
        T = ops.unpack(np.ascontiguousarray(T_packed[r0:r0 + step]), cols)  # (≤step, cols)
        zeros += int(T.size - np.count_nonzero(T))
    return zeros, rows * cols


# ------------------------------------------------------------------------------------------- E1TM


def _summarize_e1tm(ckpt, bpw: bool) -> dict:
    gs = formats.variant_gs(ckpt.format)
    fused = bool(ckpt.fused)
    training = not fused
    num = den = 0
    if training:
        scheme = formats.make_scheme(ckpt.format, ckpt.rule, **(ckpt.rule_params or {}))
        num, den = scheme.xi_ratio(int(ckpt.step_counter))
    th_inf = formats.theoretical_bpw(gs, fused=True)
    th_train = formats.theoretical_bpw(gs, ckpt.rule) if training else None
    rows_out = []
    tot = {"weights": 0, "inference_bytes": 0, "array_bytes": 0, "zeros": 0}
    for name, ts in ckpt.tensors.items():
        shape = tuple(int(d) for d in ts.shape)
        n = _weights(shape)
        arrays = ts.arrays
        inf_bytes = store.array_nbytes(ts, formats.INFERENCE_ARRAYS)
        all_bytes = store.array_nbytes(ts)
        zeros, real = _sparsity(arrays["T_packed"], shape)
        row = {
            "name": name,
            "shape": list(shape),
            "weights": n,
            "bpw_inference": _bpw(inf_bytes, n),
            "bpw_training": _bpw(all_bytes, n) if training else None,
            "sparsity": zeros / real if real else 0.0,
            "E": _stats_E(arrays["E"]),
            "Xi": _stats_Xi(arrays["corr_accum"], num, den) if training else None,
        }
        if "flip_accum" in arrays:
            fa = arrays["flip_accum"]
            row["flip_accum"] = {
                "min": int(fa.min()) if fa.size else 0,
                "max": int(fa.max()) if fa.size else 0,
                "mean_abs": float(np.abs(fa.astype(np.int64)).mean()) if fa.size else 0.0,
            }
        if bpw:
            row["bpw_theoretical_inference"] = th_inf
            row["bpw_theoretical_training"] = th_train
            row["bytes"] = {k: _nbytes(a) for k, a in arrays.items()}
        rows_out.append(row)
        tot["weights"] += n
        tot["inference_bytes"] += inf_bytes
        tot["array_bytes"] += all_bytes
        tot["zeros"] += zeros
    W = tot["weights"]
    floats = getattr(ckpt, "float_params", None) or {}
    float_bytes = sum(_nbytes(a) for a in floats.values())
    total = {
        "tensors": len(rows_out),
        "weights": W,
        "bpw_inference": _bpw(tot["inference_bytes"], W),
        "bpw_training": _bpw(store.array_nbytes(ckpt), W) if training else None,
        "bpw_theoretical_inference": th_inf,
        "bpw_theoretical_training": th_train,
        "sparsity": tot["zeros"] / W if W else 0.0,
        "array_bytes": store.array_nbytes(ckpt),  # E1TM state only
        "float_params": len(floats),
        "float_values": sum(int(np.asarray(a).size) for a in floats.values()),
        "float_bytes": float_bytes,  # counted apart: not E1TM state
        "bpw_float": _bpw(float_bytes, W) if floats else None,  # float bits per E1TM weight
        "bytes_on_disk": _bytes_on_disk(ckpt),
    }
    out = {"tensors": rows_out, "total": total}
    if floats:
        out["float_params"] = [
            {"name": n, "shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype), "bytes": _nbytes(a)}
            for n, a in floats.items()
        ]
    return out


# ------------------------------------------------------------------------------------------- float


def _summarize_float(ckpt, bpw: bool) -> dict:
    """Float (baseline) checkpoints: shapes, dtypes and bytes of every array; no E1TM statistics."""
    rows_out = []
    W = 0
    weight_bytes = 0
    all_bytes = 0
    for name, ts in ckpt.tensors.items():
        shape = tuple(int(d) for d in ts.shape)
        n = _weights(shape)
        arrays = ts.arrays
        wb = store.array_nbytes(ts, ("weight",))
        ab = store.array_nbytes(ts)
        row = {
            "name": name,
            "shape": list(shape),
            "weights": n,
            "dtypes": {k: str(np.asarray(a).dtype) for k, a in arrays.items()},
            "bytes": {k: _nbytes(a) for k, a in arrays.items()},
            "bpw_weight": _bpw(wb, n),
            "bpw_all": _bpw(ab, n),  # weight plus optimizer state
        }
        rows_out.append(row)
        W += n
        weight_bytes += wb
        all_bytes += ab
    total = {
        "tensors": len(rows_out),
        "weights": W,
        "bpw_weight": _bpw(weight_bytes, W),
        "bpw_all": _bpw(all_bytes, W),
        "array_bytes": all_bytes,
        "bytes_on_disk": _bytes_on_disk(ckpt),
    }
    out = {"tensors": rows_out, "total": total, "float_format": ckpt.meta.get("format")}
    _add_deadzone(ckpt, rows_out)
    return out


def _add_deadzone(ckpt, rows_out: list[dict]) -> None:
    """Per ternary-baseline weight: fractions at -1/0/+1 and near a rounding boundary (deadzone trapping)."""
    from .nn import baselines

    fmt = ckpt.meta.get("format")
    if fmt not in baselines.BASELINES or baselines.baseline_spec(fmt).trits is None:
        return
    gs = ckpt.meta.get("gs", 32)
    threshold = ckpt.meta.get("baseline_threshold", ckpt.meta.get("baseline_theta", 0.5))
    for row in rows_out:
        name = row["name"]
        if not name.endswith(".weight") or len(row["shape"]) < 2:
            continue
        prefix = name[: -len("weight")] + "quantizer."
        qstate = {n[len(prefix):]: t.arrays["weight"] for n, t in ckpt.tensors.items() if n.startswith(prefix)}
        row["deadzone"] = baselines.deadzone_stats(fmt, ckpt.tensors[name].arrays["weight"], qstate or None,
                                                   gs=gs, threshold=threshold)


# ------------------------------------------------------------------------------------------ public

# kind -> summarizer(ckpt, bpw) returning {"tensors": [...], "total": {...}, ...}; add new kinds here
SUMMARIZERS: dict[str, Callable] = {
    "e1tm": _summarize_e1tm,
    "float": _summarize_float,
}


def _bytes_on_disk(ckpt) -> int | None:
    if getattr(ckpt, "path", None) is None:
        return None
    return int(store.bytes_on_disk(ckpt.path))


def summarize(ckpt, bpw: bool = False) -> dict:
    """A JSON-able description of a checkpoint (``store.Checkpoint``).

    Keys: ``path``, ``kind``, ``format``, ``gs``, ``rule``, ``rule_params``, ``step_counter``,
    ``fused``, ``meta``, ``tensors`` (one dict per tensor) and ``total``. For E1TM checkpoints each
    tensor has ``name``, ``shape``, ``weights``, ``bpw_inference``, ``bpw_training`` (None when
    fused), ``sparsity`` (fraction of real weights with T == 0), ``E`` (min, max, mean, quantiles,
    at_limits) and ``Xi`` (min, max, mean_abs, frac_ge_half; None when fused). ``bpw=True`` adds the
    theoretical figures and per-array byte counts to every tensor. ``total`` has ``weights``,
    ``bpw_inference``, ``bpw_training`` (incl. the shared 8-byte step_counter), theoretical figures,
    ``sparsity`` and ``bytes_on_disk`` (None for an unsaved checkpoint).

    ``integer_only`` is True for an E1TM checkpoint without float parameters. One with float parameters
    (a user's model, ``arbs.nn.save``) counts them apart: ``total`` adds ``float_params`` (how many),
    ``float_values``, ``float_bytes`` and ``bpw_float`` (float bits per E1TM weight; None without any), and
    ``float_params`` lists ``{name, shape, dtype, bytes}``; the E1TM figures leave them out.

    Float checkpoints get dtypes/bytes per array instead and, for ternary baselines, a per-tensor ``deadzone``
    (fractions at -1/0/+1 and near a trit boundary; arbs.nn.baselines.deadzone_stats).
    """
    try:
        fn = SUMMARIZERS[ckpt.kind]
    except KeyError:
        raise ConfigError(
            f"cannot summarize a checkpoint of kind {ckpt.kind!r}; known kinds: {', '.join(SUMMARIZERS)}"
        ) from None
    head = {
        "path": None if ckpt.path is None else str(ckpt.path),
        "kind": ckpt.kind,
        "format": ckpt.format if ckpt.kind != "float" else ckpt.meta.get("format", ckpt.format),
        "gs": ckpt.gs,
        "rule": ckpt.rule,
        "rule_params": dict(ckpt.rule_params or {}),
        "step_counter": None if ckpt.step_counter is None else int(ckpt.step_counter),
        "fused": bool(ckpt.fused),
        "integer_only": bool(getattr(ckpt, "integer_only", False)),
        "meta": dict(ckpt.meta or {}),
    }
    head.update(fn(ckpt, bpw))
    return head


# ------------------------------------------------------------------------------------------- text


def _f(x, spec: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def render_text(summary: dict) -> str:
    """A human-readable table of a :func:`summarize` result."""
    s = summary
    out = []
    if s["kind"] == "float":
        fmt = s.get("float_format") or s["format"]
        out.append(f"{s['path'] or '(unsaved)'}: float baseline {fmt}, step {s['step_counter']}")
        dz = [t.get("deadzone") or {} for t in s["tensors"]]
        rows = [[t["name"], "x".join(map(str, t["shape"])), t["dtypes"].get("weight", "-"), ",".join(t["dtypes"]),
                 _human_bytes(sum(t["bytes"].values())), _f(t["bpw_weight"], ".2f"),
                 *(_f(d.get(k), ".3f") for k in ("frac_neg", "frac_zero", "frac_pos", "frac_near_boundary"))]
                for t, d in zip(s["tensors"], dz)]
        out += _table(["tensor", "shape", "dtype", "arrays", "bytes", "bpw(weight)", "T=-1", "T=0", "T=+1",
                       "near boundary"], rows, {4, 5, 6, 7, 8, 9})
        if any(dz):
            out.append(f"near boundary: |W| within {dz[[bool(d) for d in dz].index(True)]['band']} x scale of a "
                       "trit boundary (deadzone trapping)")
        tot = s["total"]
        out.append(f"total: {tot['tensors']} tensors, {tot['weights']} weights, "
                   f"{_f(tot['bpw_weight'], '.2f')} bpw weight, {_f(tot['bpw_all'], '.2f')} bpw incl. optimizer state, "
                   f"{_human_bytes(tot['bytes_on_disk'])} on disk")
        return "\n".join(out)

    what = "fused (inference)" if s["fused"] else "training"
    if s["meta"].get("export") == "keep-accum":
        what += ", keep-accum export"
    params = ", ".join(f"{k}={v}" for k, v in s["rule_params"].items())
    rule = f"rule {s['rule']}" + (f" ({params})" if params else "") if s["rule"] else "no rule"
    step = f"step {s['step_counter']}" if s["step_counter"] is not None else "no step counter"
    out.append(f"{s['path'] or '(unsaved)'}: E1TM {s['format']} (gs={s['gs']}), {what}, {rule}, {step}")
    ff = s["meta"].get("fused_from")
    if ff:
        out.append(f"fused from {ff.get('format')} rule {ff.get('rule')} at step {ff.get('step_counter')}")
    detailed = any("bytes" in t for t in s["tensors"])
    header = ["tensor", "shape", "bpw(inf)", "bpw(train)"]
    if detailed:
        header += ["theory(inf)", "theory(train)"]
    header += ["sparsity", "E min..max", "E mean", "|Xi| mean", "|Xi|>=.5"]
    rows = []
    for t in s["tensors"]:
        r = [t["name"], "x".join(map(str, t["shape"])), _f(t["bpw_inference"], ".2f"), _f(t["bpw_training"], ".2f")]
        if detailed:
            r += [_f(t["bpw_theoretical_inference"], ".2f"), _f(t["bpw_theoretical_training"], ".2f")]
        E, Xi = t["E"], t["Xi"]
        r += [
            f"{t['sparsity']:.3f}",
            f"{E['min']}..{E['max']}" if E else "-",
            _f(E and E["mean"], ".2f"),
            _f(Xi and Xi["mean_abs"], ".3f"),
            _f(Xi and Xi["frac_ge_half"], ".3f"),
        ]
        rows.append(r)
    right = set(range(2, len(header)))
    out += _table(header, rows, right)
    tot = s["total"]
    out.append(
        f"total: {tot['tensors']} tensors, {tot['weights']} weights; "
        f"inference {_f(tot['bpw_inference'], '.2f')} bpw (theory {_f(tot['bpw_theoretical_inference'], '.2f')}), "
        f"training {_f(tot['bpw_training'], '.2f')} bpw (theory {_f(tot['bpw_theoretical_training'], '.2f')}); "
        f"sparsity {tot['sparsity']:.3f}; {_human_bytes(tot['bytes_on_disk'])} on disk"
    )
    if tot.get("float_params"):
        if detailed and s.get("float_params"):
            rows = [[f["name"], "x".join(map(str, f["shape"])) or "scalar", f["dtype"], _human_bytes(f["bytes"])]
                    for f in s["float_params"]]
            out += _table(["float parameter", "shape", "dtype", "bytes"], rows, {3})
        out.append(
            f"float parameters: {tot['float_params']} ({tot['float_values']} values, {_human_bytes(tot['float_bytes'])}, "
            f"{_f(tot['bpw_float'], '.2f')} bits per E1TM weight), counted apart from the E1TM figures above; "
            "this checkpoint is NOT integer-only"
        )
    return "\n".join(out)


def summarize_path(path, bpw: bool = False) -> dict:
    """Open the checkpoint at ``path`` (run dir -> LATEST, or a step_<N> dir) and :func:`summarize` it."""
    return summarize(store.open_checkpoint(path), bpw=bpw)
