"""Public numpy API over the kernels: checks dtypes, shapes and contiguity once, allocates, calls kernels.

A tensor's E1TM state is a dict of arrays named as in formats.ARRAYS (``T_packed``, ``E``,
``corr_accum`` and, for the flip rule, ``flip_accum``), for a tensor of logical ``shape`` viewed as
(rows, cols) by formats.tensor_view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from . import formats, schedule
from .errors import ConfigError, IntegerRangeError, NonFiniteError
from .kernels import cpu


def _check(a: np.ndarray, name: str, dtype, shape) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}; E1TM requires {np.dtype(dtype)}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}; expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")


def check_state(state: Mapping[str, np.ndarray], shape, scheme: formats.Scheme, *, fused: bool = False) -> tuple[int, int]:
    """Check every array of ``state`` against the format table; returns (rows, cols)."""
    rows, cols = formats.tensor_view(shape)
    for name in formats.tensor_arrays(scheme.rule, fused):
        if name not in state:
            raise ValueError(f"state lacks array {name!r} (rule {scheme.rule!r} needs {formats.tensor_arrays(scheme.rule, fused)})")
        _check(state[name], name, formats.ARRAYS[name].dtype, formats.array_shape(name, rows, cols, scheme.gs))
    return rows, cols


def _checked_xi_ratio(state, scheme: formats.Scheme, step_counter: int) -> tuple[int, int]:
    """scheme.xi_ratio(step_counter), checked so that the kernels' int64 products cannot wrap: the
    denominator fits (formats.xi_ratio: IntegerRangeError for average unless gs*step_counter < 2**61) and
    so does the numerator xi_num*corr_accum for every group (|corr_accum| <= int64 max // xi_num)."""
    num, den = scheme.xi_ratio(step_counter)
    corr = state["corr_accum"]
    if num > 1 and corr.size:
        bound = formats.INT64_MAX // num
        hi, lo = int(corr.max()), int(corr.min())
        if hi > bound or lo < -bound:
            raise IntegerRangeError(
                f"corr_accum holds {hi if hi > bound else lo}; rule {scheme.rule!r} computes xi_num*corr_accum = "
                f"{num}*corr_accum in int64, which needs |corr_accum| <= {bound}"
            )
    return num, den


def _as_2d(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return x.reshape(rows, cols)


def pack(T: np.ndarray, gs: int) -> np.ndarray:
    """Pack trits.

    Parameters
    ----------
    T : int8 array (rows, cols), values in {-1, 0, +1}
    gs : int, group size; rows are padded with zero trits to ceil(cols/gs)*gs.

    Returns
    -------
    T_packed : uint8 array (rows, ceil(cols_p/5)), 5 trits per byte, first trit least significant.
    """
    T = np.ascontiguousarray(T)
    if T.dtype != np.int8 or T.ndim != 2:
        raise TypeError(f"T must be a 2-D int8 array, got {T.ndim}-D {T.dtype}")
    if T.size and (T.min() < -1 or T.max() > 1):
        raise ValueError("T holds values outside {-1, 0, +1}")
    out = np.empty((T.shape[0], formats.packed_cols(formats.padded_cols(T.shape[1], gs))), np.uint8)
    cpu.kernel("pack_into", T.size)(T, out)
    return out


def unpack(T_packed: np.ndarray, cols: int) -> np.ndarray:
    """Unpack ``T_packed`` (uint8 (rows, nb)) to int8 trits (rows, cols); padding dropped."""
    if T_packed.dtype != np.uint8 or T_packed.ndim != 2:
        raise TypeError(f"T_packed must be a 2-D uint8 array, got {T_packed.ndim}-D {T_packed.dtype}")
    if cols > 5 * T_packed.shape[1]:
        raise ValueError(f"cols={cols} exceeds the {5 * T_packed.shape[1]} trits that T_packed holds")
    out = np.empty((T_packed.shape[0], cols), np.int8)
    cpu.kernel("unpack_into", out.size)(np.ascontiguousarray(T_packed), out)
    return out


def materialize(state, shape, scheme: formats.Scheme, step_counter: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """W_eff = S*T, S = float32(2**(E + Xi)), as float32 in the logical ``shape``.

    ``out`` (float32, ``shape``, C-contiguous) is overwritten and returned if given. IntegerRangeError
    when xi_num*corr_accum or xi_den would not fit int64 (see ``fuse``).
    """
    rows, cols = check_state(state, shape, scheme)
    _checked_xi_ratio(state, scheme, step_counter)
    if out is None:
        out = np.empty(tuple(shape), np.float32)
    else:
        _check(out, "out", np.float32, tuple(shape))
    materialize_unchecked(state, scheme, step_counter, _as_2d(out, rows, cols))
    return out


def materialize_unchecked(state, scheme: formats.Scheme, step_counter: int, out2d: np.ndarray) -> None:
    """materialize into ``out2d`` (float32 (rows, cols), C-contiguous) for ``state`` that check_state
    has passed: the training hot path (arbs.nn), which checks its arrays once, not on every call."""
    num, den = scheme.xi_ratio(step_counter)
    cpu.kernel("materialize_into", out2d.size)(state["T_packed"], state["E"], state["corr_accum"], scheme.gs, num, den, out2d)


@dataclass(frozen=True)
class VoteStats:
    carries: int = 0  # groups whose E moved by one (carry/flip rules)
    saturations: int = 0  # carries refused because E was at -128/127
    flips: int = 0  # trits moved (flip rule)


def vote(state, grad: np.ndarray, shape, scheme: formats.Scheme, *, step_counter: int = 0, seed: int = 0,
         tensor: int = 0, scales: bool = True) -> VoteStats:
    """Turn the gradient of W_eff into integer votes and apply the rule's update, in place on ``state``.

    ``corr_accum[g] -= sum_{i in g} sign(grad_i)*T_i``; then carry into E (carry, flip) and move trits
    (flip). A NaN or inf anywhere in ``grad`` raises NonFiniteError and leaves every array untouched.
    ``grad`` is float32 or float64 in the logical ``shape``. The caller advances step_counter once per
    optimizer step.

    flip with ``gain > 0`` votes stochastically, up to ``vote_max`` counter steps per vote
    (schedule.trit_vote_gain): the draws are keyed by
    (seed, tensor, step_counter, element), so the same call gives the same result. ``scales=False``
    leaves E and corr_accum as they are (the fuse phase: scales are fused and frozen; trits still move).
    """
    rows, cols = check_state(state, shape, scheme)
    if grad.dtype not in (np.float32, np.float64):
        raise TypeError(f"gradient has dtype {grad.dtype}; expected float32 or float64 (convert explicitly)")
    if grad.shape != tuple(shape):
        raise ValueError(f"gradient has shape {grad.shape}; the weight's shape is {tuple(shape)}")
    return vote_unchecked(state, _as_2d(np.ascontiguousarray(grad), rows, cols), scheme, step_counter=step_counter,
                        seed=seed, tensor=tensor, scales=scales)


def vote_unchecked(state, g2: np.ndarray, scheme: formats.Scheme, *, step_counter: int, seed: int, tensor: int,
                 scales: bool) -> VoteStats:
    """vote for ``state`` that check_state has passed and a float32/float64 C-contiguous gradient ``g2``
    already viewed as (rows, cols): the training hot path (arbs.nn). Same guarantees as ``vote``: a
    NaN/inf raises before any array changes; corr_accum never wraps."""
    corr = state["corr_accum"]
    delta = np.empty(corr.shape, np.int64)
    bad = cpu.kernel("vote_delta_into", g2.size)(g2, state["T_packed"], scheme.gs, delta)
    if bad:
        raise NonFiniteError(f"gradient holds {bad} NaN/inf value(s); no vote was applied")
    limit = scheme.carry_limit
    # max/min, not abs: abs(-2**63) wraps to -2**63 and would pass
    if limit == 0 and corr.size and max(int(corr.max()), -int(corr.min())) > formats.INT64_MAX - scheme.gs:
        raise IntegerRangeError(f"corr_accum is within gs={scheme.gs} of the int64 limit; refusing to vote")
    carries = sats = flips = 0
    if scales:
        carries, sats = cpu.kernel("apply_votes", corr.size * 16)(corr, state["E"], delta, limit)
    if "flip_accum" in scheme.arrays():
        gain_m = schedule.trit_vote_gain(scheme.params, step_counter)
        if gain_m > 0 or scheme.params["gain"] == 0:  # gain > 0 past the horizon: trits are final
            key = np.uint64(schedule.vote_key(seed, tensor, step_counter))
            flips = cpu.kernel("flip_into", g2.size)(g2, state["T_packed"], state["flip_accum"],
                                                     scheme.params["theta"], gain_m, scheme.params["vote_max"], key,
                                                     scheme.params["vote_norm"] == 1, scheme.params["reset"])
    return VoteStats(carries, sats, flips)


@dataclass(frozen=True)
class FuseStats:
    groups: int
    clipped: int  # groups whose rint(E + Xi) left [-128, 127]
    changed: int  # groups with |Xi| >= 0.5 (fuse moved E)


def fuse(state, shape, scheme: formats.Scheme, step_counter: int) -> tuple[np.ndarray, FuseStats]:
    """E_fused = clip(rint(E + Xi), -128, 127), round half to even. Inputs are not modified.

    IntegerRangeError when xi_num*corr_accum or xi_den would not fit int64 (average: gs*step_counter
    must stay below 2**61 and |corr_accum| at most int64 max // 4)."""
    check_state(state, shape, scheme)
    num, den = _checked_xi_ratio(state, scheme, step_counter)
    out, clipped, changed = _fused_E(state, num, den)
    return out, FuseStats(out.size, clipped, changed)


def _fused_E(state, num: int, den: int) -> tuple[np.ndarray, int, int]:
    """(E_fused, clipped, changed) of a state check_state has passed, Xi = num*corr_accum/den: the kernel of
    ``fuse``, shared with ``fuse_to_grid``."""
    E = state["E"]
    out = np.empty(E.shape, np.int8)
    clipped, changed = cpu.kernel("fuse_into", E.size * 16)(E, state["corr_accum"], num, den, out)
    return out, clipped, changed


def materialize_fused(T_packed: np.ndarray, E: np.ndarray, shape, gs: int) -> np.ndarray:
    """W_eff of a fused (inference) tensor: S = 2**E exactly."""
    rows, cols = formats.tensor_view(shape)
    _check(T_packed, "T_packed", np.uint8, formats.array_shape("T_packed", rows, cols, gs))
    _check(E, "E", np.int8, formats.array_shape("E", rows, cols, gs))
    out = np.empty(tuple(shape), np.float32)
    cpu.kernel("materialize_into", out.size)(T_packed, E, np.zeros(E.shape, np.int64), gs, 0, 0, _as_2d(out, rows, cols))
    return out


@dataclass(frozen=True)
class ConvertStats:
    rel_l2: float  # ||W_eff - w|| / ||w||
    zero_groups: int
    clipped: int  # groups whose log2 scale left the int8 range of E


def convert(w: np.ndarray, scheme: formats.Scheme, *, name: str = "tensor") -> tuple[dict[str, np.ndarray], ConvertStats]:
    """Float weight -> E1TM state at step 0 (the convert rule in formats/SPEC.md).

    Per group: a = mean|w| over the real elements, T = clamp(rint(w/a), -1, 1), s = mean|w_i| over the
    non-zero trits, E = clip(rint(log2 s), -128, 127); all-zero groups get T = 0, E = 0. For carry/flip
    the fraction is kept: corr_accum = rint((log2 s - E)*K*gs), clamped inside +-(K*gs - 1). flip's
    counters start where each weight sits between the trits: flip_accum = rint(2*theta*(w/a - T)), clamped
    inside +-(theta - 1) (a weight halfway to the next trit starts halfway to moving there).
    """
    w = np.asarray(w)
    if w.dtype.kind != "f":
        raise ConfigError(f"{name}: expected a floating-point tensor, got dtype {w.dtype}")
    if not np.isfinite(w).all():
        raise NonFiniteError(f"{name}: tensor holds {int((~np.isfinite(w)).sum())} NaN/inf value(s); cannot convert")
    shape = w.shape
    rows, cols = formats.tensor_view(shape)
    gs = scheme.gs
    cols_p = formats.padded_cols(cols, gs)
    ng = cols_p // gs
    wp = np.zeros((rows, cols_p), np.float64)
    wp[:, :cols] = w.reshape(rows, cols)
    g = wp.reshape(rows, ng, gs)  # (rows, ng, gs)
    real = np.zeros((rows, cols_p), bool)
    real[:, :cols] = True
    n_real = real.reshape(rows, ng, gs).sum(axis=2)
    a = np.abs(g).sum(axis=2) / np.maximum(n_real, 1)  # (rows, ng)
    safe_a = np.where(a > 0, a, 1.0)
    T = np.clip(np.rint(g / safe_a[..., None]), -1, 1)
    T[a == 0] = 0
    nz = T != 0
    n_nz = nz.sum(axis=2)
    s = np.where(n_nz > 0, (np.abs(g) * nz).sum(axis=2) / np.maximum(n_nz, 1), 1.0)  # all-zero: log2(1) = 0
    log2s = np.log2(s)
    E_wide = np.rint(log2s)
    clipped = int(((E_wide > formats.E_MAX) | (E_wide < formats.E_MIN)).sum())
    E = np.clip(E_wide, formats.E_MIN, formats.E_MAX)
    corr = np.zeros((rows, ng), np.int64)
    limit = scheme.carry_limit
    if limit:
        corr = np.clip(np.rint((log2s - E) * limit), -(limit - 1), limit - 1).astype(np.int64)
        corr[n_nz == 0] = 0
    T_rows = T.reshape(rows, cols_p).astype(np.int8)
    state = {"T_packed": pack(T_rows, gs), "E": E.astype(np.int8), "corr_accum": corr}
    if "flip_accum" in scheme.arrays():
        theta = scheme.params["theta"]
        residual = np.rint(2 * theta * (g / safe_a[..., None] - T)).reshape(rows, cols_p)
        fa = np.clip(residual, -(theta - 1), theta - 1)
        fa[~real] = 0
        state["flip_accum"] = fa.astype(np.int8)  # all-zero groups: w = 0 = T, so 0
    w_eff = materialize(state, shape, scheme, 0)
    norm = float(np.linalg.norm(w.astype(np.float64)))
    err = float(np.linalg.norm(w_eff.astype(np.float64) - w.astype(np.float64)))
    rel = err / norm if norm > 0 else 0.0
    return state, ConvertStats(rel, int((n_nz == 0).sum()), clipped)


@dataclass(frozen=True)
class GridStats:
    groups: int
    blocks: int  # grid blocks (block weights of a row; a row's last block may be shorter)
    changed: int  # groups whose grid E differs from the plain fused E (``fuse``)
    clipped: int  # blocks whose rounded exponent left [-128, 127]
    rel_l2: float  # ||W_grid - W_fused|| / ||W_fused||: what the coarser grid costs against the plain fuse


def fuse_to_grid(state, shape, scheme: formats.Scheme | None, step_counter: int | None, *, gs: int | None = None,
                 block: int = 256) -> tuple[np.ndarray, GridStats]:
    """Fuse scales onto a coarser grid: every ``block`` consecutive weights of a row share one E.

    Per block, with ``E_real = E + Xi`` per group (Xi = 0 for a fused state) and ``n_g`` its non-zero trits,
    ``E_block = clip(rint(log2(sum_g n_g 2**E_real_g / sum_g n_g)), -128, 127)``: the power of two nearest (in
    log2) to the L2-optimal common scale of the block's non-zero weights. A block without non-zero trits gets
    ``rint(mean E_real)``. Every group of the block gets ``E_block``: the result is an E array of the usual
    (rows, n_groups) shape that TQ1_0/TQ2_0 (one scale per 256 weights) hold exactly when ``block == 256`` and
    cols is a multiple of 256. Inputs are not modified.

    Parameters
    ----------
    state : dict with ``T_packed`` (uint8) and ``E`` (int8) and, for a training state, ``corr_accum`` (int64).
    shape : the tensor's logical shape.
    scheme, step_counter : of a training state (Xi from ``scheme.xi_ratio(step_counter)``); None for a fused
        state, which then needs ``gs``.
    block : weights per grid block along a row, a multiple of gs.

    Returns
    -------
    (E_grid int8 (rows, n_groups), GridStats)
    """
    rows, cols = formats.tensor_view(shape)
    if scheme is not None:
        check_state(state, shape, scheme)
        gs = scheme.gs
        num, den = _checked_xi_ratio(state, scheme, int(step_counter or 0))
        xi = (num * state["corr_accum"].astype(np.float64) / den) if den else np.zeros(state["E"].shape)
        E_plain = _fused_E(state, num, den)[0]
    else:
        if gs is None:
            raise ConfigError("fuse_to_grid of a fused state needs gs")
        _check(state["T_packed"], "T_packed", np.uint8, formats.array_shape("T_packed", rows, cols, gs))
        _check(state["E"], "E", np.int8, formats.array_shape("E", rows, cols, gs))
        xi = np.zeros(state["E"].shape)
        E_plain = state["E"]
    per = formats.grid_groups(gs, block)
    E = state["E"]
    ng = E.shape[1]
    cols_p = formats.padded_cols(cols, gs)
    nnz = np.count_nonzero(unpack(state["T_packed"], cols_p).reshape(rows, ng, gs), axis=2)  # (rows, ng)
    E_real = E.astype(np.float64) + xi  # (rows, ng)
    nb = -(-ng // per)
    pad = nb * per - ng
    Er = np.pad(E_real, ((0, 0), (0, pad))).reshape(rows, nb, per)
    nr = np.pad(nnz, ((0, 0), (0, pad))).reshape(rows, nb, per).astype(np.float64)
    real = np.pad(np.ones(E.shape, bool), ((0, 0), (0, pad))).reshape(rows, nb, per)
    big = np.where(nr > 0, Er, -np.inf).max(axis=2, keepdims=True)  # (rows, nb, 1)
    big = np.where(np.isfinite(big), big, 0.0)
    total = nr.sum(axis=2)
    with np.errstate(divide="ignore"):
        log_mean = big[..., 0] + np.log2((nr * np.exp2(Er - big)).sum(axis=2) / np.maximum(total, 1))
    mean_E = (Er * real).sum(axis=2) / real.sum(axis=2)
    Eb = np.rint(np.where(total > 0, log_mean, mean_E))  # (rows, nb)
    clipped = int(((Eb < formats.E_MIN) | (Eb > formats.E_MAX)).sum())
    Eb = np.clip(Eb, formats.E_MIN, formats.E_MAX)
    E_grid = np.repeat(Eb, per, axis=1)[:, :ng].astype(np.int8)
    E_plain = E_plain.astype(np.float64)
    ref = (nnz * np.exp2(2 * E_plain)).sum()
    err = (nnz * (np.exp2(E_grid.astype(np.float64)) - np.exp2(E_plain)) ** 2).sum()
    rel = float(np.sqrt(err / ref)) if ref > 0 else 0.0
    changed = int(np.count_nonzero(E_grid != E_plain))
    return E_grid, GridStats(E.size, rows * nb, changed, clipped, rel)
