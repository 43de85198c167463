"""Triton kernels on packed E1TM state held in torch CUDA tensors: the contracts of arbs.kernels.cpu.

State never leaves its packed form: every kernel decodes the base-3 bytes of ``T_packed`` in registers
(no int8 copy of all trits), so materialize reads 0.2 + 9/gs bytes per weight and writes W_eff.

Exactness (tests/test_triton.py checks each against the numba kernels):

- integers (delta, corr_accum, E, flip_accum, T_packed bytes, every count) are computed with integer
  arithmetic and are identical to the numba kernels;
- S = float32(exp2(float64(E) + float64(num*corr_accum)/float64(den))) is computed per group in
  float64 inside the kernel: the division is IEEE ``div.rn.f64`` and exp2 is CUDA's libdevice
  ``__nv_exp2`` (double, max error 1 ulp of double); the cast to float32 rounds to nearest even. numba
  calls libm's ``exp2`` (glibc: < 0.51 ulp). The two doubles can only round to different float32 values
  when 2**x lies within ~2 ulp of double of a float32 rounding midpoint (about one group in 10**8 by
  that bound); none was seen in the tests, which include every (E, corr_accum) pair of E1TM32 carry at
  K=16. W_eff = S*T is then a float32 product, identical to numba's; a bf16/fp16 ``out`` receives that
  float32 value rounded to nearest even (what ``w.to(torch.bfloat16)`` gives).

Syncs: the ``*_into`` contract functions return counts as Python ints, so each costs one device-to-host
transfer (a full stream sync). The ``launch_*`` functions add their counts to an int64 device tensor
(``new_counters``: [nonfinite, out_of_range, carries, saturations, flips]) and never sync; with
``guarded=True`` a kernel leaves the state untouched once counts[0] or counts[1] is nonzero, so one
counter tensor can serve every layer of a step (arbs.nn.cuda reads it once per step).

Tensors in, tensors out: like arbs.kernels.cpu, nothing here validates dtypes or shapes or knows an
arbs module; every tensor must be C-contiguous and on one device.
With ``TRITON_INTERPRET=1`` set before triton is imported, the same kernels run on CPU tensors
(slowly): the tests use that to check the kernels' logic without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# libdevice calls cannot run in the interpreter; there tl.exp2 is numpy's float64 exp2.
_LIBDEVICE = tl.constexpr(not _INTERPRET)
if not _INTERPRET:
    from triton.language.extra import libdevice
else:  # pragma: no cover - only in the interpreter
    libdevice = None

_I64_MAX = (1 << 63) - 1
# counters of one vote: nonfinite, out_of_range, carries, saturations, flips
N_COUNTERS = 5


# -- device helpers --------------------------------------------------------------------------------
@triton.jit
def _trit(b, d):
    """Trit ``d`` (0..4, first least significant) of packed bytes ``b`` (int32), as int32 in -1..+1.

    Mirrors cpu._unpack_row exactly, also for invalid bytes 243..255 (top digit q4 not reduced mod 3),
    so that decode + re-encode gives the byte back.
    """
    q1 = b // 3
    q2 = q1 // 3
    q3 = q2 // 3
    q4 = q3 // 3
    t = tl.where(d == 0, b - 3 * q1, tl.where(d == 1, q1 - 3 * q2, tl.where(d == 2, q2 - 3 * q3, tl.where(d == 3, q3 - 3 * q4, q4))))
    return t - 1


@triton.jit
def _exp2_f64(x):
    if _LIBDEVICE:
        y = libdevice.exp2(x)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _xi(corr, num, den):
    """float64(num*corr) / float64(den), IEEE division (den != 0)."""
    return (corr * num).to(tl.float64) / den.to(tl.float64)


@triton.jit
def _rint_f64(v):
    """Round half to even in float64 (np.rint), exact for every finite double."""
    if _LIBDEVICE:
        y = libdevice.rint(v)  # cvt.rni.f64.f64
    else:
        fl = tl.floor(v)
        f = v - fl
        odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
        y = tl.where((f > 0.5) | ((f == 0.5) & odd), fl + 1.0, fl)
    return y


@triton.jit
def _is_finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


# -- kernels ---------------------------------------------------------------------------------------
# Tiles are (BR rows, BG groups, GSP columns of a group): S and delta live per (row, group) and are
# broadcast/reduced along the last axis; GSP = next power of two >= gs, the extra lanes are masked.


@triton.jit(do_not_specialize=["num", "den"])
def _materialize_kernel(tp_ptr, e_ptr, corr_ptr, out_ptr, rows, cols, nb, ng, num, den,
                        HAS_XI: tl.constexpr, GS: tl.constexpr, GSP: tl.constexpr,
                        BR: tl.constexpr, BG: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]  # (BR, 1)
    g = (tl.program_id(1) * BG + tl.arange(0, BG))[None, :]  # (1, BG)
    gmask = (r < rows) & (g < ng)
    e = tl.load(e_ptr + r * ng + g, mask=gmask, other=0).to(tl.float64)  # (BR, BG)
    if HAS_XI:
        corr = tl.load(corr_ptr + r * ng + g, mask=gmask, other=0)
        e = e + _xi(corr, num, den)
    s = _exp2_f64(e).to(tl.float32)  # (BR, BG) float32(2**(E + Xi))
    j = tl.arange(0, GSP)[None, None, :]
    c = g[:, :, None] * GS + j  # (1, BG, GSP) column
    r3 = r[:, :, None]
    m = (r3 < rows) & (c < cols) & (j < GS)
    b = tl.load(tp_ptr + r3 * nb + c // 5, mask=m, other=121).to(tl.int32)
    t = _trit(b, c % 5)
    w = s[:, :, None] * t.to(tl.float32)
    tl.store(out_ptr + r3 * cols + c, w.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _vote_kernel(grad_ptr, tp_ptr, delta_ptr, cnt_ptr, corr_ptr, rows, cols, nb, ng, range_limit,
                 CHECK_RANGE: tl.constexpr, GS: tl.constexpr, GSP: tl.constexpr,
                 BR: tl.constexpr, BG: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
    g = (tl.program_id(1) * BG + tl.arange(0, BG))[None, :]
    gmask = (r < rows) & (g < ng)
    j = tl.arange(0, GSP)[None, None, :]
    c = g[:, :, None] * GS + j
    r3 = r[:, :, None]
    m = (r3 < rows) & (c < cols) & (j < GS)
    x = tl.load(grad_ptr + r3 * cols + c, mask=m, other=0.0)  # native dtype: no rounding of the sign
    b = tl.load(tp_ptr + r3 * nb + c // 5, mask=m, other=121).to(tl.int32)
    t = _trit(b, c % 5)
    sgn = (x > 0).to(tl.int32) - (x < 0).to(tl.int32)
    acc = tl.sum(sgn * t, axis=2)  # (BR, BG), |acc| <= gs
    tl.store(delta_ptr + r * ng + g, -(acc.to(tl.int64)), mask=gmask)
    bad = tl.sum(tl.sum(tl.sum((m & ~_is_finite(x)).to(tl.int32), axis=2), axis=1), axis=0).to(tl.int64)
    tl.atomic_add(cnt_ptr, bad, mask=bad > 0)  # one atomic per program, only when needed
    if CHECK_RANGE:  # average rule: refuse to vote if any |corr_accum| > int64 max - gs
        corr = tl.load(corr_ptr + r * ng + g, mask=gmask, other=0)
        oor = gmask & ((corr > range_limit) | (corr < -range_limit))
        n_oor = tl.sum(tl.sum(oor.to(tl.int32), axis=1), axis=0).to(tl.int64)
        tl.atomic_add(cnt_ptr + 1, n_oor, mask=n_oor > 0)


@triton.jit
def _apply_kernel(corr_ptr, e_ptr, delta_ptr, cnt_ptr, n, limit, GUARDED: tl.constexpr, CARRY: tl.constexpr,
                  BLOCK: tl.constexpr):
    """corr += delta, then carry in closed form (same result as cpu._carry's loops)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    if GUARDED:  # the vote kernel found NaN/inf or a corr_accum out of range: change nothing
        z = i * 0  # counts are loaded per lane (one address, a broadcast): scalar masks break the interpreter
        m = m & ((tl.load(cnt_ptr + z) + tl.load(cnt_ptr + 1 + z)) == 0)  # both counts are >= 0
    c = tl.load(corr_ptr + i, mask=m, other=0) + tl.load(delta_ptr + i, mask=m, other=0)
    if CARRY:
        e = tl.load(e_ptr + i, mask=m, other=0).to(tl.int64)
        pos = c >= limit
        neg = c <= -limit
        want = tl.where(pos, c // limit, tl.where(neg, (-c) // limit, 0))  # operands >= 0: no sign issue
        room = tl.where(pos, 127 - e, e + 128)
        nc = tl.minimum(want, room)
        sat = want > room
        step = tl.where(pos, nc, -nc)
        e = e + step
        c = c - step * limit
        c = tl.where(sat, tl.where(pos, limit - 1, -(limit - 1)), c)
        tl.store(e_ptr + i, e.to(tl.int8), mask=m)
        n_c = tl.sum(tl.where(m, nc, 0), axis=0)
        n_s = tl.sum(tl.where(m & sat, 1, 0), axis=0).to(tl.int64)
        tl.atomic_add(cnt_ptr + 2, n_c, mask=n_c > 0)
        tl.atomic_add(cnt_ptr + 3, n_s, mask=n_s > 0)
    tl.store(corr_ptr + i, c, mask=m)


@triton.jit
def _mix64(x):
    """splitmix64's finalizer on uint64 (schedule.mix64, cpu._mix64)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit(do_not_specialize=["base", "vote_max", "reset"])
def _flip_kernel(grad_ptr, tp_ptr, fa_ptr, cnt_ptr, rows, cols, cols_p, nb, theta, vote_max, reset, scale_ptr, sched_ptr,
                 base, GUARDED: tl.constexpr, STOCH: tl.constexpr, BR: tl.constexpr, BB: tl.constexpr):
    """Tiles of (BR rows, BB packed bytes); each lane owns one byte and its 5 trits (unrolled loop).

    STOCH: a vote is -sign(g) times the stochastic rounding of min(vote_max, |g| * scale[row])
    (cpu._vote_weight), drawn with key = mix64(base ^ step), step read from sched_ptr on the device (so a
    CUDA graph replays it)."""
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]  # (BR, 1)
    k = (tl.program_id(1) * BB + tl.arange(0, BB))[None, :]  # (1, BB) byte index
    bmask = (r < rows) & (k < nb)  # (BR, BB)
    if GUARDED:  # the vote kernel found NaN/inf: change nothing
        bmask = bmask & (tl.load(cnt_ptr + k * 0) == 0)
    q = tl.load(tp_ptr + r * nb + k, mask=bmask, other=121).to(tl.int32)
    if STOCH:
        scale = tl.load(scale_ptr + r, mask=r < rows, other=0.0)  # (BR, 1) float64
        step = tl.load(sched_ptr).to(tl.int64).to(tl.uint64, bitcast=True)
        key = _mix64(base.to(tl.int64).to(tl.uint64, bitcast=True) ^ step)  # base may arrive as int32
    nbyte = tl.zeros([BR, BB], dtype=tl.int32)
    moved = tl.zeros([BR, BB], dtype=tl.int32)
    pw = 1
    for d in tl.static_range(5):
        if d < 4:  # digit d = (b // 3**d) % 3; the top digit is not reduced (as cpu._unpack_row)
            qn = q // 3
            t = q - 3 * qn - 1
        else:
            qn = q
            t = q - 1
        c = k * 5 + d
        m = bmask & (c < cols)  # positions with a gradient; padding trits are never touched
        x = tl.load(grad_ptr + r * cols + c, mask=m, other=0.0)
        v = tl.load(fa_ptr + r * cols_p + c, mask=m, other=0).to(tl.int32)
        sgn = (x > 0).to(tl.int32) - (x < 0).to(tl.int32)
        if STOCH:
            a = tl.minimum(tl.abs(x.to(tl.float64)) * scale, vote_max.to(tl.float64))
            kw = a.to(tl.int32)  # floor: a >= 0
            f = a - kw.to(tl.float64)  # exact
            i = (r * cols_p + c).to(tl.uint64, bitcast=True)
            u = _mix64(key ^ (i * 0x9E3779B97F4A7C15)) >> 40
            sgn = sgn * (kw + (u.to(tl.float64) < f * 16777216.0).to(tl.int32))
        v = v - sgn
        v = tl.minimum(tl.maximum(v, -theta), theta)
        up = m & (v == theta) & (t < 1)
        down = m & (v == -theta) & (t > -1)
        t = t + up.to(tl.int32) - down.to(tl.int32)
        v = tl.where(up, -reset, tl.where(down, reset, v))
        tl.store(fa_ptr + r * cols_p + c, v.to(tl.int8), mask=m)
        nbyte += (t + 1) * pw  # lossless re-encode, also of invalid bytes
        moved += (up | down).to(tl.int32)
        pw = pw * 3
        q = qn
    tl.store(tp_ptr + r * nb + k, nbyte.to(tl.uint8), mask=bmask & (moved > 0))
    flips = tl.sum(tl.sum(moved, axis=1), axis=0).to(tl.int64)
    tl.atomic_add(cnt_ptr + 4, flips, mask=flips > 0)


@triton.jit(do_not_specialize=["num", "den"])
def _fuse_kernel(e_ptr, corr_ptr, out_ptr, cnt_ptr, n, num, den, HAS_XI: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    e = tl.load(e_ptr + i, mask=m, other=0).to(tl.float64)
    if HAS_XI:
        xi = _xi(tl.load(corr_ptr + i, mask=m, other=0), num, den)
    else:
        xi = tl.zeros([BLOCK], dtype=tl.float64)
    v = _rint_f64(e + xi)
    hi = v > 127.0
    lo = v < -128.0
    v = tl.where(hi, 127.0, tl.where(lo, -128.0, v))
    tl.store(out_ptr + i, v.to(tl.int8), mask=m)
    n_clip = tl.sum((m & (hi | lo)).to(tl.int32), axis=0).to(tl.int64)
    n_chg = tl.sum((m & (tl.abs(xi) >= 0.5)).to(tl.int32), axis=0).to(tl.int64)
    tl.atomic_add(cnt_ptr, n_clip, mask=n_clip > 0)
    tl.atomic_add(cnt_ptr + 1, n_chg, mask=n_chg > 0)


# -- launch helpers --------------------------------------------------------------------------------
# (rows, groups, gs) kernels: 4 rows x 1024 lanes per program; the interpreter is faster on small tiles
_TILE_COLS, _TILE_ROWS = (128, 2) if _INTERPRET else (1024, 4)
_FLIP_BYTES, _FLIP_ROWS = (64, 2) if _INTERPRET else (512, 2)
_BLOCK_1D = 256 if _INTERPRET else 1024


def _group_tiles(rows: int, ng: int, gs: int) -> tuple[int, int, int]:
    """(GSP, BR, BG): tile shape over (rows, groups, gs). It depends on gs alone, so each variant
    compiles once (shapes only change the grid); lanes past the tensor are masked."""
    gsp = triton.next_power_of_2(gs)
    return gsp, _TILE_ROWS, max(1, _TILE_COLS // gsp)


def _grid2(rows: int, n: int, br: int, bn: int) -> tuple[int, int]:
    return triton.cdiv(rows, br), triton.cdiv(n, bn)


def launch_materialize(T_packed, E, corr_accum, gs, num, den, out) -> None:
    rows, cols = out.shape
    nb, ng = T_packed.shape[1], E.shape[1]
    if rows == 0 or cols == 0:
        return
    gsp, br, bg = _group_tiles(rows, ng, gs)
    _materialize_kernel[_grid2(rows, ng, br, bg)](
        T_packed, E, corr_accum, out, rows, cols, nb, ng, int(num), int(den) if den else 1,
        HAS_XI=den != 0, GS=gs, GSP=gsp, BR=br, BG=bg, num_warps=4,
    )


def launch_vote(grad, T_packed, gs, delta, counters, corr_accum=None) -> None:
    rows, cols = grad.shape
    nb, ng = T_packed.shape[1], delta.shape[1]
    if rows == 0 or ng == 0:
        return
    gsp, br, bg = _group_tiles(rows, ng, gs)
    check = corr_accum is not None
    _vote_kernel[_grid2(rows, ng, br, bg)](
        grad, T_packed, delta, counters, corr_accum if check else delta, rows, cols, nb, ng, _I64_MAX - gs,
        CHECK_RANGE=check, GS=gs, GSP=gsp, BR=br, BG=bg, num_warps=4,
    )


def launch_apply(corr_accum, E, delta, carry_limit, counters, guarded) -> None:
    n = corr_accum.numel()
    if n == 0:
        return
    _apply_kernel[(triton.cdiv(n, _BLOCK_1D),)](
        corr_accum, E, delta, counters, n, max(int(carry_limit), 1),
        GUARDED=guarded, CARRY=carry_limit > 0, BLOCK=_BLOCK_1D, num_warps=4,
    )


def launch_flip(grad, T_packed, flip_accum, theta, counters, guarded, sched=None, base=0, vote_max=1,
                tensor_norm=False, reset=0) -> None:
    """sched None: sign votes. Else the float64 device tensor [step, gain_m] of the stochastic votes,
    with ``base`` = formats.vote_base(seed, tensor); ``tensor_norm``: |g| against the whole tensor's rms
    instead of its row's."""
    rows, cols = grad.shape
    nb, cols_p = T_packed.shape[1], flip_accum.shape[1]
    if rows == 0 or nb == 0:
        return
    scale = counters  # unused placeholder pointer for sign votes
    if sched is not None:  # per row gain_m / rms(g), 0 for an all-zero row or tensor (no votes)
        if tensor_norm:
            rms = (torch.linalg.vector_norm(grad, dtype=torch.float64) / (rows * cols)**0.5).expand(rows)
        else:
            rms = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float64) / cols**0.5
        scale = torch.where(rms > 0, sched[1] / rms, torch.zeros_like(rms)).contiguous()
    base = base - (1 << 64) if base > _I64_MAX else base  # the same 64 bits as an int64 argument
    bb, br = _FLIP_BYTES, _FLIP_ROWS  # rows x bytes (5 trits each) per program
    _flip_kernel[_grid2(rows, nb, br, bb)](
        grad, T_packed, flip_accum, counters, rows, cols, cols_p, nb, int(theta), int(vote_max), int(reset), scale,
        counters if sched is None else sched, int(base),
        GUARDED=guarded, STOCH=sched is not None, BR=br, BB=bb, num_warps=4,
    )


# -- the contracts of arbs.kernels.cpu -------------------------------------------------------------
def materialize_into(T_packed, E, corr_accum, gs, num, den, out) -> None:
    """W_eff = S*T with S = float32(2**(E + Xi)), Xi = float64(num*corr_accum)/den (0 if den == 0).

    T_packed uint8 (rows, nb); E int8 and corr_accum int64 (rows, ng); ``out`` float32, bfloat16 or
    float16 (rows, cols) is overwritten (a non-float32 ``out`` gets the float32 product, rounded).
    No sync.
    """
    launch_materialize(T_packed, E, corr_accum, gs, num, den, out)


def vote_delta_into(grad, T_packed, gs, delta) -> int:
    """delta[r, g] = -sum_{c in group g} sign(grad[r, c]) * T[r, c] (sign(0) = 0).

    grad float32/bfloat16/float16/float64 (rows, cols); T_packed uint8 (rows, nb); ``delta`` int64
    (rows, ng) is overwritten. Returns the number of NaN/inf entries in ``grad`` (one sync).
    """
    counters = torch.zeros(N_COUNTERS, dtype=torch.int64, device=grad.device)
    launch_vote(grad, T_packed, gs, delta, counters)
    return int(counters[0].item())


def apply_votes(corr_accum, E, delta, carry_limit) -> tuple[int, int]:
    """corr_accum += delta, then (carry_limit > 0) carry with saturation at E = -128/127, exactly as
    cpu.apply_votes. corr_accum int64 and E int8 (rows, ng) are modified in place; delta int64.
    Returns (carries, saturations) (one sync).
    """
    counters = torch.zeros(N_COUNTERS, dtype=torch.int64, device=corr_accum.device)
    launch_apply(corr_accum, E, delta, carry_limit, counters, guarded=False)
    c = counters.tolist()
    return c[2], c[3]


def flip_into(grad, T_packed, flip_accum, theta, gain_m=0.0, base=0, step=0, vote_max=1, tensor_norm=False,
              reset=0) -> int:
    """The flip rule's trit update, in place on ``T_packed`` (uint8 (rows, nb); bytes are rewritten in
    place) and ``flip_accum`` (int8 (rows, cols_p)), as cpu.flip_into with
    ``key = formats.mix64(base ^ step)``. The caller must have checked that grad (float (rows, cols)) is
    finite. Returns the number of flips (one sync).
    """
    counters = torch.zeros(N_COUNTERS, dtype=torch.int64, device=grad.device)
    sched = None if gain_m == 0.0 else torch.tensor([float(step), float(gain_m)], dtype=torch.float64, device=grad.device)
    launch_flip(grad, T_packed, flip_accum, theta, counters, guarded=False, sched=sched, base=base, vote_max=vote_max,
                tensor_norm=tensor_norm, reset=reset)
    return int(counters[4].item())


def fuse_into(E, corr_accum, num, den, out) -> tuple[int, int]:
    """E_fused = clip(rint(E + Xi), -128, 127) (round half to even) into ``out`` (int8 (rows, ng)).

    Returns (clipped, changed) (one sync).
    """
    counters = torch.zeros(2, dtype=torch.int64, device=E.device)
    n = E.numel()
    if n:
        _fuse_kernel[(triton.cdiv(n, _BLOCK_1D),)](
            E, corr_accum, out, counters, n, int(num), int(den) if den else 1,
            HAS_XI=den != 0, BLOCK=_BLOCK_1D, num_warps=4,
        )
    c = counters.tolist()
    return c[0], c[1]


def new_counters(device) -> torch.Tensor:
    """Zeroed int64 device tensor for the ``launch_*`` functions: [nonfinite, out_of_range, carries,
    saturations, flips]."""
    return torch.zeros(N_COUNTERS, dtype=torch.int64, device=device)
