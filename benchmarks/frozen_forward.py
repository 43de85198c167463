"""Frozen (eval mode, no grad) forward of one E1TM Linear vs the dense float Linear it came from, side by side.

An E1TM layer in eval mode with grad disabled materializes W_eff once and reuses it until its state changes
(arbs.nn.layers: the eval cache), so a frozen forward should cost what the dense layer's does. This times
both in one process, interleaved (dense, E1TM, dense, ...: the VM's speed drifts by +-20 % over seconds),
each sample a burst of ``--calls`` forwards, and prints the medians over ``--repeats`` samples and the
median of the per-sample ratios. For reference it also times the E1TM layer in training mode under no_grad,
where every forward materializes W_eff anew (no cache).

    python benchmarks/frozen_forward.py [--size 1024] [--batch 1] [--repeats 200] [--calls 20] [--threads 2]
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn

import arbs.nn as anx


def per_call_ms(fn, x, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="in = out features")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--format", default="E1TM32")
    ap.add_argument("--repeats", type=int, default=200, help="samples per configuration (median reported)")
    ap.add_argument("--calls", type=int, default=20, help="forwards per sample")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense = nn.Linear(a.size, a.size, bias=False).eval()
    e1tm = anx.ternarize_(nn.Linear(a.size, a.size, bias=False), a.format).eval()
    uncached = anx.ternarize_(nn.Linear(a.size, a.size, bias=False), a.format).train()  # no cache in train mode
    x = torch.randn(a.batch, a.size)
    times: dict[str, list[float]] = {"dense": [], "e1tm": [], "uncached": []}
    ratios = []
    with torch.no_grad():
        for fn in (dense, e1tm, uncached):  # warm-up: numba compile, first materialize
            per_call_ms(fn, x, 3)
        for i in range(a.repeats):
            d = per_call_ms(dense, x, a.calls)
            e = per_call_ms(e1tm, x, a.calls)
            times["dense"].append(d)
            times["e1tm"].append(e)
            ratios.append(e / d)
            if i % 10 == 0:  # a few samples of the uncached path, for reference
                times["uncached"].append(per_call_ms(uncached, x, 2))
    med = {k: statistics.median(v) for k, v in times.items()}
    q = statistics.quantiles(ratios, n=4)
    print(f"{a.size}x{a.size} {a.format}, batch {a.batch}, no_grad, {a.threads} threads, "
          f"median of {a.repeats} samples x {a.calls} forwards")
    print(f"dense nn.Linear (eval)             {med['dense']:.4f} ms")
    print(f"E1TMLinear (eval: cached W_eff)    {med['e1tm']:.4f} ms")
    print(f"E1TMLinear (train: W_eff per call) {med['uncached']:.4f} ms")
    print(f"ratio E1TM/dense (median of per-sample ratios) {statistics.median(ratios):.3f}x "
          f"(quartiles {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main()
