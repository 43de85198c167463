"""Where a CPU training step's time goes: cProfile (and optionally torch.profiler) over tiny-preset steps.

    python benchmarks/profile_step.py E1TM32 flip --cprofile     # Python calls, by own time
    python benchmarks/profile_step.py fp32 - --torch             # aten ops, by self CPU time

Prints the median ms/step of 15 steps, then the profile of 10 more. E1TM models run from step 300 of
the 1000-step schedule, as in benchmarks/train_step.py.
"""

import argparse
import cProfile
import pstats

import torch
from train_step import model_step  # this directory: the same model, schedule point and timed step

from arbs import data as D


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("format")
    ap.add_argument("rule", help="E1TM rule, or - for a float format")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--torch", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    corpus = D.default_corpus()
    step, batch_size, ctx = model_step(a.preset, a.format, None if a.rule == "-" else a.rule, corpus)

    def run(n, s0):
        ts = [step(*D.get_batch(corpus.train, batch_size=batch_size, context=ctx, seed=0, step=s))
              for s in range(s0, s0 + n)]
        return sorted(ts)[len(ts) // 2] * 1e3

    run(3, 0)  # compile kernels, warm caches
    print(f"{a.format} {a.rule}: median {run(15, 3):.1f} ms/step")
    if a.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        run(10, 20)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    if a.torch:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            run(10, 40)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))


if __name__ == "__main__":
    main()
