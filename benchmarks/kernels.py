"""Throughput of the numba CPU kernels against a memcpy of the same byte count, measured in the same run.

    python benchmarks/kernels.py [--rows 4096] [--cols 4096] [--format E1TM32] [--repeats 15]

State: a (rows, cols) tensor of the chosen variant under the carry rule (K = 16), built by
arbs.testing.states from uniformly random trits, random E in [-8, 8] and random corr_accum inside
+-(K*gs - 1), no bounds planted. Each kernel is compiled and run three times before timing; the table
shows the median of ``--repeats`` timed samples, the kernel and its memcpy reference timed alternately
so that both see the same state of the machine, each sample the mean of a ~5 ms burst of back-to-back calls (one call for the long kernels).

"Bytes" counts every byte the kernel must read plus every byte it must write (what a perfect kernel
would move through memory):

- pack:        int8 T in + uint8 T_packed out
- unpack:      uint8 T_packed in + int8 T out
- materialize: T_packed + E + corr_accum in, float32 W_eff out
- vote:        float32 grad in + T_packed in + E and corr_accum read and written (vote_delta_into +
               apply_votes; the int64 delta scratch array is not counted)
- fuse:        E + corr_accum in, int8 E_fused out

The memcpy column copies bytes/2 bytes between two preallocated uint8 buffers (so it also touches
``bytes`` bytes: bytes/2 read + bytes/2 written) with ``np.copyto`` on two halves run by a
2-worker ThreadPoolExecutor (np.copyto releases the GIL). ratio = kernel GB/s / memcpy GB/s.
GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run from a checkout

from arbs import formats
from arbs.kernels import cpu
from arbs.testing.states import random_state, random_trits

TARGETS = {"pack": 1.0, "unpack": 1.0, "materialize": 0.5, "vote": 0.5, "fuse": 1.0}


def _median_s_pair(fn, ref, repeats: int, warmup: int = 3, burst_s: float = 0.005) -> tuple[float, float]:
    """Median seconds per call of ``fn`` and of ``ref``, timed alternately (fn, ref, fn, ref, ...) so that
    both see the same machine state: this VM's memory bandwidth drifts by 2x and more over seconds.
    Each sample is a burst of back-to-back calls lasting about ``burst_s`` (timeit's autorange idea), so a
    0.1 ms kernel is not timed as mostly the wake-up of the threads that the other one put to sleep."""
    bursts = []
    for f in (fn, ref):
        for _ in range(warmup):  # compile, fault in pages, settle the caches and the thread pool
            f()
        t0 = time.perf_counter()
        f()
        bursts.append(max(1, math.ceil(burst_s / max(time.perf_counter() - t0, 1e-9))))
    times = ([], [])
    for _ in range(repeats):
        for f, n, t in zip((fn, ref), bursts, times):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            t.append((time.perf_counter() - t0) / n)
    return statistics.median(times[0]), statistics.median(times[1])


class Memcpy:
    """A 2-thread memcpy touching ``nbytes`` bytes (nbytes/2 read + nbytes/2 written)."""

    def __init__(self, nbytes: int, pool: ThreadPoolExecutor):
        n = nbytes // 2
        self.src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
        self.dst = np.empty_like(self.src)
        h = n // 2
        self.halves = [(self.dst[:h], self.src[:h]), (self.dst[h:], self.src[h:])]
        self.pool = pool

    def __call__(self) -> None:
        for f in [self.pool.submit(np.copyto, d, s) for d, s in self.halves]:
            f.result()


def run(rows: int, cols: int, fmt: str, repeats: int) -> list[dict]:
    scheme = formats.make_scheme(fmt, "carry")
    gs, limit = scheme.gs, scheme.carry_limit
    rng = np.random.default_rng(0)
    T = random_trits(rng, rows, cols)
    state = random_state(rng, scheme, (rows, cols), T=T, E_range=(-8, 8), extremes=0)
    grad = rng.standard_normal((rows, cols), dtype=np.float32)
    Tp, E, corr = state["T_packed"], state["E"], state["corr_accum"]
    num, den = scheme.xi_ratio(0)
    T_out = np.empty_like(T)
    Tp_out = np.empty_like(Tp)
    W = np.empty((rows, cols), np.float32)
    E_fused = np.empty_like(E)
    delta = np.empty(corr.shape, np.int64)

    def vote():
        cpu.vote_delta_into(grad, Tp, gs, delta)
        cpu.apply_votes(corr, E, delta, limit)

    cases = {
        "pack": (lambda: cpu.pack_into(T, Tp_out), T.nbytes + Tp.nbytes),
        "unpack": (lambda: cpu.unpack_into(Tp, T_out), Tp.nbytes + T.nbytes),
        "materialize": (
            lambda: cpu.materialize_into(Tp, E, corr, gs, num, den, W),
            Tp.nbytes + E.nbytes + corr.nbytes + W.nbytes,
        ),
        "vote": (vote, grad.nbytes + Tp.nbytes + 2 * (E.nbytes + corr.nbytes)),
        "fuse": (lambda: cpu.fuse_into(E, corr, num, den, E_fused), E.nbytes + corr.nbytes + E_fused.nbytes),
    }
    results = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, (fn, nbytes) in cases.items():
            t, tm = _median_s_pair(fn, Memcpy(nbytes, pool), repeats)
            gbs, mgbs = nbytes / t / 1e9, nbytes / tm / 1e9
            results.append(dict(kernel=name, bytes=nbytes, ms=t * 1e3, gbs=gbs, memcpy_gbs=mgbs,
                                ratio=gbs / mgbs, target=TARGETS[name]))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--format", default="E1TM32", help="E1TM variant")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per kernel (median reported)")
    a = p.parse_args(argv)
    print(f"{a.rows}x{a.cols} {a.format} carry, numba threads={numba.get_num_threads()}, "
          f"median of {a.repeats}; memcpy = np.copyto over 2 ThreadPoolExecutor threads, same bytes touched")
    rows = run(a.rows, a.cols, a.format, a.repeats)
    print(f"{'kernel':<12} {'bytes':>11} {'ms':>8} {'GB/s':>7} {'memcpy GB/s':>12} {'ratio':>6} {'target':>7}")
    for r in rows:
        ok = "ok" if r["ratio"] >= r["target"] else "MISS"
        print(f"{r['kernel']:<12} {r['bytes']:>11,} {r['ms']:>8.3f} {r['gbs']:>7.2f} {r['memcpy_gbs']:>12.2f} "
              f"{r['ratio']:>6.2f} {'>=' + format(r['target'], '.1f'):>5} {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
